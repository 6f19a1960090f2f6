"""Simulated hosts sharing one real GlusterFS volume, on this machine: the multi-host tests'
harness and ``make cluster``.

Each host has its own mount namespace (``tests/namespace.py``), its own sanlock daemon
(``tests/sanlockd.py``, host name ``host<N>``) and its own strata-agent with its own configuration
(``[host] id = N``), socket and state directory, both running inside the namespace: what the host
mounts (the agent's glusterfs-1.0 repository, or the harness's own FUSE mount, ``mount=True``)
is seen by that host alone, as on separate machines. Because a host is its namespace, host
actions reach everything it runs, its agent's children included, by pid: ``kill`` (a host death),
``freeze``/``thaw``, ``cut_storage`` (its FUSE client killed).

Command line (``make cluster`` / ``make cluster-down``)::

    python -m tests.cluster up --hosts 3 --dir /var/tmp/strata-cluster
    python -m tests.cluster down --dir /var/tmp/strata-cluster

``up`` records every pid in ``DIR/cluster.json``; ``down`` stops exactly those processes (and what
runs in those namespaces), unmounts and detaches the brick's loop device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from rpc import transport
from tests import gluster, namespace, sanlockd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ID = "shared"
REPO_FORMAT = "glusterfs-1.0"
STATE_FILE = "cluster.json"
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-sanlock is built for it


def _agent_has(key: str) -> bool:
    """Whether this checkout's agent knows ``[agent] key`` (keys are being added in parallel)."""
    from agent import config
    return key in {f.name for f in dataclasses.fields(config.Agent)}


class Host:
    """One simulated host under ``directory/host<N>``."""

    def __init__(self, directory: str, host_id: int, volume: gluster.Volume,
                 python: str = sys.executable) -> None:
        self.id = host_id
        self.name = f"host{host_id}"
        self.dir = os.path.join(os.path.abspath(directory), self.name)
        self.volume = volume
        self.python = python
        self.socket = os.path.join(self.dir, "agent.sock")
        self.config = os.path.join(self.dir, "agent.conf")
        self.run_dir = os.path.join(self.dir, "run")
        self.mountpoint = os.path.join(self.dir, "mnt")
        self.ns: namespace.Namespace | None = None
        self.sanlock: sanlockd.Daemon | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_pid = 0
        self.agent_started: int | None = None
        self.mounted = False
        # Set before start/restart: more agent configuration ({section: {key: value}}, e.g.
        # {"agent": {"resume_on_start": "false"}}) and environment (STRATA_TEST_CRASH_AT=...).
        self.config_extra: dict[str, dict[str, str]] = {}
        self.agent_env: dict[str, str] = {}

    @property
    def sanlock_env(self) -> dict[str, str]:
        return sanlockd.client_env(os.path.join(self.dir, "sanlock"))

    @property
    def env(self) -> dict[str, str]:
        """The environment of this host's processes: its sanlock daemon, this checkout's code."""
        return {**os.environ, **self.sanlock_env, "PYTHONPATH": ROOT}

    # -- life --------------------------------------------------------------------------------------

    def start(self, agent: bool = True, mount: bool = False) -> None:
        """Boot the host: a fresh namespace, its sanlock daemon, optionally the harness's FUSE mount
        of the volume at ``mountpoint``, and its agent (which connects the repositories it
        remembers, as after a reboot)."""
        try:
            os.makedirs(os.path.join(self.dir, "glusterfs-log"), exist_ok=True)
            os.makedirs(self.run_dir, exist_ok=True)
            self.ns = namespace.Namespace()
            # The FUSE client logs to /var/log/glusterfs by default: this host's own, here.
            self.ns.run(["mount", "--bind", os.path.join(self.dir, "glusterfs-log"),
                         "/var/log/glusterfs"], check=False)
            self.sanlock = sanlockd.Daemon(os.path.join(self.dir, "sanlock"), self.name,
                                           prefix=self.ns.command([]))
            self.sanlock.start()
            if mount:
                self.mount()
            if agent:
                self.start_agent()
        except BaseException:
            self.stop()
            raise

    def write_config(self) -> None:
        sections: dict[str, dict[str, str]] = {
            "host": {"id": str(self.id)}, "rpc": {"socket": self.socket},
            "agent": {"state_dir": os.path.join(self.dir, "state")}}
        if _agent_has("run_dir"):  # (the key is new: an older agent would refuse it)
            sections["agent"]["run_dir"] = self.run_dir
        for section, keys in self.config_extra.items():
            sections.setdefault(section, {}).update(keys)
        with open(self.config, "w") as f:
            for section, keys in sections.items():
                f.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n")

    def start_agent(self, timeout: float = 30.0) -> None:
        assert self.ns is not None
        self.write_config()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        with open(os.path.join(self.dir, "agent.log"), "ab") as log:
            self.agent = subprocess.Popen(
                self.ns.command([self.python, "-m", "rpc.main", "--config", self.config]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**self.env, **self.agent_env}, cwd=ROOT,
                start_new_session=True)
        self.agent_pid = self.agent.pid
        self.agent_started = namespace.start_time(self.agent_pid)
        proc = self.agent
        if not transport.wait_for_socket(self.socket, timeout, lambda: proc.poll() is None):
            raise AssertionError(f"{self.name}'s agent did not listen (exit {proc.poll()}): "
                                 f"{self.read_log()}")

    def read_log(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "agent.log"),
                                                errors="replace") as f:
            return f.read()[-4000:]
        return ""

    def mount(self) -> None:
        """The harness's own FUSE mount of the volume at ``mountpoint`` (before the agent mounts
        a glusterfs-1.0 repository itself, and for tests of the harness)."""
        assert self.ns is not None
        gluster.mount(self.ns, self.volume, self.mountpoint,
                      os.path.join(self.dir, "glusterfs-log", "harness-mount.log"))
        self.mounted = True

    def restart(self, agent: bool = True) -> None:
        """Boot again after ``kill`` (or ``stop``): same host id, sanlock name, state."""
        self.start(agent=agent, mount=self.mounted)

    def kill(self) -> None:
        """A host death: SIGKILL to everything it runs (agent, its children, sanlock daemon, FUSE
        client) at once; its namespace and mounts vanish with it."""
        if self.ns is not None:
            self.ns.signal_all(signal.SIGKILL)
            self.ns.signal_all(signal.SIGCONT)
            self.ns.stop_all(grace=0)
            self.ns.kill_holder()
            self.ns = None
        self._reap()

    def _reap(self) -> None:
        for proc in (self.agent, self.sanlock.proc if self.sanlock else None):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)

    def freeze(self) -> list[int]:
        """SIGSTOP to everything the host runs (its FUSE client too: do not touch its mount
        from the test until ``thaw``)."""
        assert self.ns is not None
        return self.ns.freeze()

    def thaw(self) -> list[int]:
        assert self.ns is not None
        return self.ns.signal_all(signal.SIGCONT)

    def cut_storage(self) -> list[int]:
        """Kill the host's GlusterFS FUSE clients: its mounts of the volume fail from then on
        (ECONNABORTED, then ENOTCONN), as when a host loses its storage network."""
        assert self.ns is not None
        pids = gluster.fuse_clients(self.ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def stop(self) -> None:
        """An orderly shutdown: the agent (SIGTERM), sanlock, the FUSE mounts, the namespace."""
        if self.ns is None:
            self._reap()
            return
        self.ns.signal_all(signal.SIGCONT)  # a frozen host must be able to die
        if namespace.alive(self.agent_pid, self.agent_started):
            os.kill(self.agent_pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while namespace.alive(self.agent_pid, self.agent_started) and (
                    time.monotonic() < deadline):
                if self.agent is not None:
                    self.agent.poll()
                time.sleep(0.05)
        if self.sanlock is not None:
            self.sanlock.stop()
        if self.ns.alive:
            for mnt in self.fuse_mounts():
                self.ns.run(["umount", "-l", mnt], check=False)
        self.ns.close()
        self.ns = None
        self._reap()

    def fuse_mounts(self) -> list[str]:
        """Mount points of GlusterFS inside the host."""
        assert self.ns is not None
        try:
            with open(f"/proc/{self.ns.holder}/mounts") as f:
                rows = [line.split() for line in f]
        except OSError:
            return []
        return [r[1].replace("\\040", " ") for r in rows if r[2] == "fuse.glusterfs"]

    # -- use ---------------------------------------------------------------------------------------

    def path(self, path: str) -> str:
        """``path`` as this host sees it (through its own mounts), from the test process."""
        assert self.ns is not None
        return self.ns.path(path)

    def command(self, argv: Sequence[str]) -> list[str]:
        assert self.ns is not None
        return self.ns.command(argv)

    def run(self, argv: Sequence[str], check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command on this host, with its sanlock daemon's environment."""
        assert self.ns is not None
        return self.ns.run(argv, check=check, timeout=timeout, env=self.env)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(argv), env=self.env, text=True, **kw)

    def client(self) -> transport.Client:
        return transport.Client(socket_path=self.socket)

    def call(self, method: str, *args: Any, **params: Any) -> Any:
        return transport.call_once(self.socket, method, *args, **params)

    # -- state for another process -----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"id": self.id, "dir": os.path.dirname(self.dir), "mounted": self.mounted,
                "agent": [self.agent_pid, self.agent_started],
                "sanlock": [self.sanlock.pid, namespace.start_time(self.sanlock.pid)]
                if self.sanlock is not None and self.sanlock.proc is not None else None,
                "ns": self.ns.state() if self.ns is not None else None}

    @classmethod
    def from_state(cls, state: dict[str, Any], volume: gluster.Volume) -> Host:
        h = cls(state["dir"], state["id"], volume)
        h.mounted = state["mounted"]
        h.agent_pid, h.agent_started = state["agent"]
        h.ns = namespace.Namespace(state["ns"]) if state["ns"] else None
        return h


class Cluster:
    """A volume and ``hosts`` simulated hosts under ``directory``."""

    def __init__(self, directory: str, hosts: int = 3, python: str = sys.executable,
                 direct_io: bool = False) -> None:
        self.dir = os.path.abspath(directory)
        self.volume = gluster.Volume(os.path.join(self.dir, "gluster"), direct_io=direct_io)
        self.hosts = [Host(self.dir, i, self.volume, python) for i in range(1, hosts + 1)]

    def start(self, agents: bool = True, mount: bool = False) -> None:
        try:
            self.volume.start()
            for h in self.hosts:
                h.start(agent=agents, mount=mount)
        except BaseException:
            self.stop()
            raise

    def connect_repository(self, io_timeout: int = 1) -> None:
        connect_repository(self.hosts, self.volume, io_timeout)

    def stop(self) -> None:
        errors = []
        for h in self.hosts:
            try:
                h.stop()
            except Exception as e:  # the other hosts and the volume still go down
                errors.append(f"{h.name}: {e}")
        self.volume.stop()
        if errors:
            raise AssertionError("; ".join(errors))

    def state(self) -> dict[str, Any]:
        return {"dir": self.dir, "volume": self.volume.state(),
                "hosts": [h.state() for h in self.hosts]}

    def write_state(self) -> None:
        path = os.path.join(self.dir, STATE_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(self.state(), f, indent=1)
        os.rename(path + ".tmp", path)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Cluster:
        c = cls(state["dir"], 0)
        c.volume = gluster.Volume.from_state(state["volume"])
        c.hosts = [Host.from_state(h, c.volume) for h in state["hosts"]]
        return c


def has_driver() -> bool:
    """Whether this checkout's agent has the glusterfs-1.0 repository format."""
    with open(os.path.join(ROOT, "rpc", "openrpc.json")) as f:
        return f'"{REPO_FORMAT}"' in f.read()


def _joining(lockspace: Any) -> bool:
    state = lockspace.get("state") if isinstance(lockspace, dict) else lockspace
    if state == "failed":
        raise AssertionError(f"the lockspace failed: {lockspace}")
    return state != "joined"


def wait_joined(h: Host, repo_id: str = REPO_ID, timeout: float = 60) -> None:
    """Wait until host ``h`` has joined the lockspace of ``repo_id`` (a failure is an error)."""
    deadline = time.monotonic() + timeout
    while True:
        [r] = [r for r in h.call("listStorageRepositories") if r["repoId"] == repo_id]
        if not _joining(r.get("lockspace")):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{h.name} did not join the lockspace: {r.get('lockspace')}")
        time.sleep(0.2)


def connect_repository(hosts: Sequence[Host], volume: gluster.Volume, io_timeout: int = 1,
                       join_timeout: float = 60) -> None:
    """Format a glusterfs-1.0 repository on ``volume`` (once, from the first host) and connect it
    as ``shared`` on every host; wait until each host joined its lockspace."""
    params = volume.params
    hosts[0].call("formatStorageRepository", REPO_FORMAT, params, {"ioTimeout": io_timeout})
    for h in hosts:
        h.call("connectStorageRepository", REPO_ID, REPO_FORMAT, params, {})
    deadline = time.monotonic() + join_timeout
    for h in hosts:
        while _joining(lockspace := h.call("getStorageRepositoryInfo", REPO_ID).get("lockspace")):
            if time.monotonic() > deadline:
                raise AssertionError(f"{h.name} did not join the lockspace: {lockspace}")
            time.sleep(0.2)


def _stop_recorded(host: Host, state: dict[str, Any]) -> None:
    """``down`` from another process: no Popen objects, only recorded pids."""
    if host.ns is not None:
        host.ns.signal_all(signal.SIGCONT)
    namespace.signal_pid(host.agent_pid, host.agent_started, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while namespace.alive(host.agent_pid, host.agent_started) and time.monotonic() < deadline:
        time.sleep(0.05)
    if state["sanlock"]:
        pid, started = state["sanlock"]
        if namespace.alive(pid, started):
            subprocess.run([sanlockd.SANLOCK, "client", "shutdown", "-f", "1"],
                           env={**os.environ, **host.sanlock_env}, capture_output=True,
                           timeout=10, check=False)
    if host.ns is not None:
        if host.ns.alive:
            for mnt in host.fuse_mounts():
                host.ns.run(["umount", "-l", mnt], check=False)
        host.ns.close()


def up(directory: str, hosts: int, repository: bool, python: str) -> int:
    state_path = os.path.join(directory, STATE_FILE)
    if os.path.exists(state_path):
        print(f"a cluster is already up in {directory}: tear it down first "
              f"(make cluster-down, or python -m tests.cluster down --dir {directory})",
              file=sys.stderr)
        return 1
    reason = gluster.missing()
    if reason:
        print(f"cannot bring a cluster up here: {reason}", file=sys.stderr)
        return 1
    os.makedirs(directory, exist_ok=True)
    for entry in os.listdir(directory):  # a previous cluster's files only
        if entry == "gluster" or entry.startswith("host"):
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
    c = Cluster(directory, hosts, python)
    t0 = time.monotonic()
    c.volume.start()
    c.write_state()
    t1 = time.monotonic()
    print(f"GlusterFS volume {c.volume.source} up in {t1 - t0:.1f} s "
          f"(brick {c.volume.image}, logs {c.volume.dir}/log)")
    try:
        for h in c.hosts:
            h.start()
            c.write_state()
        t2 = time.monotonic()
        print(f"{hosts} hosts up in {t2 - t1:.1f} s")
        note = ""
        if not repository or not has_driver():
            for h in c.hosts:
                h.mount()
            c.write_state()
            note = ("the volume is mounted in each host's namespace at hostN/mnt" if not repository
                    else f"this agent has no {REPO_FORMAT} repository format yet: the volume is "
                    "mounted in each host's namespace at hostN/mnt instead")
        else:
            try:
                c.connect_repository()
            except transport.RemoteError as e:
                print(f"the {REPO_FORMAT} repository could not be connected: {e} "
                      f"(see {directory}/hostN/agent.log); tearing down", file=sys.stderr)
                c.stop()
                os.unlink(state_path)
                return 1
            note = (f'repository "{REPO_ID}" ({REPO_FORMAT}, {json.dumps(c.volume.params)}) '
                    "connected on every host")
    except BaseException:
        c.stop()
        os.unlink(state_path)
        raise
    for h in c.hosts:
        print(f"{h.name}  id {h.id}  socket {h.socket}")
        print(f"       strata-client --socket {h.socket} listStorageRepositories")
    if note:
        print(note)
    print(f"logs: {directory}/hostN/agent.log; tear down: make cluster-down "
          f"(python -m tests.cluster down --dir {directory})")
    return 0


def down(directory: str) -> int:
    state_path = os.path.join(directory, STATE_FILE)
    try:
        with open(state_path) as f:
            state = json.load(f)
    except FileNotFoundError:
        print(f"no cluster is up in {directory}", file=sys.stderr)
        return 0
    t0 = time.monotonic()
    c = Cluster.from_state(state)
    for h, hs in zip(c.hosts, state["hosts"], strict=True):
        _stop_recorded(h, hs)
    c.volume.stop()
    os.unlink(state_path)
    print(f"cluster in {directory} down in {time.monotonic() - t0:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="bring a volume and N hosts up")
    u.add_argument("--hosts", type=int, default=3)
    u.add_argument("--dir", required=True)
    u.add_argument("--no-repository", action="store_true",
                   help="do not format and connect a glusterfs-1.0 repository; mount the volume "
                        "in each host instead")
    u.add_argument("--python", default=sys.executable, help="the agents' interpreter")
    d = sub.add_parser("down", help="tear down what up brought up, by pid")
    d.add_argument("--dir", required=True)
    args = p.parse_args(argv)
    directory = os.path.abspath(args.dir)
    if args.command == "up":
        if not 1 <= args.hosts <= 2000:
            p.error("--hosts: from 1 to 2000")
        return up(directory, args.hosts, not args.no_repository, args.python)
    return down(directory)


if __name__ == "__main__":
    sys.exit(main())
