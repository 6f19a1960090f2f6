"""The one logging configuration of the agent.

Every line is ``ts=<ISO 8601, UTC> level=<LEVEL> logger=<name> <message>``, and messages themselves
are key=value, so a line can be grepped and parsed without knowing which module wrote it. Lines go
to stderr, which journald collects under systemd, and optionally to a file.
"""

from __future__ import annotations

import datetime
import logging
import logging.handlers
import sys

from agent import logctx

FORMAT = "ts=%(asctime)s level=%(levelname)s logger=%(name)s%(ctx)s %(message)s"

# The handlers the last setup() installed, so that another call replaces them instead of adding.
_installed: list[logging.Handler] = []


class _Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # UTC with an explicit offset: hosts of a fleet disagree about local time zones.
        ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        return ts.isoformat(timespec="milliseconds")


def setup(level: str, file: str = "") -> None:
    """Configure the root logger; calling it again replaces the previous configuration."""
    formatter = _Formatter(FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file:
        # Opened before anything changes, so a bad path leaves the old configuration in place.
        # WatchedFileHandler reopens the file when logrotate moves it away.
        handlers.append(logging.handlers.WatchedFileHandler(file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(logctx.Filter())  # req=... op=... on every line that has them

    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed[:] = handlers
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)

    logging.captureWarnings(True)
