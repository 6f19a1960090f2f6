"""Figures 1 and 2: thin createVirtualDisk and createSnapshot against a bare ``qemu-img create -b``.

Strata's time to return is the JSON-RPC call on a keep-alive connection over the Unix socket;
its time to optimized runs from sending the call until getImageStatus (polled every ~1 ms on
the same connection) says optimized with nothing running. The reference is the wall time of the
bare qemu-img process writing the same overlay on the same file system (no fsync).
"""

from __future__ import annotations

from collections.abc import Callable

from bench import agentproc, context, stats
from bench.tools import GiB, TiB

DEFAULT = agentproc.DEFAULT
RETURN_TARGET = 0.005  # 5 ms p50
OPTIMIZED_TARGET = 1.5  # x bare qemu-img create
SAME_TARGET = 0.10  # within 10%


def _rounds(n: int, same: list[Callable[[], None]], after: list[Callable[[], None]]) -> None:
    """One warm-up round, then n rounds of the ``same`` jobs (compared with each other), every
    other round in reverse order, then the ``after`` jobs. Each of the ``same`` jobs follows the
    other one half the time and an ``after`` job the other half: what ran just before (a bare
    qemu-img leaves writes for the next fsync to carry) weighs on both alike."""
    for job in same + after:
        job()
    for i in range(n):
        for job in same if i % 2 == 0 else list(reversed(same)):
            job()
        for job in after if i % 2 == 0 else list(reversed(after)):
            job()


def _rows(b: context.Bench, label: str, ret: list[float], opt: list[float],
          bare: list[float]) -> None:
    ref = stats.Samples(bare, stats.SECONDS)
    r = stats.Samples(ret, stats.SECONDS)
    b.compare(f"{label}: return (p50)", r, ref, "bare qemu-img create -b",
              stats.pair_ratio(ret, bare), "≤ 5 ms p50", r.median <= RETURN_TARGET)
    ratio = stats.pair_ratio(opt, bare)
    b.compare(f"{label}: time to optimized", stats.Samples(opt, stats.SECONDS), ref,
              "bare qemu-img create -b", ratio, "≤ 1.5× bare", ratio <= OPTIMIZED_TARGET)


def _same(b: context.Bench, label: str, a: list[float], ref: list[float],
          ref_label: str) -> None:
    ratio = stats.pair_ratio(a, ref)
    b.compare(label, stats.Samples(a, stats.SECONDS), stats.Samples(ref, stats.SECONDS),
              ref_label, ratio, "within 10%", abs(ratio - 1.0) <= SAME_TARGET)


def thin(b: context.Bench) -> None:
    """1. createVirtualDisk thin on a snapshot, 1 GiB and 1 TiB, against qemu-img create -b."""
    agent = b.agent
    sizes = {"1 GiB": GiB, "1 TiB": TiB}
    snaps = {label: b.images.empty_snapshot(size) for label, size in sizes.items()}
    bases = {label: b.images.bare_base(size, data=False) for label, size in sizes.items()}
    ret: dict[str, list[float]] = {label: [] for label in sizes}
    opt: dict[str, list[float]] = {label: [] for label in sizes}
    bare: dict[str, list[float]] = {label: [] for label in sizes}

    def strata(label: str) -> Callable[[], None]:
        def job() -> None:
            _, r, o = agent.timed(DEFAULT, "createVirtualDisk", targetRepoId=DEFAULT,
                                  size=sizes[label], baseSnapshotId=snaps[label])
            ret[label].append(r)
            opt[label].append(o)
        return job

    def reference(label: str) -> Callable[[], None]:
        def job() -> None:
            bare[label].append(b.images.bare_overlay(bases[label], sizes[label]))
        return job

    n = b.reps(60)  # the 10% check compares two fsync-bound times: many pairs, less jitter
    b.say(f"1: thin createVirtualDisk, {n} rounds")
    _rounds(n, [strata(label) for label in sizes], [reference(label) for label in sizes])
    for label in sizes:
        # Drop the warm-up round.
        ret[label], opt[label], bare[label] = ret[label][1:], opt[label][1:], bare[label][1:]
        _rows(b, f"1 createVirtualDisk thin {label}", ret[label], opt[label], bare[label])
    _same(b, "1 createVirtualDisk thin: 1 TiB vs 1 GiB, optimized", opt["1 TiB"], opt["1 GiB"],
          "Strata at 1 GiB")


def snapshot(b: context.Bench) -> None:
    """2. createSnapshot of a disk holding 1 GiB of data, against qemu-img create -b; and
    against a snapshot of an empty disk (independent of data size)."""
    agent = b.agent
    n = b.reps(16)  # see above; each pair needs 1 GiB written first
    b.say(f"2: writing 1 GiB into each of {n + 1} disks")
    full = [b.images.data_disk() for _ in range(n + 1)]
    empty = [b.images.empty_disk() for _ in range(n + 1)]
    base = b.images.bare_base(GiB, data=True)
    ret: list[float] = []
    opt: list[float] = []
    opt_empty: list[float] = []
    bare: list[float] = []

    def strata() -> None:
        _, r, o = agent.timed(DEFAULT, "createSnapshot", targetRepoId=DEFAULT,
                              baseVirtualDiskId=full.pop())
        ret.append(r)
        opt.append(o)

    def strata_empty() -> None:
        _, _, o = agent.timed(DEFAULT, "createSnapshot", targetRepoId=DEFAULT,
                              baseVirtualDiskId=empty.pop())
        opt_empty.append(o)

    def reference() -> None:
        bare.append(b.images.bare_overlay(base, GiB))

    b.say(f"2: createSnapshot, {n} rounds")
    _rounds(n, [strata, strata_empty], [reference])
    ret, opt, opt_empty, bare = ret[1:], opt[1:], opt_empty[1:], bare[1:]
    _rows(b, "2 createSnapshot of a disk with 1 GiB data", ret, opt, bare)
    _same(b, "2 createSnapshot: 1 GiB data vs empty disk, optimized", opt, opt_empty,
          "Strata, empty disk")
