"""Test-only fault injection: crash the agent at a named point, as a power cut would.

``STRATA_TEST_CRASH_AT=KIND:STEP`` (read once at start-up) makes the process ``_exit(75)`` when it
reaches that point: just before step STEP of an operation of kind KIND runs (``copyImage:seal``),
or at a phase of the clean fix (``clean:volumes``). With ``STRATA_TEST_CRASH_ARM=FILE`` as well,
the point fires only once FILE exists, so a test can build its scene first. The crash tests
enumerate every point; never set these variables in production.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

EXIT_CODE = 75
_AT = os.environ.get("STRATA_TEST_CRASH_AT", "")
_ARM = os.environ.get("STRATA_TEST_CRASH_ARM", "")

# The phases of the clean fix, in the order it runs them.
CLEAN_POINTS = ("volumes", "volume-record", "files", "journals", "images")


def hit(kind: str, step: str) -> None:
    if _AT and f"{kind}:{step}" == _AT and (not _ARM or os.path.exists(_ARM)):
        log.warning("event=test_crash point=%s:%s", kind, step)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_CODE)
