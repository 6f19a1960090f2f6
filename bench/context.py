"""What every figure shares: the temporary directory, the cleanups, the agent and the results."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING

from bench import stats

if TYPE_CHECKING:
    from bench import agentproc, fixtures, shared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PASS = "pass"
SHORT = "short"
SKIP = "skip"
ERROR = "error"
INFO = "info"


class BenchError(Exception):
    """A benchmark step failed (not a figure that missed its target)."""


@dataclasses.dataclass
class Row:
    figure: str
    strata: stats.Samples | None
    reference: stats.Samples | None
    ref_label: str
    ratio: float | None
    target: str
    result: str
    note: str = ""
    n: int | None = None  # the number of runs, when the cells show one value made of them (p95)


@dataclasses.dataclass
class Bench:
    base: str  # the temporary directory everything lives under
    quick: bool
    cleanup: contextlib.ExitStack
    agent: agentproc.Agent
    # Shared images, made on first use (set right after construction).
    images: fixtures.Images = dataclasses.field(init=False)
    # The GlusterFS volume and hosts of figures 9-12, made on first use (bench/shared.py).
    shared: shared.Shared | None = None
    rows: list[Row] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.monotonic)

    def reps(self, n: int) -> int:
        """Repetitions of a figure: n, or about a third of it with --quick (at least 2)."""
        return max(2, n // 3) if self.quick else n

    def path(self, *parts: str) -> str:
        p = os.path.join(self.base, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def dir(self, *parts: str) -> str:
        p = os.path.join(self.base, *parts)
        os.makedirs(p, exist_ok=True)
        return p

    def say(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr,
              flush=True)

    def note(self, message: str) -> None:
        self.notes.append(message)

    # -- rows ------------------------------------------------------------------------------------

    def compare(self, figure: str, strata: stats.Samples, reference: stats.Samples | None,
                ref_label: str, ratio: float | None, target: str, ok: bool | None,
                note: str = "", n: int | None = None) -> None:
        result = INFO if ok is None else (PASS if ok else SHORT)
        self.rows.append(Row(figure, strata, reference, ref_label, ratio, target, result, note,
                             n))

    def skip(self, figure: str, target: str, reason: str) -> None:
        self.rows.append(Row(figure, None, None, "", None, target, SKIP, reason))

    def error(self, figure: str, reason: str) -> None:
        self.rows.append(Row(figure, None, None, "", None, "", ERROR, reason))


def new_id() -> str:
    """An id of the kind the agent makes (a lower-case UUID)."""
    return str(uuid.uuid4())
