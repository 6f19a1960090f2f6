"""``strata-agent``: the daemon's entry point.

    strata-agent [--config FILE] [--show-config] [--no-resume]
    strata-agent --dev DIR        everything under DIR, a localfs repository connected as "default"

At start the agent connects the repositories it remembers (and, with --dev, DIR/repos/default),
then takes up again the operations that were running when it stopped or died ([agent]
resume_on_start, default true; --no-resume leaves them all for a mend fix).

SIGTERM/SIGINT: stop accepting, let calls in flight finish, interrupt running operations so that
they stay resumable (exactly as after a crash), exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys

import gevent
import gevent.event

from agent import api as agent_api
from agent import config as agent_config
from agent import errors, logsetup
from rpc import sdnotify, server

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "/etc/strata/agent.conf"
DEV_REPO_ID = "default"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="strata-agent", description="Strata storage agent")
    p.add_argument("--config", metavar="FILE",
                   help=f"configuration file (default {DEFAULT_CONFIG} when it exists); "
                   "conf.d/*.conf beside it are read after it")
    p.add_argument("--dev", metavar="DIR",
                   help="development mode: socket, state and a 'default' repository under DIR")
    p.add_argument("--show-config", action="store_true",
                   help="print the effective configuration and exit")
    p.add_argument("--no-resume", action="store_true",
                   help="do not take up interrupted operations at start (as [agent] "
                   "resume_on_start = false): each waits for a mend fix")
    return p.parse_args(argv)


class UsageError(Exception):
    """Arguments that do not go together: exit 2."""


def load_config(args: argparse.Namespace) -> agent_config.Config:
    if args.dev and args.config:
        # --dev makes its whole configuration from DIR; reading FILE too would leave the reader
        # guessing which of the two sets the socket and the state directory.
        raise UsageError("--dev and --config do not go together: --dev DIR puts the socket, "
                         "the state and a 'default' repository under DIR with every other key "
                         "at its default; use --config FILE alone to set keys")
    if args.dev:
        cfg = agent_config.dev(os.path.abspath(args.dev))
    else:
        path = args.config
        if path is None and os.path.exists(DEFAULT_CONFIG):
            path = DEFAULT_CONFIG
        cfg = agent_config.load(path)
    if args.no_resume:
        cfg = dataclasses.replace(
            cfg, agent=dataclasses.replace(cfg.agent, resume_on_start=False)
        )
    return cfg


def dev_repository(api: agent_api.Api, directory: str) -> None:
    params = {"path": os.path.join(os.path.abspath(directory), "repos", DEV_REPO_ID)}
    if not os.path.exists(os.path.join(params["path"], "repository.json")):
        api.formatStorageRepository("localfs-1.0", params, {})
    api.connectStorageRepository(DEV_REPO_ID, "localfs-1.0", params, {})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
    except (errors.Error, UsageError) as e:
        print(f"strata-agent: {e}", file=sys.stderr)
        return 2
    if args.show_config:
        sys.stdout.write(agent_config.dump(cfg))
        return 0
    try:
        logsetup.setup(cfg.log.level, cfg.log.file)
        os.makedirs(cfg.agent.state_dir, exist_ok=True)
    except OSError as e:
        print(f"strata-agent: {e}", file=sys.stderr)
        return 2
    api = agent_api.Api(cfg.host.id, cfg.agent.workers, cfg.agent.state_dir,
                        cfg.agent.max_chain_depth, cfg.agent.request_ttl, cfg.agent.run_dir,
                        cfg.agent.quick_workers)
    try:
        api.restore_connections()
        if args.dev:
            dev_repository(api, args.dev)
        # Once every repository is back: a copy resumed in one may read from another.
        if cfg.agent.resume_on_start:
            api.resume_interrupted()
        else:
            log.info("event=resume_off reason=%r", "resume_on_start is false: run the mend fixes")
        srv = server.Server(cfg, api)
        srv.start()
    except (errors.Error, OSError) as e:
        log.error("event=start_failed error=%r", str(e))
        print(f"strata-agent: {e}", file=sys.stderr)
        api.close()
        return 1

    stopping = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stopping.set)
    sdnotify.notify("READY=1")
    log.info("event=ready host_id=%d pid=%d", cfg.host.id, os.getpid())
    print(f"strata-agent: ready, socket {cfg.rpc.socket}", file=sys.stderr, flush=True)
    stopping.wait()

    sdnotify.notify("STOPPING=1")
    log.info("event=stopping")
    srv.stop()
    api.close()
    log.info("event=stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
