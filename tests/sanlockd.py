"""A real sanlock daemon for tests, one per simulated host.

Each daemon gets its own run directory (``SANLOCK_RUN_DIR`` with ``SANLOCK_PRIVILEGED=0``), so
several run on one machine without namespaces; a client (an agent, this test process) finds its
daemon through the same variable. The daemon runs in the foreground (``-D``) as our child, so it
is stopped by its pid. Containers here lack CAP_SYS_RESOURCE: it starts with the setrlimit shim
(``tests/sanlock_shim.c``), no watchdog and no mlock (``-w 0 -l 0``). Production hosts run the
distribution's sanlock service unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence

SANLOCK = "/usr/sbin/sanlock"
HERE = os.path.dirname(os.path.abspath(__file__))
SHIM_SOURCE = os.path.join(HERE, "sanlock_shim.c")


def shim() -> str:
    """The compiled shim, built once per source version into a cache directory."""
    with open(SHIM_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = os.path.join(tempfile.gettempdir(), "strata-sanlock-shim")
    os.makedirs(cache, exist_ok=True)
    out = os.path.join(cache, f"shim-{digest}.so")
    if not os.path.exists(out):
        tmp = f"{out}.{os.getpid()}.tmp"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", tmp, SHIM_SOURCE, "-ldl"],
                       check=True, capture_output=True)
        os.rename(tmp, out)
    return out


def client_env(run_dir: str) -> dict[str, str]:
    """What a client process needs in its environment to talk to the daemon of ``run_dir``."""
    return {"SANLOCK_RUN_DIR": run_dir, "SANLOCK_PRIVILEGED": "0"}


class Daemon:
    """One sanlock daemon. ``name``: its host name in delta leases (a host that restarts with the
    same name rejoins at once, its old leases free). ``prefix``: a command the daemon runs under
    (``nsenter`` into a simulated host's mount namespace, where its storage is mounted)."""

    def __init__(self, run_dir: str, name: str, prefix: Sequence[str] = ()) -> None:
        self.run_dir = run_dir
        self.name = name
        self.prefix = list(prefix)
        self.log = os.path.join(run_dir, "daemon.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return client_env(self.run_dir)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        sock = os.path.join(self.run_dir, "sanlock.sock")
        # A daemon of this directory that was killed left its socket: it would look like ours.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        env = {**os.environ, **self.env, "LD_PRELOAD": shim()}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, SANLOCK, "daemon", "-D", "-w", "0", "-l", "0", "-U", "0", "-G", "0",
                 "-e", self.name],
                stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"sanlock daemon did not start: {self.read_log()}")
            time.sleep(0.05)

    def read_log(self) -> str:
        with contextlib.suppress(OSError), open(self.log, errors="replace") as f:
            return f.read()[-4000:]
        return ""

    def kill(self) -> None:
        """SIGKILL, as a host dies (the daemon ignores SIGTERM while it has lockspaces)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run([SANLOCK, "client", "shutdown", "-f", "1"], env={**os.environ, **self.env},
                       capture_output=True, timeout=10, check=False)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()


@contextlib.contextmanager
def running(run_dir: str, name: str = "host1") -> Iterator[Daemon]:
    d = Daemon(run_dir, name)
    d.start()
    try:
        yield d
    finally:
        d.stop()
