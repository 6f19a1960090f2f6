"""A private mount namespace for tests, held open by a sleeping process.

GlusterFS's servers and every simulated host live in one each: what is mounted inside (a brick, a
host's FUSE mount) stays inside, and a namespace made later does not inherit a copy that would keep
a loop device busy. The processes of a namespace are found by its identity (``mnt:[inode]`` of
``/proc/PID/ns/mnt``), so everything one host runs -- its agent, the agent's qemu-img children, its
sanlock daemon, its FUSE client -- can be frozen or killed together, by pid, without touching
anything else on the machine. A namespace can be rebuilt from ``state()`` by another process (the
``down`` command of ``tests/cluster.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

NSENTER = "/usr/bin/nsenter"
UNSHARE = "/usr/bin/unshare"


def _ns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:  # gone, or a zombie (whose namespace links are gone)
        return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process (a
    pid can be reused)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[19])


def alive(pid: int, started: int | None) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs (not a zombie)."""
    return state(pid) not in (None, "Z", "X") and (started is None or start_time(pid) == started)


def state(pid: int) -> str | None:
    """The process's state letter (R, S, D, T, Z, ...), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def signal_pid(pid: int, started: int | None, sig: int) -> None:
    """Send ``sig`` to one process, if it is still the one that started at ``started``."""
    if alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class Namespace:
    """A mount namespace with private propagation. ``Namespace()`` makes one; ``from_state``
    finds one made by another process."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        if state is not None:
            self.holder: int = state["holder"]
            self.started: int | None = state["started"]
            self.ns: str = state["ns"]
            return
        self.proc = subprocess.Popen(
            [UNSHARE, "-m", "--propagation", "private", "sleep", "infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.holder = self.proc.pid
        mine = _ns_of(os.getpid())
        deadline = time.monotonic() + 10
        # unshare execs sleep once the namespace exists: until then the link is still ours.
        while (ns := _ns_of(self.holder)) in (None, mine):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"unshare did not make a namespace (exit {self.proc.poll()})")
            time.sleep(0.01)
        assert ns is not None
        self.ns = ns
        self.started = start_time(self.holder)
        self._drop_inherited()

    def _drop_inherited(self) -> None:
        """Unmount, in here only, the test mounts the namespace was born with: other tests'
        (other pytest workers') GlusterFS clients and loop-mounted file systems, mounted in
        this machine's namespace right now. Kept in here, a copy would hold their FUSE client
        and their loop device after they unmount them, and a host would see other hosts'
        mounts as its own."""
        roots = tuple(os.path.realpath(d) + "/" for d in {tempfile.gettempdir(), "/var/tmp"})
        with open(f"/proc/{self.holder}/mounts") as f:
            rows = [line.split() for line in f]
        for source, target, vfs_type, *_ in reversed(rows):
            target = target.replace("\\040", " ")
            ours = vfs_type == "fuse.glusterfs" or source.startswith("/dev/loop")
            if ours and target.startswith(roots):
                self.run(["umount", "-l", target], check=False)

    def state(self) -> dict[str, Any]:
        return {"holder": self.holder, "started": self.started, "ns": self.ns}

    @property
    def alive(self) -> bool:
        return alive(self.holder, self.started)

    def path(self, path: str) -> str:
        """``path`` as seen inside the namespace, reachable from outside it."""
        return f"/proc/{self.holder}/root{path}"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace (nsenter execs it: the pid is the command's)."""
        return [NSENTER, "-t", str(self.holder), "-m", "--", *argv]

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout,
                           env=env, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def pids(self) -> list[int]:
        """Every live process inside the namespace but its holder."""
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.holder and _ns_of(int(entry)) == self.ns:
                out.append(int(entry))
        return out

    def signal_all(self, sig: int) -> list[int]:
        """Send ``sig`` to every process inside, again until no new one appears (a process may
        fork while we go); returns the pids signalled."""
        done: set[int] = set()
        for _ in range(10):
            new = [p for p in self.pids() if p not in done]
            if not new:
                break
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            done.update(new)
        return sorted(done)

    def close(self, grace: float = 5.0) -> None:
        """Stop everything inside, then the holder: the namespace and its mounts go with it."""
        self.stop_all(grace)
        self.kill_holder()

    def freeze(self, timeout: float = 10.0) -> list[int]:
        """SIGSTOP to every process inside, returning once each of them is stopped (a signal is
        delivered asynchronously) and no new one appeared."""
        frozen: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            frozen.update(self.signal_all(signal.SIGSTOP))
            running = [p for p in frozen if state(p) not in (None, "T", "t", "Z", "X")]
            if not running and not set(self.pids()) - frozen:
                return sorted(p for p in frozen if state(p) is not None)
            if time.monotonic() > deadline:
                raise AssertionError(f"processes of {self.ns} do not stop: {running}")
            time.sleep(0.01)

    def stop_all(self, grace: float = 5.0, also: Iterable[int] = ()) -> None:
        """Stop every process inside but the holder: SIGTERM, then SIGKILL after ``grace`` s
        (stopped processes are continued so that they can die). ``also``: pids seen inside
        earlier, waited for too (an exiting process leaves the namespace before it is gone)."""
        seen = {p for p in also if alive(p, None)}
        if not seen and not self.pids():
            return
        seen.update(self.signal_all(signal.SIGTERM))
        seen.update(self.signal_all(signal.SIGCONT))
        if not self._wait_gone(seen, grace):
            seen.update(self.signal_all(signal.SIGKILL))
            seen.update(self.signal_all(signal.SIGCONT))
            if not self._wait_gone(seen, 10):
                raise AssertionError(f"processes of {self.ns} survive SIGKILL: {self.pids()}")

    def _wait_gone(self, pids: set[int], timeout: float) -> bool:
        """Until every one of ``pids`` is gone and nothing else is left inside. A process that
        exits leaves the namespace before it is gone: wait for the pid itself."""
        deadline = time.monotonic() + timeout
        while self.pids() or any(alive(p, None) for p in pids):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def kill_holder(self) -> None:
        """The holder alone (after ``stop_all``)."""
        signal_pid(self.holder, self.started, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
