"""Figure 5: a strategy=performance disk from a 1 GiB single-layer snapshot on XFS (reflink),
against a bare ``cp --reflink=always`` of the same volume on the same file system; and, as a
second row, the floor of any create that journals its intent, measured on the same file system
without the agent: one durable record write before the clone, the clone and its fsync, one
durable record write after; and, as a third row, the service alone: a thin create in a
repository on tmpfs, where an fsync costs nothing, from the call until getImageStatus says
optimized (the JSON-RPC calls, the worker thread and the polling; what the README adds to the
floor and compares to 2x cp).

XFS with reflink lives in a loop-mounted file under the benchmark's directory; the figure is
skipped, with the reason, where the machine cannot mount one (not root, no loop devices, ...).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Callable

from agent import fileio
from bench import context, machine, stats, tools
from bench.tools import GiB

REPO = "xfs"
IMAGE_SIZE = 8 * GiB
LIMIT = 0.050
RATIO = 2.0
FIGURE = "5 createVirtualDisk strategy=performance, 1 GiB on XFS: time to optimized"
FLOOR = ("5 the floor of a journaled clone on the same XFS: intent record, clone + fsync, "
         "seal record (no agent)")
SERVICE = ("5 the service alone: thin create on tmpfs (no fsync cost), call to optimized "
           "over the socket")
RECORD = b"{}" * 256  # about the size of Strata's records
SHM = "/dev/shm"
TARGET = "≤ 50 ms and ≤ 2× cp"


def mount_xfs(b: context.Bench) -> str:
    """Make and mount an XFS with reflink; return the mount point. Unmounted at cleanup."""
    if os.geteuid() != 0:
        raise context.BenchError("loop mounts need root")
    image = b.path("xfs.img")
    mnt = b.dir("xfs")
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    tools.run(["mkfs.xfs", "-q", "-m", "reflink=1", image])
    tools.run(["mount", "-o", "loop", image, mnt])
    b.cleanup.callback(unmount, mnt)
    return mnt


def unmount(mnt: str) -> None:
    """Unmount (lazily if something still holds it); the loop device goes with it (autoclear)."""
    if not os.path.ismount(mnt):
        return
    if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def run(b: context.Bench) -> None:
    try:
        mnt = mount_xfs(b)
    except (context.BenchError, OSError) as e:
        b.skip(FIGURE, TARGET, f"cannot mount an XFS loop file system here: {e}")
        return
    agent = b.agent
    path = os.path.join(mnt, "repo")
    agent.add_repo(REPO, path)
    try:
        _measure(b, mnt)
    finally:
        agent.call("disconnectStorageRepository", repoId=REPO, options={"force": True})
        unmount(mnt)


def _measure(b: context.Bench, mnt: str) -> None:
    agent = b.agent
    b.say("5: a 1 GiB single-layer snapshot on XFS")
    disk = agent.settled(REPO, "createVirtualDisk", targetRepoId=REPO, size=GiB)
    agent.write(REPO, disk, tools.span(0, GiB, 0x5A))
    snap = agent.settled(REPO, "createSnapshot", targetRepoId=REPO, baseVirtualDiskId=disk)
    src = agent.top_path(REPO, snap)
    serial = itertools.count()
    reflinks_before = agent.log_count("event=reflink")
    made = [0]

    def strata() -> float:
        _, _, took = agent.timed(REPO, "createVirtualDisk", targetRepoId=REPO, size=GiB,
                                 baseSnapshotId=snap, options={"strategy": "performance"})
        made[0] += 1
        return took

    def reference() -> float:
        return tools.run(["cp", "--reflink=always", src,
                          os.path.join(b.dir("xfs", "bare"), f"clone-{next(serial)}")])

    n = b.reps(10)
    b.say(f"5: performance copies against cp --reflink=always, {n} pairs")
    s, r = stats.alternate(n, strata, reference)
    reflinks = agent.log_count("event=reflink") - reflinks_before
    ratio = stats.pair_ratio(s, r)
    med = stats.Samples(s, stats.SECONDS)
    b.compare(FIGURE, med, stats.Samples(r, stats.SECONDS), "bare cp --reflink=always", ratio,
              TARGET, med.median <= LIMIT and ratio <= RATIO,
              note=f"the agent logged a reflink for {reflinks} of {made[0]} disks")

    floor_dir = b.dir("xfs", "floor")

    def floor() -> float:
        """What no journaled create can skip: durable intent, durable clone, durable seal."""
        i = next(serial)
        clone = os.path.join(floor_dir, f"clone-{i}")
        t0 = time.perf_counter()
        fileio.write_bytes(os.path.join(floor_dir, f"intent-{i}"), RECORD)
        fileio.clone(src, clone)
        fileio.fsync_file(clone)
        fileio.write_bytes(os.path.join(floor_dir, f"seal-{i}"), RECORD)
        return time.perf_counter() - t0

    f, r = stats.alternate(n, floor, reference)
    b.compare(FLOOR, stats.Samples(f, stats.SECONDS), stats.Samples(r, stats.SECONDS),
              "bare cp --reflink=always", stats.pair_ratio(f, r), "— (shows what 2× cp leaves)",
              None)
    _service(b, n, reference)


def _service(b: context.Bench, n: int, reference: Callable[[], float]) -> None:
    """Row three: what a call costs through the agent when the storage costs nothing."""
    if not os.path.isdir(SHM) or machine.mount_of(SHM)[1] != "tmpfs":
        b.skip(SERVICE, "—", f"{SHM} is not a tmpfs here")
        return
    agent = b.agent
    path = os.path.join(SHM, f"strata-bench-{context.new_id()}")
    agent.add_repo("shm", path)
    try:
        disk = agent.settled("shm", "createVirtualDisk", targetRepoId="shm", size=GiB)
        snap = agent.settled("shm", "createSnapshot", targetRepoId="shm", baseVirtualDiskId=disk)

        def thin() -> float:
            _, _, took = agent.timed("shm", "createVirtualDisk", targetRepoId="shm", size=GiB,
                                     baseSnapshotId=snap)
            return took

        s, r = stats.alternate(n, thin, reference)
        b.compare(SERVICE, stats.Samples(s, stats.SECONDS), stats.Samples(r, stats.SECONDS),
                  "bare cp --reflink=always", stats.pair_ratio(s, r),
                  "— (added to the floor, compare to 2× cp)", None)
    finally:
        agent.drop_repo("shm", path)
