"""``strata-agent``: the daemon's entry point.

    strata-agent [--config FILE] [--show-config]
    strata-agent --dev DIR        everything under DIR, a localfs repository connected as "default"

SIGTERM/SIGINT: stop accepting, let calls in flight finish, interrupt running operations so that
they stay resumable (exactly as after a crash), exit 0.
"""

from __future__ import annotations

import argparse
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
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> agent_config.Config:
    if args.dev:
        return agent_config.dev(os.path.abspath(args.dev))
    path = args.config
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return agent_config.load(path)


def dev_repository(api: agent_api.Api, directory: str) -> None:
    params = {"path": os.path.join(os.path.abspath(directory), "repos", DEV_REPO_ID)}
    if not os.path.exists(os.path.join(params["path"], "repository.json")):
        api.formatStorageRepository("localfs-1.0", params, {})
    api.connectStorageRepository(DEV_REPO_ID, "localfs-1.0", params, {})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
    except errors.Error as e:
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
                        cfg.agent.max_chain_depth, cfg.agent.request_ttl)
    try:
        api.restore_connections()
        if args.dev:
            dev_repository(api, args.dev)
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
