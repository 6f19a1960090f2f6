"""A real GlusterFS volume for tests and ``make cluster``, on this machine, loopback only.

One brick: an XFS file system on a sparse file, loop-mounted. glusterd runs by hand (``-N``, in the
foreground as our child) with a volume file of our own that moves its working, run and log
directories under the volume's directory and makes it listen on one loopback address only (the CLI
refuses 127.0.0.1 as a brick host, and glusterd must listen on the brick's address: 127.0.0.2, or
the next free 127.0.0.x when another volume of these tests already holds it). glusterd, the brick
process it spawns and the brick's mount all live in a private mount namespace
(``tests/namespace.py``), where the directories glusterd writes without asking
(/var/lib/glusterd, /var/log/glusterfs, /run/gluster) are private directories bound over the
system's: nothing of a glusterd already running on this machine is read, written or signalled.

The volume gets the options without which another host reads a record's old content after a
rename-over (DESIGN.md, "Shared repositories"); a client mounts it with ``MOUNT_OPTIONS``. Teardown
is by pid: every process in the namespace (glusterd, glusterfsd, any helper daemon glusterd
spawned), then the brick's mount, then the loop device.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from tests import namespace

GLUSTERD = "/usr/sbin/glusterd"
GLUSTER = "/usr/sbin/gluster"
PORT = 24007
ADDRESSES = tuple(f"127.0.0.{i}" for i in range(2, 40))

# The volume options that make a rename-over on one host visible at once on another.
COHERENT_OPTIONS = {
    "performance.stat-prefetch": "off",
    "performance.quick-read": "off",
    "performance.open-behind": "off",
    "performance.strict-o-direct": "on",
}
MOUNT_OPTIONS = "attribute-timeout=0,entry-timeout=0,negative-timeout=0"

# What glusterd writes outside its configured directories; bound over privately in the namespace.
SYSTEM_DIRS = ("/var/lib/glusterd", "/var/log/glusterfs", "/run/gluster")

VOLFILE = """\
volume management
    type mgmt/glusterd
    option working-directory {dir}/lib
    option run-directory {dir}/run
    option logging-directory {dir}/log
    option glusterd-sockfile {dir}/run/glusterd.socket
    option transport-type socket
    option transport.address-family inet
    option transport.socket.bind-address {address}
    option transport.socket.listen-port {port}
    option transport.socket.read-fail-log off
    option ping-timeout 0
    option event-threads 1
    option max-port 60999
end-volume
"""


def missing() -> str | None:
    """Why a volume cannot run here, or None."""
    if os.geteuid() != 0:
        return "GlusterFS volumes need root (loop mounts, FUSE, namespaces)"
    for tool in (GLUSTERD, GLUSTER, "/usr/sbin/mount.glusterfs", "/sbin/mkfs.xfs"):
        if not os.path.exists(tool):
            return f"{tool} is not installed (Debian glusterfs-server glusterfs-client xfsprogs)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


def _listening(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((address, port)) == 0


def _port_free(address: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def _address_lock() -> Iterator[None]:
    """Serializes choosing an address among the volumes of concurrent test runs."""
    with open(os.path.join(tempfile.gettempdir(), "strata-gluster-address.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Volume:
    """One single-brick volume under ``directory``; ``server`` and ``name`` are what a client
    mounts (``server:/name``)."""

    def __init__(self, directory: str, name: str = "strata", size_gib: int = 20,
                 direct_io: bool = False) -> None:
        self.dir = os.path.abspath(directory)
        self.name = name
        self.size_gib = size_gib
        # The brick's loop device without a page cache of its own (losetup --direct-io): its
        # writes reach the disk as a brick's on a disk would, instead of sitting in a second
        # cache that the kernel writes back later, in whatever run comes next (the benchmark
        # wants that; the tests keep the cache, which absorbs the I/O of parallel workers).
        self.direct_io = direct_io
        self.server = ""
        self.ns: namespace.Namespace | None = None
        self.loop = ""
        self.glusterd: subprocess.Popen[bytes] | None = None
        self.glusterd_pid = 0
        self.glusterd_started: int | None = None

    @property
    def image(self) -> str:
        return os.path.join(self.dir, "brick.img")

    @property
    def brick_mount(self) -> str:
        return os.path.join(self.dir, "brick")

    @property
    def sockfile(self) -> str:
        return os.path.join(self.dir, "run", "glusterd.socket")

    @property
    def source(self) -> str:
        """What ``mount -t glusterfs`` mounts."""
        return f"{self.server}:/{self.name}"

    @property
    def params(self) -> dict[str, str]:
        """The connection parameters of a ``glusterfs-1.0`` repository on this volume."""
        return {"server": self.server, "volume": self.name}

    # -- up --------------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        # A fresh glusterd each time: what an earlier volume left here would be taken up again.
        for sub in ("lib", "run", "log", "brick", "sys"):
            shutil.rmtree(os.path.join(self.dir, sub), ignore_errors=True)
        for sub in ("lib", "run", "log", "brick", *(f"sys{d}" for d in SYSTEM_DIRS)):
            os.makedirs(os.path.join(self.dir, sub))
        with open(self.image, "wb") as f:
            f.truncate(self.size_gib << 30)
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", self.image], check=True,
                       capture_output=True)
        self.ns = namespace.Namespace()
        for d in SYSTEM_DIRS:
            if os.path.isdir(d):
                self.ns.run(["mount", "--bind", os.path.join(self.dir, f"sys{d}"), d])
        dio = ["--direct-io=on"] if self.direct_io else []
        self.loop = subprocess.run(["losetup", "--find", "--show", *dio, self.image],
                                   check=True, capture_output=True, text=True).stdout.strip()
        self.ns.run(["mount", "-t", "xfs", self.loop, self.brick_mount])
        os.makedirs(self.ns.path(os.path.join(self.brick_mount, "data")))
        self._start_glusterd()
        brick = f"{self.server}:{self.brick_mount}/data"
        self.cli("volume", "create", self.name, brick, "force")
        for key, value in COHERENT_OPTIONS.items():
            self.cli("volume", "set", self.name, key, value)
        self.cli("volume", "start", self.name)

    def _start_glusterd(self) -> None:
        assert self.ns is not None
        with _address_lock():
            for address in ADDRESSES:
                if not _port_free(address, PORT):
                    continue
                if self._try_glusterd(address):
                    self.server = address
                    return
            raise AssertionError(f"no loopback address with port {PORT} free for glusterd "
                                 f"(tried {ADDRESSES[0]}..{ADDRESSES[-1]}; is a glusterd "
                                 "listening on all addresses?)")

    def _try_glusterd(self, address: str) -> bool:
        assert self.ns is not None
        volfile = os.path.join(self.dir, "glusterd.vol")
        with open(volfile, "w") as f:
            f.write(VOLFILE.format(dir=self.dir, address=address, port=PORT))
        with open(os.path.join(self.dir, "log", "glusterd.out"), "ab") as out:
            self.glusterd = subprocess.Popen(
                self.ns.command([GLUSTERD, "-N", "-f", volfile,
                                 "-l", os.path.join(self.dir, "log", "glusterd.log"),
                                 "-p", os.path.join(self.dir, "run", "glusterd.pid")]),
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        self.glusterd_pid = self.glusterd.pid
        self.glusterd_started = namespace.start_time(self.glusterd_pid)
        deadline = time.monotonic() + 20
        while not (os.path.exists(self.sockfile) and _listening(address, PORT)):
            if self.glusterd.poll() is not None:
                return False  # another process took the port between our probe and its bind
            if time.monotonic() > deadline:
                raise AssertionError(f"glusterd did not listen on {address}:{PORT}: "
                                     f"{self.read_log()}")
            time.sleep(0.05)
        return True

    def cli(self, *args: str, timeout: float = 60) -> str:
        """The gluster CLI, talking to this volume's glusterd alone."""
        # Inside the namespace: the CLI, too, writes under /var/lib/glusterd.
        assert self.ns is not None
        r = self.ns.run([GLUSTER, "--mode=script", f"--glusterd-sock={self.sockfile}",
                         f"--log-file={os.path.join(self.dir, 'log', 'cli.log')}", *args],
                        check=False, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"gluster {' '.join(args)} failed ({r.returncode}): "
                                 f"{(r.stdout + r.stderr).strip()}")
        return r.stdout

    def read_log(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "log", "glusterd.log"),
                                                errors="replace") as f:
            return f.read()[-4000:]
        return ""

    def wipe(self) -> None:
        """Remove everything on the volume, through a client of its own (never behind the
        servers' backs on the brick): a fresh start for the next test on a shared volume."""
        ns = namespace.Namespace()
        mnt = os.path.join(self.dir, "wipe")
        try:
            mount(ns, self, mnt, os.path.join(self.dir, "log", "wipe.log"))
            root = ns.path(mnt)
            for entry in os.listdir(root):
                path = os.path.join(root, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            ns.run(["umount", mnt], check=False)
        finally:
            ns.close()

    def processes(self) -> list[int]:
        """The pids of the volume's servers (glusterd, the brick, any daemon glusterd spawned)."""
        return self.ns.pids() if self.ns is not None else []

    # -- down ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Everything by pid, then the brick's mount and its loop device; safe to call twice and
        after a failed start."""
        if self.ns is not None:
            servers = self.ns.pids()
            # glusterd first: it would restart a brick it sees die.
            namespace.signal_pid(self.glusterd_pid, self.glusterd_started, signal.SIGTERM)
            if self.glusterd is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.glusterd.wait(5)
            self.ns.stop_all(also=servers)
            if self.ns.alive:
                self.ns.run(["umount", self.brick_mount], check=False)
            # (had the holder died, the namespace and the brick's mount would go with the last
            # process inside)
            self.ns.kill_holder()
            self.ns = None
        if self.glusterd is not None and self.glusterd.poll() is None:
            self.glusterd.kill()
            self.glusterd.wait()
        self._detach_loop()

    def _detach_loop(self) -> None:
        if not self.loop:
            return
        # The device may have been freed and reused by someone else since: check its file.
        r = subprocess.run(["losetup", "--noheadings", "-O", "BACK-FILE", self.loop],
                           capture_output=True, text=True, check=False)
        if r.returncode == 0 and os.path.realpath(r.stdout.strip()) == os.path.realpath(
                self.image):
            deadline = time.monotonic() + 10
            while subprocess.run(["losetup", "-d", self.loop], capture_output=True,
                                 check=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise AssertionError(f"cannot detach {self.loop} of {self.image}")
                time.sleep(0.1)
        self.loop = ""

    def remove(self) -> None:
        """Delete the volume's files (after ``stop``)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- state for another process ---------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"dir": self.dir, "name": self.name, "server": self.server, "loop": self.loop,
                "glusterd": [self.glusterd_pid, self.glusterd_started],
                "ns": self.ns.state() if self.ns is not None else None}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Volume:
        v = cls(state["dir"], state["name"])
        v.server = state["server"]
        v.loop = state["loop"]
        v.glusterd_pid, v.glusterd_started = state["glusterd"]
        v.ns = namespace.Namespace(state["ns"]) if state["ns"] else None
        return v


def mount(ns: namespace.Namespace, volume: Volume, mountpoint: str, log_file: str) -> None:
    """FUSE-mount ``volume`` at ``mountpoint`` inside ``ns``, with the coherent options."""
    os.makedirs(ns.path(mountpoint), exist_ok=True)
    ns.run(["mount", "-t", "glusterfs", "-o", f"{MOUNT_OPTIONS},log-file={log_file}",
            volume.source, mountpoint])


def fuse_clients(ns: namespace.Namespace) -> list[int]:
    """The pids of the GlusterFS FUSE clients inside ``ns``."""
    out = []
    for pid in ns.pids():
        with contextlib.suppress(OSError):
            if os.path.basename(os.readlink(f"/proc/{pid}/exe")) in ("glusterfs", "glusterfsd"):
                out.append(pid)
    return out


@contextlib.contextmanager
def running(directory: str, name: str = "strata") -> Iterator[Volume]:
    v = Volume(directory, name)
    v.start()
    try:
        yield v
    finally:
        v.stop()
