"""Every child process Strata runs goes through here.

Processes are run with ``sh`` from whatever real thread calls us. The daemon never monkey-patches
(gevent >= 25.8.1 patches ``os.close`` and sh hangs), so callers on the gevent hub must hand this
work to a thread pool; keeping all execution in this module keeps that rule in one place.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import signal
import threading
from collections.abc import Callable, Sequence

import sh

from agent import errors

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float], None]

# qemu-img -p writes "    (12.34/100%)\r" repeatedly to stdout.
_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")
_NO_SPACE = re.compile(r"No space left on device|ENOSPC", re.I)


class Cancel:
    """A cancellation token shared by an operation and the client that may stop it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._running: list[sh.RunningCommand] = []
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
            with contextlib.suppress(Exception):  # already gone: nothing to stop
                proc.kill()

    def check(self) -> None:
        if self.requested:
            raise errors.OperationStopped("operation stopped by client")

    def _track(self, proc: sh.RunningCommand) -> None:
        with self._lock:
            self._running.append(proc)
        if self.requested:
            proc.kill()

    def _untrack(self, proc: sh.RunningCommand) -> None:
        with self._lock:
            self._running.remove(proc)


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
    # sh hands callbacks decoded text, in whatever pieces the pipe delivers.
    out: list[str] = []
    err: list[str] = []
    tail = [""]

    def on_out(chunk: str) -> None:
        out.append(chunk)
        if progress is not None:
            tail[0] = (tail[0] + chunk)[-64:]
            found = _PROGRESS.findall(tail[0])
            if found:
                progress(float(found[-1]))

    log.debug("event=exec argv=%r", list(argv))
    cmd = sh.Command(argv[0])
    proc = cmd(
        *argv[1:],
        _bg=True,
        _bg_exc=False,
        _out=on_out,
        _err=err.append,
        _out_bufsize=0,
        _err_bufsize=0,
        _decode_errors="replace",
        _cwd=cwd,
        _env=_ENV,
        _preexec_fn=_die_with_parent,
        _ok_code=list(ok_codes),
    )
    if cancel is not None:
        cancel._track(proc)
    try:
        proc.wait()
    except sh.ErrorReturnCode as e:
        _raise_for(argv, e.exit_code, "".join(err), cancel)
    except sh.SignalException as e:
        _raise_for(argv, e.exit_code, "".join(err), cancel)
    finally:
        if cancel is not None:
            cancel._untrack(proc)
    return "".join(out)


def _raise_for(argv: Sequence[str], code: int, stderr: str, cancel: Cancel | None) -> None:
    if cancel is not None and cancel.requested:
        raise errors.OperationStopped("operation stopped by client")
    message = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {code}"
    if _NO_SPACE.search(stderr):
        raise errors.NoSpace(f"{argv[0]}: {message}")
    raise errors.CommandFailed(f"{argv[0]} failed: {message}", exit_code=code)


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the child: if the agent dies (kill -9), take qemu-img with it.

    Otherwise an orphaned copy would go on writing a partial file that a restarted agent is
    about to recreate. (The signal follows the forking thread; our worker threads live as long
    as the agent.)
    """
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# C locale: we parse qemu-img's messages, so they must not be translated.
_ENV = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
