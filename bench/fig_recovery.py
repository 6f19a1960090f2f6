"""Figure 13: recovering pending operations after a kill -9, and calls made beside them.

A real agent of its own (bench/agentproc.py) makes N thin disks from one snapshot with
``AutoFix=false`` (their intents committed, nothing run), is killed with SIGKILL and started
again; then they are recovered, each way timed from its first call until every image is
optimized:

- ``--all``: ``strata-client fixStorageRepository repositoryId=default --all``, the process;
- one fix per call: checkStorageRepository once, then one fixStorageRepository per fix on a
  keep-alive connection, then waitForOperations on all of them.

The reference is the same N creates taking their normal path in the same run (createVirtualDisk
with AutoFix on, one after the other on a keep-alive connection, until all are optimized).
Linearity: ``--all`` of N/4 operations, per operation, against N.

Beside N pending operations, prepareImage, createSnapshot and removeImage of another disk are
timed against the same calls in a second, idle repository of the same agent, alternated round
by round (medians).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from bench import agentproc, context, stats
from bench.tools import GiB

DEFAULT = agentproc.DEFAULT
IDLE = "idle"
RECOVERY_TARGET = 2.0  # x the same creates
LINEAR_TARGET = 1.5  # per operation at N against N/4
BESIDE_TARGET = 1.5  # x idle
WAIT_CHUNK = 1000  # image ids per waitForOperations


def run(b: context.Bench) -> None:
    n = 200 if b.quick else 1000
    agent = agentproc.Agent(b.path("recovery-agent", "dev"))
    agent.start()
    b.cleanup.callback(agent.stop)
    try:
        _measure(b, agent, n)
    finally:
        agent.stop()


def _snapshot(agent: agentproc.Agent, repo: str) -> str:
    disk = agent.settled(repo, "createVirtualDisk", targetRepoId=repo, size=GiB)
    return agent.settled(repo, "createSnapshot", targetRepoId=repo, baseVirtualDiskId=disk)


def _wait_all(agent: agentproc.Agent, images: list[str]) -> None:
    """Until every image is optimized (waitForOperations: no polling)."""
    left = list(images)
    while left:
        chunk = left[:WAIT_CHUNK]
        statuses = agent.call("waitForOperations", repositoryId=DEFAULT, imageIds=chunk,
                              options={"timeout": 10})
        for image_id, status in zip(chunk, statuses, strict=True):
            if status is None or status.get("last_error"):
                raise context.BenchError(f"image {image_id} did not recover: {status}")
        done = {i for i, s in zip(chunk, statuses, strict=True)
                if s["status"] == "optimized" and not s["running"]}
        if not done and not any(s["running"] for s in statuses):
            raise context.BenchError(f"images wait for nothing running: {statuses[:1]}")
        left = [i for i in left if i not in done]


def _pending(agent: agentproc.Agent, snap: str, n: int) -> list[str]:
    return [agent.call("createVirtualDisk", targetRepoId=DEFAULT, size=GiB, baseSnapshotId=snap,
                       options={"AutoFix": False}) for _ in range(n)]


def _kill_and_restart(agent: agentproc.Agent) -> None:
    assert agent.proc is not None
    agent.stop_client()
    agent.proc.kill()
    agent.proc.wait()
    agent.start()


def _cli_all(agent: agentproc.Agent) -> None:
    r = subprocess.run([sys.executable, "-m", "rpc.client", "-s", agent.socket,
                        "fixStorageRepository", "repositoryId=default", "--all"],
                       capture_output=True, text=True, timeout=3600, cwd=context.ROOT,
                       env={**os.environ, "PYTHONPATH": context.ROOT})
    if r.returncode != 0:
        raise context.BenchError(f"--all failed ({r.returncode}): {r.stdout[-500:]} "
                                 f"{r.stderr[-500:]}")


def _one_by_one(agent: agentproc.Agent) -> None:
    fixes = agent.call("checkStorageRepository", repositoryId=DEFAULT,
                       options={"types": ["mend"]})
    for fix in fixes:
        agent.call("fixStorageRepository", repositoryId=DEFAULT, fix=fix)


def _recover(agent: agentproc.Agent, snap: str, n: int,
             how: Callable[[agentproc.Agent], None]) -> float:
    images = _pending(agent, snap, n)
    _kill_and_restart(agent)
    t0 = time.perf_counter()
    how(agent)
    _wait_all(agent, images)
    took = time.perf_counter() - t0
    if agent.call("checkStorageRepository", repositoryId=DEFAULT, options={"types": ["mend"]}):
        raise context.BenchError("mends left after the recovery")
    return took


def _normal(agent: agentproc.Agent, snap: str, n: int) -> float:
    t0 = time.perf_counter()
    images = [agent.call("createVirtualDisk", targetRepoId=DEFAULT, size=GiB,
                         baseSnapshotId=snap) for _ in range(n)]
    _wait_all(agent, images)
    return time.perf_counter() - t0


def _beside(b: context.Bench, agent: agentproc.Agent, snaps: dict[str, str], n: int) -> None:
    """prepareImage, createSnapshot, removeImage with n operations pending in DEFAULT, against
    the same calls in the idle repository, alternated round by round."""
    times: dict[tuple[str, str], list[float]] = {}

    def timed(method: str, repo: str, fn: Callable[[], str]) -> str:
        t = time.perf_counter()
        got = fn()
        times.setdefault((method, repo), []).append(time.perf_counter() - t)
        return got

    def round_in(repo: str) -> None:
        disk = agent.settled(repo, "createVirtualDisk", targetRepoId=repo, size=GiB,
                             baseSnapshotId=snaps[repo])
        timed("prepareImage", repo, lambda: str(agent.call(
            "prepareImage", repositoryId=repo, imageId=disk)["path"]))
        agent.call("teardownImage", repositoryId=repo, imageId=disk)
        snap = timed("createSnapshot", repo, lambda: str(agent.call(
            "createSnapshot", targetRepoId=repo, baseVirtualDiskId=disk)))
        agent.wait(repo, snap)
        timed("removeImage", repo, lambda: str(agent.call(
            "removeImage", repositoryId=repo, imageId=snap)))

    rounds = b.reps(30)
    b.say(f"13: prepareImage/createSnapshot/removeImage beside {n} pending, {rounds} rounds")
    round_in(DEFAULT)
    round_in(IDLE)  # warm-up
    times.clear()
    for i in range(rounds):
        for repo in (DEFAULT, IDLE) if i % 2 == 0 else (IDLE, DEFAULT):
            round_in(repo)
    for method in ("prepareImage", "createSnapshot", "removeImage"):
        busy, idle = times[method, DEFAULT], times[method, IDLE]
        ratio = stats.pair_ratio(busy, idle)
        b.compare(f"13 {method} with {n} operations pending", stats.Samples(busy, stats.SECONDS),
                  stats.Samples(idle, stats.SECONDS), "the same, idle repository", ratio,
                  "≤ 1.5× idle", ratio <= BESIDE_TARGET)


def _measure(b: context.Bench, agent: agentproc.Agent, n: int) -> None:
    agent.add_repo(IDLE, b.dir("recovery-idle"))
    snaps = {repo: _snapshot(agent, repo) for repo in (DEFAULT, IDLE)}
    snap = snaps[DEFAULT]
    b.say(f"13: {n} creates, the normal path")
    normal = _normal(agent, snap, n)
    pending = _pending(agent, snap, n)
    _beside(b, agent, snaps, n)
    b.say(f"13: kill -9 with {n} pending, recovered by --all")
    _kill_and_restart(agent)
    t0 = time.perf_counter()
    _cli_all(agent)
    _wait_all(agent, pending)
    by_all = time.perf_counter() - t0
    b.say(f"13: kill -9 with {n} pending, recovered one fix per call")
    by_one = _recover(agent, snap, n, _one_by_one)
    quarter = max(1, n // 4)
    b.say(f"13: kill -9 with {quarter} pending, recovered by --all")
    by_all_quarter = _recover(agent, snap, quarter, _cli_all)
    normal_again = _normal(agent, snap, n)  # the reference once more, after: drift shows
    ref = stats.Samples([normal, normal_again], stats.SECONDS)
    for label, took in ((f"--all, {n} operations", by_all),
                        (f"one fix per call, {n} operations", by_one)):
        ratio = took / ref.median
        b.compare(f"13 recovery after kill -9: {label}", stats.Samples([took], stats.SECONDS),
                  ref, f"the same {n} creates, normal path", ratio, "≤ 2× the creates",
                  ratio <= RECOVERY_TARGET)
    per_n, per_quarter = by_all / n, by_all_quarter / quarter
    ratio = per_n / per_quarter
    b.compare(f"13 recovery by --all, per operation: {n} against {quarter}",
              stats.Samples([per_n], stats.SECONDS), stats.Samples([per_quarter], stats.SECONDS),
              f"per operation at {quarter}", ratio, "≤ 1.5× (linear)", ratio <= LINEAR_TARGET)
