"""Figure 7: listImages, checkStorageRepository, getStorageRepositoryInfo, connect and disconnect
on repositories of 1,000, 10,000 and 100,000 images, and the agent's memory with each connected.

The repository is filled directly, not through the API: 10,000 creates through the API would
each run qemu-img and several fsyncs (minutes), and this figure measures reading a large
repository, not making one. The fill uses the engine's own record writer
(``agent.repo.localfs.LocalRepository.put_volume``/``put_image``, the same durable write the
agent does) and real qcow2 files copied from templates made by qemu-img (each disk's file names
its snapshot's volume as backing file, as the agent writes it). It happens before any agent
connects the repository; a second agent, started for this figure only, then connects it, so its
memory is measured from a fresh start.

The reference is the floor: this process reading every record file (scandir + json.load), plus
the first 4 KiB of every volume for the check, with no RPC and no logic.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from agent.image import model
from agent.repo import layout, localfs
from bench import agentproc, context, stats, tools
from bench.tools import GiB

REPO = "scale"
IMAGES = 10_000  # half snapshots, half disks each on one of them
SIZES = (1_000, 10_000, 100_000)
LIST_TARGET = 1.0  # seconds at 100,000 images, and in proportion below
CHECK_TARGET = 2.0
FLAT_TARGET = 0.050  # calls whose cost must not grow with the images
RSS_TARGET = 200 * (1 << 20)
PLACEHOLDER = "00000000-0000-4000-8000-000000000000"
BLOCK = 4096


def _template(path: str) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        data = f.read()
    return data, len(data)


def _sparse_write(path: str, data: bytes, size: int) -> None:
    """The template's non-zero 4 KiB blocks, and holes elsewhere: the same bytes, quickly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for off in range(0, len(data), BLOCK):
            block = data[off:off + BLOCK]
            if block.count(0) != len(block):
                os.pwrite(fd, block, off)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def fill(b: context.Bench, root: str, images: int = IMAGES) -> None:
    """Format a repository at root and fill it with images/2 snapshot + disk pairs."""
    tpl = b.dir("scale-templates")
    base_tpl = os.path.join(tpl, f"{PLACEHOLDER}.qcow2")
    top_tpl = os.path.join(tpl, "top.qcow2")
    opts = ["-o", "compat=1.1,lazy_refcounts=off"]
    tools.run([tools.QEMU_IMG, "create", "-q", "-f", "qcow2", *opts, base_tpl, str(GiB)])
    tools.run([tools.QEMU_IMG, "create", "-q", "-f", "qcow2", *opts, "-b",
               os.path.basename(base_tpl), "-F", "qcow2", top_tpl, str(GiB)])
    base_data, base_size = _template(base_tpl)
    top_data, top_size = _template(top_tpl)
    if top_data.count(PLACEHOLDER.encode()) != 1:
        raise context.BenchError("the overlay template does not name its backing file once")

    params = {"path": root}
    run_dir = root + ".run"  # unused by a local repository; the contract asks for it
    localfs.LocalRepository.format(params, {}, run_dir)
    repo = localfs.LocalRepository.open(params, run_dir)
    try:
        def group(i: int) -> None:
            snap_id, disk_id = context.new_id(), context.new_id()
            base_vol, top_vol = context.new_id(), context.new_id()
            fmt = model.VolumeFormat.QCOW2
            _sparse_write(repo.volume_path(base_vol, fmt), base_data, base_size)
            _sparse_write(repo.volume_path(top_vol, fmt),
                          top_data.replace(PLACEHOLDER.encode(), base_vol.encode()), top_size)
            repo.put_volume(model.Volume(base_vol, fmt, None, None, GiB))
            repo.put_volume(model.Volume(top_vol, fmt, base_vol, snap_id, GiB))
            done = model.Progress(1, "2/2", 100, None)
            repo.put_image(model.Image(snap_id, model.Kind.SNAPSHOT, GiB, base_vol, strong=True,
                                       user_data={"vm": f"vm-{i}", "role": "template"},
                                       progress=done))
            repo.put_image(model.Image(disk_id, model.Kind.DISK, GiB, top_vol, strong=True,
                                       user_data={"vm": f"vm-{i}"}, progress=done))

        # The record writes fsync; threads overlap them.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for _ in pool.map(group, range(images // 2)):
                pass
    finally:
        repo.close()


def floor_list(root: str) -> float:
    t0 = time.perf_counter()
    for sub in (layout.IMAGES, layout.VOLUMES):
        with os.scandir(os.path.join(root, sub)) as it:
            for entry in it:
                if entry.name.endswith(".json"):
                    with open(entry.path, "rb") as f:
                        json.loads(f.read())
    return time.perf_counter() - t0


def floor_check(root: str) -> float:
    t0 = time.perf_counter()
    floor_list(root)
    with os.scandir(os.path.join(root, layout.VOLUMES)) as it:
        for entry in it:
            if entry.name.endswith(".qcow2"):
                with open(entry.path, "rb") as f:
                    f.read(BLOCK)
    return time.perf_counter() - t0


def run(b: context.Bench) -> None:
    for images in SIZES:
        root = b.path("repos", f"{REPO}-{images}")
        b.say(f"7: filling a repository with {images:,} images (directly, not through the API)")
        t0 = time.monotonic()
        fill(b, root, images)
        fill_time = time.monotonic() - t0
        # A fresh agent per size: its memory is measured from a fresh start.
        agent = agentproc.Agent(b.path(f"scale-agent-{images}", "dev"))
        agent.start()
        b.cleanup.callback(agent.stop)
        try:
            _measure(b, agent, root, images, fill_time)
        finally:
            agent.stop()
            shutil.rmtree(root, ignore_errors=True)


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _measure(b: context.Bench, agent: agentproc.Agent, root: str, images: int,
             fill_time: float) -> None:
    idle = agent.memory()
    name = f"{REPO}-{images}"
    params = {"repoId": name, "repoFormat": agentproc.FORMAT,
              "connectionParameters": {"path": root}}
    connect = _timed(lambda: agent.call("connectStorageRepository", **params))
    # The connect reads the records in the background: the first count waits for nothing,
    # the first listing reads what is not read yet.
    t0 = time.perf_counter()
    first = agent.call("listImages", repositoryId=name)
    first_list = time.perf_counter() - t0
    if len(first) != images:
        raise context.BenchError(f"listImages gave {len(first)} images, not {images}")
    counts: dict[str, int] = {}

    def timed(method: str, key: str, **kw: Any) -> Callable[[], float]:
        """A call of method on the repository, timed; the length of its answer kept as key."""
        def call() -> float:
            t = time.perf_counter()
            got = agent.call(method, repositoryId=name, **kw)
            took = time.perf_counter() - t
            counts[key] = len(got)
            return took
        return call

    n = b.reps(6 if images < 100_000 else 4)
    label = f"{images:,} images"
    b.say(f"7: {label}: listImages and checkStorageRepository, {n} pairs each")
    s_list, r_list = stats.alternate(n, timed("listImages", "list"), lambda: floor_list(root))
    s_check, r_check = stats.alternate(n, timed("checkStorageRepository", "fixes"),
                                        lambda: floor_check(root))
    mem = agent.memory()
    if counts["list"] != images:
        raise context.BenchError(f"listImages gave {counts['list']} images, not {images}")
    for what, s, r, target in (("listImages", s_list, r_list, LIST_TARGET),
                               ("checkStorageRepository", s_check, r_check, CHECK_TARGET)):
        sam = stats.Samples(s, stats.SECONDS)
        ratio = stats.pair_ratio(s, r)
        limit = target * images / 100_000
        b.compare(f"7 {what}, {label}", sam, stats.Samples(r, stats.SECONDS),
                  "floor: read every record" + (" + 4 KiB/volume" if "check" in what else ""),
                  ratio, f"≤ {stats.fmt(limit, stats.SECONDS)} and ≤ 0.5× floor",
                  sam.median <= limit and ratio <= 0.5,
                  note=(f"filled in {fill_time:.0f} s without the API; the first listing after "
                        f"the connect took {stats.fmt(first_list, stats.SECONDS)}")
                  if what == "listImages" else f"{counts['fixes']} fixes proposed (0 expected)")
    # Calls whose cost must not grow with the repository: against a repository of 10 images
    # connected to the same agent, in the same run.
    small = b.path("repos", f"{REPO}-small-{images}")
    if not os.path.isdir(small):
        fill(b, small, 10)
    small_params = {**params, "repoId": f"{name}-small", "connectionParameters": {"path": small}}
    agent.call("connectStorageRepository", **small_params)
    for what, big_call, small_call in (
        ("getStorageRepositoryInfo",
         lambda: agent.call("getStorageRepositoryInfo", repoId=name),
         lambda: agent.call("getStorageRepositoryInfo", repoId=f"{name}-small")),
        ("connectStorageRepository again (idempotent)",
         lambda: agent.call("connectStorageRepository", **params),
         lambda: agent.call("connectStorageRepository", **small_params)),
    ):
        s, r = stats.alternate(b.reps(9), lambda c=big_call: _timed(c),  # type: ignore[misc]
                               lambda c=small_call: _timed(c))  # type: ignore[misc]
        sam = stats.Samples(s, stats.SECONDS)
        b.compare(f"7 {what}, {label}", sam, stats.Samples(r, stats.SECONDS),
                  "the same call, 10 images", stats.pair_ratio(s, r), "≤ 50 ms",
                  sam.median <= FLAT_TARGET)
    disconnect = _timed(lambda: agent.call("disconnectStorageRepository", repoId=name))
    agent.call("disconnectStorageRepository", repoId=f"{name}-small")
    for what, took in (("connectStorageRepository (first)", connect),
                       ("disconnectStorageRepository", disconnect)):
        b.compare(f"7 {what}, {label}", stats.Samples([took], stats.SECONDS), None, "", None,
                  "≤ 50 ms", took <= FLAT_TARGET)
    rss = stats.Samples([float(mem["VmRSS"])], stats.BYTES)
    b.compare(f"7 agent RSS, {label} connected", rss,
              stats.Samples([float(idle["VmRSS"])], stats.BYTES),
              "the same agent before connecting", mem["VmRSS"] / idle["VmRSS"],
              "≤ 200 MiB" if images == 100_000 else "", mem["VmRSS"] <= RSS_TARGET
              if images == 100_000 else None,
              note=f"after {n + 2} listImages and {n + 1} checks; peak (VmHWM) "
                   f"{stats.fmt(mem['VmHWM'], stats.BYTES)}")
    if images == SIZES[-1]:
        b.note(f"Figure 7 fills its repositories ({', '.join(f'{i:,}' for i in SIZES)} images) "
               "directly with the engine's record writer (LocalRepository.put_volume/put_image)"
               " and qcow2 files copied from qemu-img templates, before the agent connects "
               "them, because making 100,000 images through the API would take many minutes "
               "and the figure measures reading a large repository, not filling one.")
