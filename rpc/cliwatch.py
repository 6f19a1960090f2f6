"""``strata-client --watch``: follow an image until it is optimized or degraded, or failed, with a
progress line on stderr.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from rpc import cliagent, clierrors

POLL_INTERVAL = 0.5
STATUS_METHOD = "getImageStatus"
CREATE_METHODS = ("createVirtualDisk", "createSnapshot", "copyImage")  # --watch follows the id
DONE_STATUSES = ("optimized", "degraded")
FAILED_STATUS = "broken"


def watch_target(method: str, params: Mapping[str, Any], result: Any) -> tuple[str, str]:
    """(repositoryId, imageId) that ``--watch`` polls after ``method`` returned ``result``."""
    if method == STATUS_METHOD:
        return str(params["repositoryId"]), str(params["imageId"])
    if method in CREATE_METHODS and isinstance(result, str):
        return str(params["targetRepoId"]), result
    raise clierrors.UsageError(f"{method} returned no image id to watch")


def check_watchable(method: str, params: Mapping[str, Any]) -> None:
    if method != STATUS_METHOD and method not in CREATE_METHODS:
        names = ", ".join((STATUS_METHOD, *CREATE_METHODS))
        raise clierrors.UsageError(f"--watch works with {names}, not {method}")
    options = params.get("options")
    if isinstance(options, dict) and options.get("AutoFix") is False:
        raise clierrors.UsageError("--watch would wait forever: with AutoFix=false the work "
                                   "waits for fixStorageRepository")


def watch_outcome(status: Mapping[str, Any]) -> bool | None:
    """True when done, False when failed, None while still going."""
    if status.get("status") in DONE_STATUSES:
        return True
    if status.get("status") == FAILED_STATUS and status.get("last_error") \
            and not status.get("running"):
        return False
    return None


def progress_line(status: Mapping[str, Any], width: int = 30) -> str:
    percent = status.get("percent_complete", -1)
    known = isinstance(percent, int) and 0 <= percent <= 100
    filled = width * percent // 100 if known else 0
    bar = "#" * filled + "." * (width - filled) if known else "?" * width
    pct = f"{percent:3d}%" if known else "  ?%"
    op = status.get("operation")
    tail = f"  {op}" if op else ""
    return f"[{bar}] {pct}  {status.get('status', '?')}  stage {status.get('stage', '?')}{tail}"


class Progress:
    """A one-line progress bar on a TTY; elsewhere a line each time the progress changes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last: tuple[Any, ...] | None = None
        self._drawn = False

    def update(self, status: Mapping[str, Any]) -> None:
        line = progress_line(status)
        if self._tty:
            self._stream.write(f"\r{line}\x1b[K")
            self._drawn = True
        else:
            key = (status.get("status"), status.get("stage"), status.get("percent_complete"))
            if key == self._last:
                return
            self._last = key
            self._stream.write(line + "\n")
        self._stream.flush()

    def finish(self) -> None:
        """End the line; the next update starts afresh (fix --all follows one fix after
        another: the next one's first line is shown even when it looks like the last)."""
        self._last = None
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


def watch(agent: cliagent.Agent, repo_id: str, image_id: str, progress: Progress,
          sleep: Callable[[float], None] = time.sleep) -> Mapping[str, Any]:
    """Poll until the image is done (return its status) or failed (raise WatchFailed)."""
    params = {"repositoryId": repo_id, "imageId": image_id}
    try:
        while True:
            status = agent.call(STATUS_METHOD, params)
            progress.update(status)
            outcome = watch_outcome(status)
            if outcome is True:
                return dict(status)
            if outcome is False:
                raise clierrors.WatchFailed(f"image {image_id} failed: {status.get('last_error')}")
            sleep(POLL_INTERVAL)
    finally:
        progress.finish()
