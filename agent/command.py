"""Every child process Strata runs goes through here.

Processes are started with ``subprocess`` from whatever real thread calls us, never from the
gevent hub (the daemon does not monkey-patch): callers on the hub hand this work to a thread
pool. The design first named ``sh`` for this; measured on sh 2.4 it costs 3-4 ms per child, and
~100 ms more unless stdin is given explicitly, which alone made every short operation miss its
target. subprocess with a selector over the pipes costs 0.5 ms and keeps progress parsing and
cancellation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence

from agent import errors

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float], None]

# qemu-img -p writes "    (12.34/100%)\r" repeatedly to stdout.
_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")
_NO_SPACE = re.compile(r"No space left on device|ENOSPC", re.I)

# C locale: we parse qemu-img's messages, so they must not be translated.
_ENV = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
# Where this host's sanlock daemon listens, when it is not the default (a test host): its
# client commands must find the same daemon as the agent.
_PASSED = ("SANLOCK_RUN_DIR", "SANLOCK_PRIVILEGED")


def _env() -> dict[str, str]:
    return {**_ENV, **{k: os.environ[k] for k in _PASSED if k in os.environ}}

# If the agent dies (kill -9), its children die with it: an orphaned qemu-img would go on writing
# a partial file that a restarted agent is about to recreate. setpriv sets the parent-death
# signal and execs the command, so no Python code runs between fork and exec (preexec_fn is
# unsafe in a threaded process). The signal follows the forking thread; our workers live as
# long as the agent.
_SETPRIV = shutil.which("setpriv", path=_ENV["PATH"])
_DIE_WITH_PARENT = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []


class Cancel:
    """A cancellation token shared by an operation and the client that may stop it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._running: list[subprocess.Popen[bytes]] = []
        # "client" (stopOperation, removeImage) or "shutdown" (the agent is stopping and the
        # operation must look exactly as if the host had crashed, to be resumed later).
        self.reason = ""

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str = "client") -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()
        with self._lock:
            running = list(self._running)
        for proc in running:
            _kill(proc)

    def check(self) -> None:
        if self.requested:
            raise errors.OperationStopped("operation stopped by client")

    def _track(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._running.append(proc)
        if self.requested:
            _kill(proc)

    def _untrack(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._running.remove(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone: nothing to stop
        proc.send_signal(signal.SIGKILL)


def run(
    argv: Sequence[str],
    progress: ProgressCallback | None = None,
    cancel: Cancel | None = None,
    cwd: str | None = None,
    ok_codes: Sequence[int] = (0,),
) -> str:
    """Run argv, return its stdout; raise NoSpace, OperationStopped or CommandFailed.

    ``ok_codes``: exit codes that are answers, not failures (qemu-img check's 2 and 3).
    """
    if cancel is not None:
        cancel.check()
    log.debug("event=exec argv=%r", list(argv))
    try:
        proc = subprocess.Popen(
            [*_DIE_WITH_PARENT, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=_env(),
            close_fds=True,
        )
    except OSError as e:
        raise errors.CommandFailed(f"cannot run {argv[0]}: {e.strerror}") from e
    if cancel is not None:
        cancel._track(proc)
    try:
        out, err = _collect(proc, progress)
        code = proc.wait()
    finally:
        if cancel is not None:
            cancel._untrack(proc)
    if code not in ok_codes:
        _raise_for(argv, code, err, cancel)
    return out


def _collect(proc: subprocess.Popen[bytes], progress: ProgressCallback | None) -> tuple[str, str]:
    """Read stdout and stderr to their ends, reporting qemu-img's progress as it comes."""
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    tail = ""
    with selectors.DefaultSelector() as sel:
        for f in (proc.stdout, proc.stderr):
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            for key, _ in sel.select():
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                chunks[key.fd].append(data)
                if progress is not None and key.fd == out_fd:
                    tail = (tail + data.decode(errors="replace"))[-64:]
                    found = _PROGRESS.findall(tail)
                    if found:
                        progress(float(found[-1]))
    proc.stdout.close()
    proc.stderr.close()
    return (b"".join(chunks[out_fd]).decode(errors="replace"),
            b"".join(chunks[err_fd]).decode(errors="replace"))


def _raise_for(argv: Sequence[str], code: int, stderr: str, cancel: Cancel | None) -> None:
    if cancel is not None and cancel.requested:
        raise errors.OperationStopped("operation stopped by client")
    message = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {code}"
    if _NO_SPACE.search(stderr):
        raise errors.NoSpace(f"{argv[0]}: {message}")
    raise errors.CommandFailed(f"{argv[0]} failed: {message}", exit_code=code)
