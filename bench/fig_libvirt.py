"""Figure 8: thin create, snapshot and full copy against libvirt's storage-pool API.

libvirt runs as a ``libvirtd`` this benchmark starts (and stops) with its own configuration:
sockets under the benchmark's directory, and only its storage driver loaded
(``LIBVIRT_DRIVER_DIR`` names a directory holding just ``libvirt_driver_storage.so``), because
the QEMU driver refuses to start without the ``libvirt-qemu`` user that libvirt-daemon-system
creates, and this figure needs nothing but storage pools. Where python3-libvirt or libvirtd is
missing, the benchmark installs them with apt-get when it runs as root (unless
STRATA_BENCH_NO_APT is set), and otherwise skips the figure with the reason.

The pool is a transient ``dir`` pool on the same file system as Strata's repository.
- thin create: Strata's createVirtualDisk on an empty 1 GiB snapshot, until optimized, against
  ``createXML`` of a qcow2 volume with a backingStore.
- snapshot: Strata's createSnapshot of a disk holding 1 GiB, until optimized, against
  ``createXML`` of an overlay whose backingStore is a volume holding 1 GiB (a volume snapshot
  in the storage API).
- full copy: Strata's copyImage of a disk holding 1 GiB (single layer) until optimized, against
  ``createXMLFrom`` plus an fsync of the new file: libvirt copies through the page cache and
  returns before the bytes are on disk, Strata's copy is durable when it says optimized.
"""

from __future__ import annotations

import glob
import importlib
import itertools
import os
import shutil
import subprocess
import time
from types import ModuleType
from typing import Any

from lxml import etree

from agent import fileio
from bench import agentproc, context, stats, tools
from bench.tools import GiB

DEFAULT = agentproc.DEFAULT
PACKAGES = ["python3-libvirt", "libvirt-daemon"]
LIBVIRTD = "/usr/sbin/libvirtd"
DRIVER_GLOB = "/usr/lib/*/libvirt/connection-driver/libvirt_driver_storage.so"
FIGURES = {
    "thin": "8 thin create 1 GiB vs libvirt createXML (backingStore)",
    "snapshot": "8 snapshot, 1 GiB data vs libvirt createXML overlay",
    "copy": "8 full copy, 1 GiB data vs libvirt createXMLFrom + fsync",
}
TARGET = "Strata ≤ libvirt"
CACHED = ("8 bare qemu-img convert -t none -T writeback of libvirt's warm source + fsync, "
          "vs libvirt's copy")


def _import() -> ModuleType | None:
    try:
        return importlib.import_module("libvirt")
    except ImportError:
        return None


def ensure_installed(b: context.Bench) -> str | None:
    """None when python3-libvirt and libvirtd are there (installing them if we may), else why
    not."""
    missing = []
    if _import() is None:
        missing.append("python3-libvirt")
    if not os.path.exists(LIBVIRTD) or not glob.glob(DRIVER_GLOB):
        missing.append("libvirt-daemon")
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"{' and '.join(missing)} not installed, and installing needs root"
    if os.environ.get("STRATA_BENCH_NO_APT"):
        return f"{' and '.join(missing)} not installed (STRATA_BENCH_NO_APT is set)"
    if shutil.which("apt-get") is None:
        return f"{' and '.join(missing)} not installed, and there is no apt-get"
    b.say(f"8: installing {' '.join(PACKAGES)} with apt-get")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        got = subprocess.run(install, env=env, capture_output=True)
        if got.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {got.stderr.decode()[-300:]}"
    importlib.invalidate_caches()
    if _import() is None:
        return "python3-libvirt is installed but does not import in this Python"
    return None


class Libvirtd:
    """A libvirtd with only its storage driver, its sockets under ``directory``."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.run_dir = os.path.join(directory, "run")
        self.uri = f"storage:///system?socket={self.run_dir}/libvirt-sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self._made_run_libvirt = not os.path.exists("/run/libvirt")

    def start(self, lv: ModuleType, timeout: float = 30.0) -> Any:
        os.makedirs(self.run_dir, exist_ok=True)
        drivers = os.path.join(self.dir, "drivers")
        os.makedirs(drivers, exist_ok=True)
        driver = glob.glob(DRIVER_GLOB)[0]
        os.symlink(driver, os.path.join(drivers, os.path.basename(driver)))
        conf = os.path.join(self.dir, "libvirtd.conf")
        with open(conf, "w") as f:
            f.write(f'unix_sock_dir = "{self.run_dir}"\nlisten_tls = 0\nlisten_tcp = 0\n'
                    'auth_unix_rw = "none"\nauth_unix_ro = "none"\n')
        with open(os.path.join(self.dir, "libvirtd.log"), "ab") as log:
            self.proc = subprocess.Popen(
                [LIBVIRTD, "--config", conf, "--pid-file", os.path.join(self.run_dir, "pid")],
                stdout=log, stderr=log, env={**os.environ, "LIBVIRT_DRIVER_DIR": drivers},
            )
        tools.wait_for_socket(os.path.join(self.run_dir, "libvirt-sock"), self.proc, timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return lv.open(self.uri)
            except lv.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            tools.stop(self.proc)
        # A privileged libvirtd keeps its state under /run/libvirt: ours, if it made it.
        if self._made_run_libvirt and not os.path.exists("/run/libvirt/libvirt-sock"):
            shutil.rmtree("/run/libvirt", ignore_errors=True)


def _volume_xml(name: str, size: int, backing: str | None = None) -> str:
    """libvirt's volume XML, built with lxml so paths and names are escaped properly."""
    vol = etree.Element("volume")
    etree.SubElement(vol, "name").text = name
    etree.SubElement(vol, "capacity", unit="bytes").text = str(size)
    etree.SubElement(etree.SubElement(vol, "target"), "format", type="qcow2")
    if backing is not None:
        store = etree.SubElement(vol, "backingStore")
        etree.SubElement(store, "path").text = backing
        etree.SubElement(store, "format", type="qcow2")
    return str(etree.tostring(vol, encoding="unicode"))


def _pool_xml(name: str, path: str) -> str:
    pool = etree.Element("pool", type="dir")
    etree.SubElement(pool, "name").text = name
    etree.SubElement(etree.SubElement(pool, "target"), "path").text = path
    return str(etree.tostring(pool, encoding="unicode"))


def run(b: context.Bench) -> None:
    reason = ensure_installed(b)
    if reason is not None:
        for key in FIGURES:
            b.skip(FIGURES[key], TARGET, reason)
        return
    lv = _import()
    assert lv is not None
    daemon = Libvirtd(b.dir("libvirt"))
    b.cleanup.callback(daemon.stop)
    try:
        conn = daemon.start(lv)
    except (context.BenchError, OSError, lv.libvirtError) as e:
        daemon.stop()
        for key in FIGURES:
            b.skip(FIGURES[key], TARGET, f"libvirtd did not start: {e}")
        return
    pool_dir = b.dir("libvirt", "pool")
    pool = conn.storagePoolCreateXML(_pool_xml(f"strata-bench-{os.getpid()}", pool_dir), 0)
    try:
        _measure(b, pool)
    finally:
        pool.destroy()
        conn.close()
        daemon.stop()


def _measure(b: context.Bench, pool: Any) -> None:
    agent = b.agent
    serial = itertools.count()
    ratio_of: dict[str, tuple[list[float], list[float]]] = {}

    # -- thin create ---------------------------------------------------------------------------
    snap = b.images.empty_snapshot(GiB)
    base = pool.createXML(_volume_xml("thin-base.qcow2", GiB), 0)

    def strata_thin() -> float:
        return agent.timed(DEFAULT, "createVirtualDisk", targetRepoId=DEFAULT, size=GiB,
                           baseSnapshotId=snap)[2]

    def libvirt_thin() -> float:
        xml = _volume_xml(f"thin-{next(serial)}.qcow2", GiB, base.path())
        t0 = time.perf_counter()
        pool.createXML(xml, 0)
        return time.perf_counter() - t0

    n = b.reps(10)
    b.say(f"8: thin create vs libvirt, {n} pairs")
    ratio_of["thin"] = stats.alternate(n, strata_thin, libvirt_thin)

    # -- snapshot ------------------------------------------------------------------------------
    n = b.reps(6)
    b.say(f"8: writing 1 GiB into each of {n + 2} disks and a libvirt volume")
    disks = [b.images.data_disk() for _ in range(n + 1)]
    data = pool.createXML(_volume_xml("data.qcow2", GiB), 0)
    tools.write(data.path(), tools.span(0, GiB, 0x5A))
    source = b.images.data_disk()

    def strata_snapshot() -> float:
        return agent.timed(DEFAULT, "createSnapshot", targetRepoId=DEFAULT,
                           baseVirtualDiskId=disks.pop())[2]

    def libvirt_snapshot() -> float:
        xml = _volume_xml(f"snap-{next(serial)}.qcow2", GiB, data.path())
        t0 = time.perf_counter()
        pool.createXML(xml, 0)
        return time.perf_counter() - t0

    b.say(f"8: snapshot vs libvirt, {n} pairs")
    ratio_of["snapshot"] = stats.alternate(n, strata_snapshot, libvirt_snapshot)

    # -- full copy -----------------------------------------------------------------------------
    def strata_copy() -> float:
        image, _, took = agent.timed(DEFAULT, "copyImage", targetRepoId=DEFAULT,
                                     imageId=source)
        agent.call("removeImage", repositoryId=DEFAULT, imageId=image)
        return took

    def libvirt_copy() -> float:
        t0 = time.perf_counter()
        clone = pool.createXMLFrom(_volume_xml(f"clone-{next(serial)}.qcow2", GiB), data, 0)
        fileio.fsync_file(clone.path())
        took = time.perf_counter() - t0
        clone.delete(0)
        return took

    def cached_copy() -> float:
        """The bare tool reading libvirt's warm source through the page cache, writing O_DIRECT,
        then an fsync: what the page cache alone is worth."""
        out = b.path("bare", f"cached-{next(serial)}.qcow2")
        try:
            took = tools.convert(data.path(), out, source_cache="writeback")
            t0 = time.perf_counter()
            fileio.fsync_file(out)
            return took + time.perf_counter() - t0
        finally:
            tools.remove(out)

    n = b.reps(6)
    b.say(f"8: full copy of 1 GiB vs libvirt, {n} pairs (after a warm-up pair)")
    ratio_of["copy"] = stats.alternate(n, strata_copy, libvirt_copy)
    cached, cached_ref = stats.alternate(n, cached_copy, libvirt_copy)

    notes = {
        "thin": "Strata until optimized; libvirt until createXML returns",
        "snapshot": "Strata until optimized; libvirt until createXML returns",
        "copy": "Strata until optimized (O_DIRECT, fsync'd); libvirt clone (page cache, warm "
                "source) + fsync of the new file",
    }
    for key, (s, r) in ratio_of.items():
        ratio = stats.pair_ratio(s, r)
        b.compare(FIGURES[key], stats.Samples(s, stats.SECONDS), stats.Samples(r, stats.SECONDS),
                  "libvirt storage pool (dir)", ratio, TARGET, ratio <= 1.0, note=notes[key])
    b.compare(CACHED, stats.Samples(cached, stats.SECONDS),
              stats.Samples(cached_ref, stats.SECONDS), "libvirt storage pool (dir)",
              stats.pair_ratio(cached, cached_ref),
              "— (what reading through the page cache gives)", None)
