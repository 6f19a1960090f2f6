"""Figures 13 and 14: thin creates from many clients at once, and beside running copies.

13. Throughput of thin createVirtualDisk (1 GiB, on an empty snapshot) with 1, 4 and 16
    clients at once, each create followed to optimized (getImageStatus on the client's own
    keep-alive connection) before its client makes the next; against the same number of
    parallel workers each running bare ``qemu-img create -b`` one after another (no fsync, no
    journal). Runs alternate, medians of them.
14. Time to optimized of one thin create at a time while 8 copies (1 GiB of data each) run in
    the same repository; against the same creates with nothing else running, in the same run.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable

from bench import agentproc, context, stats, tools
from bench.tools import GiB

DEFAULT = agentproc.DEFAULT
CLIENTS = (1, 4, 16)
THROUGHPUT_TARGET = 1.5  # x bare parallel qemu-img create -b, at 16 clients
BUSY_TARGET = 0.050  # s, p50 of a thin create to optimized while 8 copies run
COPIES = 8
# A poll every 2 ms: a client that learns of optimized within a few ms, without 16 clients'
# polls (a 1 ms poll each) taking the cores the creates need.
POLL = 0.002


def _parallel(n: int, job: Callable[[int], None]) -> float:
    """Run job(i) for i in range(n) on n threads, started together; the wall time."""
    ready = threading.Barrier(n + 1)

    def run(i: int) -> None:
        ready.wait()
        job(i)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(run, i) for i in range(n)]
        ready.wait()
        t0 = time.perf_counter()
        for f in futures:
            f.result()
        return time.perf_counter() - t0


def throughput(b: context.Bench) -> None:
    """13. Thin creates to optimized per second with 1, 4, 16 clients, against bare parallel
    qemu-img create -b."""
    agent = b.agent
    snap = b.images.empty_snapshot(GiB)
    base = b.images.bare_base(GiB, data=False)
    per_client = 8 if b.quick else 20
    clients = {n: [agent.client() for _ in range(n)] for n in CLIENTS}
    try:
        def strata(n: int) -> Callable[[], float]:
            def run() -> float:
                def job(i: int) -> None:
                    c = clients[n][i]
                    for _ in range(per_client):
                        agent.timed(DEFAULT, "createVirtualDisk", client=c, interval=POLL,
                                    targetRepoId=DEFAULT, size=GiB, baseSnapshotId=snap)
                return n * per_client / _parallel(n, job)
            return run

        def bare(n: int) -> Callable[[], float]:
            def run() -> float:
                def job(i: int) -> None:
                    for _ in range(per_client):
                        b.images.bare_overlay(base, GiB)
                return n * per_client / _parallel(n, job)
            return run

        rounds = b.reps(6)
        results: dict[int, tuple[list[float], list[float]]] = {}
        for n in CLIENTS:
            b.say(f"13: {n} client(s) x {per_client} thin creates, {rounds} pairs")
            results[n] = stats.alternate(rounds, strata(n), bare(n))
    finally:
        for cs in clients.values():
            for c in cs:
                c.close()
    medians = {n: stats.Samples(s, stats.CALLS_PER_S).median for n, (s, _) in results.items()}
    pairs = zip(CLIENTS, CLIENTS[1:], strict=False)
    rising = all(medians[a] <= medians[c] * 1.05 for a, c in pairs)
    for n, (s, r) in results.items():
        ratio = stats.pair_ratio(s, r)  # rates: Strata's over bare's
        last = n == CLIENTS[-1]
        b.compare(f"14 thin createVirtualDisk to optimized, {n} client(s): throughput",
                  stats.Samples(s, stats.CALLS_PER_S), stats.Samples(r, stats.CALLS_PER_S),
                  f"bare qemu-img create -b, {n} parallel", ratio,
                  "≥ 1.5× bare, rising with clients" if last else "info",
                  (ratio >= THROUGHPUT_TARGET and rising) if last else None,
                  note=("Strata's medians by clients: "
                        + ", ".join(f"{k}: {v:.0f}/s" for k, v in medians.items()))
                  if last else "")


def busy(b: context.Bench) -> None:
    """14. A thin create to optimized while 8 copies run in its repository, against idle."""
    agent = b.agent
    repo_id, path = "busy", b.path("repos", "busy")
    agent.add_repo(repo_id, path)
    try:
        disk = agent.settled(repo_id, "createVirtualDisk", targetRepoId=repo_id, size=GiB)
        agent.write(repo_id, disk, tools.span(0, GiB, 0x5A))
        empty = agent.settled(repo_id, "createVirtualDisk", targetRepoId=repo_id, size=GiB)
        snap = agent.settled(repo_id, "createSnapshot", targetRepoId=repo_id,
                             baseVirtualDiskId=empty)

        def create() -> float:
            _, _, took = agent.timed(repo_id, "createVirtualDisk", targetRepoId=repo_id,
                                     size=GiB, baseSnapshotId=snap)
            return took

        idle: list[float] = []
        loaded: list[float] = []
        rounds = b.reps(3)
        for k in range(rounds):
            idle.extend(create() for _ in range(20))
            b.say(f"14: round {k + 1}/{rounds}: {COPIES} copies of 1 GiB, creates meanwhile")
            copies = [agent.call("copyImage", targetRepoId=repo_id, imageId=disk)
                      for _ in range(COPIES)]
            # Creates for as long as the last copy runs (never after: that is idle again).
            while True:
                took = create()
                states = [agent.call("getImageStatus", repo_id, c) for c in copies]
                if all(s["status"] == "optimized" and not s["running"] for s in states):
                    break
                loaded.append(took)
            for c in copies:
                agent.call("removeImage", repositoryId=repo_id, imageId=c)
        if not loaded:
            raise context.BenchError("the copies ended before a single create did")
        s = stats.Samples(loaded, stats.SECONDS)
        p50 = s.median
        b.compare(f"15 thin createVirtualDisk to optimized while {COPIES} copies run (p50)",
                  s, stats.Samples(idle, stats.SECONDS), "Strata, nothing else running",
                  p50 / stats.Samples(idle, stats.SECONDS).median, "≤ 50 ms p50",
                  p50 <= BUSY_TARGET,
                  note=f"{len(loaded)} creates during the copies, p95 "
                       f"{stats.fmt(stats.percentile(loaded, 95), stats.SECONDS)}")
    finally:
        agent.drop_repo(repo_id, path)
