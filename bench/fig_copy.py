"""Figures 3 and 4: full copies against a bare ``qemu-img convert``, and copies against a base.

Both copy the top snapshot of the shared 3-layer chain (1 GiB + 0.5 GiB + 0.5 GiB of data) into
another repository on the same file system. A snapshot's copy keeps its id, so every full copy
goes into a fresh repository, which is disconnected and deleted afterwards.
"""

from __future__ import annotations

import itertools
import os
import statistics

from agent import fileio
from bench import agentproc, context, stats, tools
from bench.tools import MiB

DEFAULT = agentproc.DEFAULT
THROUGHPUT_TARGET = 0.95
BYTES_TARGET = 1.1
# Figure 4: 1 MiB changed every 20 MiB of the 2 GiB disk: 102 MiB, 5% of it.
CHANGE_STRIDE = 20 * MiB
CHANGE_CHUNKS = 102


def full(b: context.Bench) -> None:
    """3. copyImage (full) of a 3-layer chain with 2 GiB of data, against qemu-img convert."""
    agent = b.agent
    chain = b.images.chain()
    top = chain.snapshots[-1]
    serial = itertools.count(1)
    compared = [False]

    def strata() -> float:
        k = next(serial)
        repo_id, path = f"copy{k}", b.path("repos", f"copy{k}")
        agent.add_repo(repo_id, path)
        try:
            _, _, took = agent.timed(repo_id, "copyImage", targetRepoId=repo_id, imageId=top)
            if not compared[0]:
                # Once, untimed: the copy holds the same bytes as the chain.
                tools.run([tools.QEMU_IMG, "compare", "-q", "-f", "qcow2", "-F", "qcow2",
                           chain.top_path, agent.top_path(repo_id, top)])
                compared[0] = True
        finally:
            agent.drop_repo(repo_id, path)
        return took

    def reference() -> float:
        out = b.path("bare", f"convert-{next(serial)}.qcow2")
        try:
            return tools.convert(chain.top_path, out)
        finally:
            tools.remove(out)

    n = b.reps(14)  # a 2 GiB copy varies by ±6% here from run to run: 7 blocks of two pairs
    b.say(f"3: full copies of 2 GiB, {n} pairs")
    s, r = stats.alternate(n, strata, reference, warmup=False)
    ratio = stats.pair_ratio(r, s)  # throughput ratio: bare time over Strata time
    b.compare("3 copyImage full, 3-layer chain, 2 GiB data: throughput",
              stats.Samples([chain.data / t for t in s], stats.BYTES_PER_S),
              stats.Samples([chain.data / t for t in r], stats.BYTES_PER_S),
              "bare qemu-img convert -t none -T none -W", ratio, "≥ 0.95× bare",
              ratio >= THROUGHPUT_TARGET,
              note="Strata's time runs from the call until getImageStatus says optimized "
                   "(includes its fsync, rename and records)")


def diff(b: context.Bench) -> None:
    """4. copyImage with baseImageId after 5% of the disk changed: bytes written."""
    agent = b.agent
    chain = b.images.chain()
    repo_id, path = "diff", b.path("repos", "diff")
    agent.add_repo(repo_id, path)
    try:
        b.say("4: full copy of the base into the target repository")
        base = agent.settled(repo_id, "copyImage", targetRepoId=repo_id,
                             imageId=chain.snapshots[-1])
        changed = CHANGE_CHUNKS * MiB
        allocated: list[float] = []
        ideal: list[float] = []
        free_drop: list[int] = []
        n = b.reps(4)
        b.say(f"4: {n} copies against a base after changing 5% of the disk")
        for i in range(n):
            chunks = [(j * CHANGE_STRIDE + (i + 1) * MiB, MiB, 0x60 + i)
                      for j in range(CHANGE_CHUNKS)]
            agent.write(DEFAULT, chain.disk, chunks)
            snap = agent.settled(DEFAULT, "createSnapshot", targetRepoId=DEFAULT,
                                 baseVirtualDiskId=chain.disk)
            free_before = _free(path)
            agent.settled(repo_id, "copyImage", targetRepoId=repo_id, imageId=snap,
                          baseImageId=base)
            free_drop.append(free_before - _free(path))
            info = agent.call("getImageInfo", repo_id, snap)
            if info["chain"][1:2] != [base]:
                raise context.BenchError(f"the copy is not on its base: chain {info['chain']}")
            allocated.append(float(info["allocated"]))
            # The reference: the same writes into a fresh qcow2 of the same size, i.e. exactly
            # the changed bytes plus the qcow2 metadata they need.
            bare = b.path("bare", f"ideal-{i}.qcow2")
            tools.create(bare, chain.size)
            tools.write(bare, chunks)
            ideal.append(float(fileio.allocated_bytes(bare)))
            tools.remove(bare)
            base = snap
    finally:
        agent.drop_repo(repo_id, path)
    metadata = statistics.median(x - changed for x in ideal)
    limit = BYTES_TARGET * changed + metadata
    a = stats.Samples(allocated, stats.BYTES)
    b.compare("4 copyImage with baseImageId, 5% changed: bytes written", a,
              stats.Samples(ideal, stats.BYTES), "changed bytes + qcow2 metadata",
              statistics.median(x / y for x, y in zip(allocated, ideal, strict=True)),
              f"≤ 1.1× changed + metadata ({stats.fmt(limit, stats.BYTES)})",
              a.median <= limit,
              note=f"changed {stats.fmt(changed, stats.BYTES)}; Strata = allocated bytes of the "
                   "copy's own volume (getImageInfo); the repository's free space dropped by "
                   f"{stats.fmt(statistics.median(free_drop), stats.BYTES)} (median; statvfs, "
                   "shared with whatever else writes to this file system)")


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize
