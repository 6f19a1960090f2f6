# Quick start: `make run` starts a development agent, `make test` runs the whole suite.
# Both install what is missing first: Debian packages (as root), then the virtualenv.

PYTHON ?= /usr/bin/python3
VENV   := .venv
DEV    ?= .strata-dev
DEB_PACKAGES := qemu-utils sanlock python3-sanlock python3-venv
# Commands (or files) whose absence means a Debian package is missing.
DEB_PROBES := /usr/bin/qemu-img /usr/bin/qemu-io /usr/sbin/sanlock \
              /usr/lib/python3/dist-packages/sanlock.cpython-311-x86_64-linux-gnu.so
# Only the tests, the benchmark and make cluster need these: they make XFS and btrfs file systems
# on loop files, cut a qemu-img at a chosen system call (strace's fault injection), run the
# README's command blocks, which pick JSON apart with jq, and run a real GlusterFS volume that the
# simulated hosts of the multi-host tests mount.
TEST_DEB_PACKAGES := xfsprogs btrfs-progs strace jq glusterfs-server glusterfs-client
TEST_DEB_PROBES := /sbin/mkfs.xfs /sbin/mkfs.btrfs /usr/bin/strace /usr/bin/jq \
                   /usr/sbin/glusterd /usr/sbin/mount.glusterfs

# $(call debs,PROBES,PACKAGES,EXTRA-CHECK,NOT-ROOT): apt-get install PACKAGES (as root) when a
# probe is missing or EXTRA-CHECK fails; not root, say so and run NOT-ROOT (exit 1, or true).
define debs
	@missing=0; for p in $(1); do [ -e $$p ] || missing=1; done; \
	$(3) || missing=1; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2); \
	  else \
	    echo "missing Debian packages; run as root or: sudo apt-get install $(2)" >&2; $(4); \
	  fi; \
	fi
endef

.PHONY: run test stress lint bench deps clean install install-unit cluster cluster-down

deps: $(VENV)/.installed

$(VENV)/.debs:
	$(call debs,$(DEB_PROBES),$(DEB_PACKAGES),$(PYTHON) -c 'import ensurepip' 2>/dev/null,exit 1)
	@# The venv must come from the distribution's python3: python3-sanlock is built for it.
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv --system-site-packages $(VENV)
	touch $@

$(VENV)/.testdebs: $(VENV)/.debs
	@# Not root: the loop-mount tests skip anyway, saying why.
	$(call debs,$(TEST_DEB_PROBES),$(TEST_DEB_PACKAGES),true,true)
	touch $@

$(VENV)/.installed: $(VENV)/.debs setup.cfg pyproject.toml
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,lint]' 'tox>=4.11,<5'
	touch $@

run: deps
	$(VENV)/bin/strata-agent --dev $(DEV)

test: deps $(VENV)/.testdebs
	$(VENV)/bin/tox -q

# The race suite (tests/test_races_e2e.py) with STRESS times as many seeds as in make test.
STRESS ?= 10
stress: deps $(VENV)/.testdebs
	STRATA_STRESS=$(STRESS) $(VENV)/bin/tox -q -e py -- tests/test_races_e2e.py

lint: deps
	$(VENV)/bin/tox -q -e lint

bench: deps $(VENV)/.testdebs
	$(VENV)/bin/python -m bench

# A GlusterFS volume and HOSTS simulated hosts on this machine (as root), each with its own mount
# namespace, sanlock daemon, agent and socket under CLUSTER_DIR: it prints each host's socket.
# make cluster-down stops them all by the pids recorded in CLUSTER_DIR/cluster.json.
HOSTS ?= 3
CLUSTER_DIR ?= /var/tmp/strata-cluster
cluster: deps $(VENV)/.testdebs
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python -m tests.cluster up --hosts $(HOSTS) --dir $(CLUSTER_DIR)

cluster-down:
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python -m tests.cluster down --dir $(CLUSTER_DIR)

clean:
	rm -rf $(VENV) .tox $(DEV) *.egg-info

# A host install, as root: the agent in its own virtualenv under /opt/strata (made from the
# distribution's python3, which python3-sanlock needs), commands in $(PREFIX)/bin, the unit, and
# the example configuration when none exists. Then: systemctl daemon-reload; systemctl enable --now
# strata-agent.
PREFIX ?= /usr/local
OPT    ?= /opt/strata
SYSTEMD_DIR ?= /etc/systemd/system
install: $(VENV)/.debs install-unit
	$(PYTHON) -m venv --system-site-packages $(OPT)
	$(OPT)/bin/pip install -q --upgrade pip
	$(OPT)/bin/pip install -q .
	install -d $(PREFIX)/bin /etc/strata/conf.d
	ln -sf $(OPT)/bin/strata-agent $(PREFIX)/bin/strata-agent
	ln -sf $(OPT)/bin/strata-client $(PREFIX)/bin/strata-client
	[ -e /etc/strata/agent.conf ] || install -m 0644 systemd/strata-agent.conf.example /etc/strata/agent.conf

# The unit as installed: ExecStart names the agent where install links it (tests/
# test_systemd_unit.py runs systemd-analyze verify on exactly this output).
install-unit:
	install -d $(SYSTEMD_DIR)
	sed 's#^ExecStart=/usr/bin/strata-agent#ExecStart=$(PREFIX)/bin/strata-agent#' \
	    systemd/strata-agent.service > $(SYSTEMD_DIR)/strata-agent.service
