"""The cluster of figures 9-12: a real GlusterFS volume and two simulated hosts, made on first use.

It is the multi-host tests' harness itself (``tests/cluster.py``, ``tests/gluster.py``): a
single-brick volume on 127.0.0.x in a private mount namespace, and hosts each with its own
namespace, sanlock daemon and strata-agent, all connected to one ``glusterfs-1.0`` repository
``shared`` (io_timeout 1, as the multi-host tests use). Host 1's agent also has a ``localfs-1.0``
repository ``local`` on this machine's disk (the disk the brick's file lives on): figures that
compare the two formats call one agent, with one configuration, on one connection.

Every process the cluster starts is stopped by pid when the benchmark ends (Cluster.stop, on the
benchmark's cleanup stack), its mounts unmounted and the brick's loop device detached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from agent.repo import glusterfs
from bench import agentproc, context, tools
from tests import cluster, gluster

SHARED = cluster.REPO_ID  # "shared": the glusterfs-1.0 repository on every host
LOCAL = "local"  # host 1's localfs-1.0 repository
IO_TIMEOUT = 1  # seconds: sanlock's, as the multi-host tests use (a takeover then takes ~70 s)
HOSTS = 2
VOLUME_GIB = 20  # the brick's sparse file: figure 10 holds at most 3 copies of 3 GiB at once


class Unavailable(Exception):
    """The cluster cannot run on this machine (not root, GlusterFS not installed)."""


class Shared:
    def __init__(self, b: context.Bench) -> None:
        self.b = b
        self.cluster: cluster.Cluster | None = None
        self.agents: list[agentproc.Agent] = []
        self.failed = ""
        self.unavailable = ""
        self.source: str | None = None  # figures 10 and 12: a disk of 3 GiB of data in SHARED
        self._floor: dict[str, list[float]] | None = None

    @property
    def hosts(self) -> list[cluster.Host]:
        assert self.cluster is not None
        return self.cluster.hosts

    def start(self) -> None:
        reason = gluster.missing()
        if reason:
            raise Unavailable(reason)
        # The brick's loop device writes straight to the disk (gluster.Volume direct_io): with a
        # page cache of its own, the kernel wrote a run's 3 GiB back during the next run,
        # whichever side that was (figure 10's runs then ranged over ±30%).
        c = cluster.Cluster(self.b.dir("cluster"), HOSTS, direct_io=True)
        t0 = time.monotonic()
        c.start()  # stops what it started when it fails
        self.cluster = c
        self.b.cleanup.callback(self.stop)
        c.connect_repository(IO_TIMEOUT)
        self.agents = [agentproc.Agent(h.dir) for h in c.hosts]  # clients of the hosts' agents
        self.agents[0].add_repo(LOCAL, self.b.dir("cluster-local"))
        self.b.say(f"GlusterFS volume {c.volume.source} and {HOSTS} hosts up, repository "
                   f"{SHARED!r} joined on each, in {time.monotonic() - t0:.0f} s")

    def stop(self) -> None:
        for a in self.agents:
            a.stop()  # closes its client: the host's agent is the cluster's to stop
        if self.cluster is not None:
            self.b.say("stopping the cluster")
            self.cluster.stop()
            self.cluster = None

    # -- what a figure needs of a host -------------------------------------------------------------

    def root(self, host: cluster.Host) -> str:
        """The shared repository's mount point, as the host (and its processes) see it."""
        assert self.cluster is not None
        return glusterfs.GlusterRepository.location(self.cluster.volume.params, host.run_dir)

    def scratch(self, host: cluster.Host) -> str:
        """A directory of the benchmark's own on the shared mount, as the host sees it (bare
        tools write there; no record names it)."""
        path = os.path.join(self.root(host), "bench-scratch")
        os.makedirs(host.path(path), exist_ok=True)
        return path

    def restart(self, host: cluster.Host, timeout: float = 60.0) -> None:
        """Boot a killed host again and wait until its agent, which connects the repositories it
        remembers, has joined the shared repository's lockspace again."""
        host.restart()
        agent = self.agents[self.hosts.index(host)]
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = agent.call("getStorageRepositoryInfo", SHARED)["lockspace"]
            except Exception:  # not connected yet: its agent connects after it listens
                state = None
            if isinstance(state, dict) and state.get("state") == "joined" or state == "joined":
                return
            if time.monotonic() > deadline:
                raise context.BenchError(f"{host.name} did not join again: {state}")
            time.sleep(0.2)

    def helper(self, host: cluster.Host, mode: str, rounds: int) -> dict[str, Any]:
        """``bench/leasehelper.py`` in a process of the host (its namespace, its sanlock daemon)
        on the shared repository's lockspace; its JSON answer."""
        repo_uuid = self.agents[self.hosts.index(host)].call(
            "getStorageRepositoryInfo", SHARED)["repoUUID"]
        proc = subprocess.run(
            host.command([sys.executable, "-m", "bench.leasehelper", mode, self.root(host),
                          repo_uuid, str(host.id), str(IO_TIMEOUT), str(rounds)]),
            env=host.env, cwd=context.ROOT, capture_output=True, text=True, timeout=600,
            check=False)
        if proc.returncode != 0:
            raise context.BenchError(f"the lease helper failed ({proc.returncode}): "
                                     f"{proc.stderr.strip()[-500:]}")
        out: dict[str, Any] = json.loads(proc.stdout)
        return out

    def floor(self) -> dict[str, list[float]]:
        """What a call must do on the shared mount without an agent (leasehelper's ``floor``),
        measured once on host 1: the base of figures 9 and 11's targets."""
        if self._floor is None:
            n = self.b.reps(30)
            self.b.say(f"the floor on the shared mount (no agent), {n} rounds on host 1")
            self._floor = self.helper(self.hosts[0], "floor", n)
        return self._floor

    def run(self, host: cluster.Host, argv: Sequence[str], timeout: float = 900.0) -> float:
        """A bare command inside the host (its mounts); its wall time, as tools.run."""
        return tools.run(host.command(argv), timeout=timeout)

    def write(self, agent: agentproc.Agent, host: cluster.Host, repo: str, image_id: str,
              chunks: list[tools.Chunk]) -> None:
        """Write into a disk as a consumer on the host does: prepare, qemu-io, tear down."""
        path: str = agent.call("prepareImage", repositoryId=repo, imageId=image_id)["path"]
        try:
            argv = [tools.QEMU_IO, "-t", "none", "-f", "qcow2"]
            for off, length, pattern in chunks:
                argv += ["-c", f"write -q -P {pattern} {off} {length}"]
            self.run(host, [*argv, path])
        finally:
            agent.call("teardownImage", repositoryId=repo, imageId=image_id)

    def remove(self, agent: agentproc.Agent, repo: str, image_ids: Sequence[str]) -> None:
        """Remove images and run the clean fixes that reclaim their bytes."""
        for image_id in image_ids:
            agent.call("removeImage", repositoryId=repo, imageId=image_id)
        for fix in agent.call("checkStorageRepository", repo, {"types": ["clean"]}):
            agent.call("fixStorageRepository", repo, fix)


def get(b: context.Bench) -> Shared:
    """The benchmark's cluster, started on first use (a failed start is not retried)."""
    if b.shared is None:
        b.shared = Shared(b)
        try:
            b.shared.start()
        except Unavailable as e:
            b.shared.unavailable = str(e)
            raise
        except Exception as e:
            b.shared.failed = f"{type(e).__name__}: {e}"[:300]
            raise
    if b.shared.unavailable:
        raise Unavailable(b.shared.unavailable)  # every figure of the cluster says skip
    if b.shared.failed:
        raise context.BenchError(f"the cluster did not come up: {b.shared.failed}")
    return b.shared


def fix_for(fixes: list[dict[str, Any]], kind: str, image_id: str) -> dict[str, Any] | None:
    for f in fixes:
        if f.get("type") == kind and image_id in f.get("imageIds", []):
            return f
    return None

