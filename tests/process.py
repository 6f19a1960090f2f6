"""Stopping a child process the way its users would: SIGTERM, then SIGKILL if it lingers."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def terminate(proc: subprocess.Popen[Any], grace: float = 30.0) -> int | None:
    """Ask ``proc`` to stop (SIGTERM: the agent unmounts and leaves what it joined), kill it if
    it has not within ``grace`` seconds; its exit code (None if it had exited already)."""
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
