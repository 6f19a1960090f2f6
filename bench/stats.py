"""Samples, medians, percentiles and the ratios of pairs run alternately."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence

# Units a sample series can carry; ``fmt`` scales them for reading.
SECONDS = "s"
BYTES = "B"
BYTES_PER_S = "B/s"
CALLS_PER_S = "calls/s"


@dataclasses.dataclass
class Samples:
    values: list[float]
    unit: str

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def __len__(self) -> int:
        return len(self.values)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of values."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def pair_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median, over blocks of two consecutive pairs, of sum(a) / sum(b) in the block.

    Each pair ran back to back, so slow drift cancels out; the pairs alternate their order
    (``alternate``, fig_create's rounds), so a block holds each order once and what running
    first costs (the fsync that carries the writes of whatever ran before) weighs on both
    sides alike. The median of single-pair ratios did not cancel it: with the order effect
    larger than the noise, the ratios form two clusters and their median is the edge of one
    of them (two identical 1 TiB and 1 GiB creates came out 0.85x). A lone last pair is left
    out; a single pair is its own ratio."""
    if len(a) != len(b) or not a:
        raise ValueError(f"pair_ratio needs two equally long non-empty lists ({len(a)}, {len(b)})")
    if len(a) == 1:
        return a[0] / b[0]
    return statistics.median((a[i] + a[i + 1]) / (b[i] + b[i + 1])
                             for i in range(0, len(a) - 1, 2))


def alternate(n: int, first: Callable[[], float], second: Callable[[], float],
              warmup: bool = True) -> tuple[list[float], list[float]]:
    """Run n pairs, swapping the order every pair; a warm-up pair is run and dropped."""
    if warmup:
        first()
        second()
    xs: list[float] = []
    ys: list[float] = []
    for i in range(n):
        if i % 2 == 0:
            xs.append(first())
            ys.append(second())
        else:
            ys.append(second())
            xs.append(first())
    return xs, ys


def _scale(value: float, unit: str) -> tuple[float, str]:
    """The divisor and suffix that make ``value`` readable."""
    if unit == SECONDS:
        if abs(value) < 1.0:
            return 1e-3, "ms"
        return 1.0, "s"
    if unit == BYTES:
        if abs(value) >= 1 << 30:
            return float(1 << 30), "GiB"
        return float(1 << 20), "MiB"
    if unit == BYTES_PER_S:
        return float(1 << 20), "MiB/s"
    if unit == CALLS_PER_S:
        return 1.0, "calls/s"
    return 1.0, unit


def _number(x: float) -> str:
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt(value: float, unit: str) -> str:
    div, suffix = _scale(value, unit)
    return f"{_number(value / div)} {suffix}"


def fmt_samples(s: Samples) -> str:
    """``median (min–max) unit``, all in the median's scale."""
    div, suffix = _scale(s.median, s.unit)
    if len(s) == 1 or s.low == s.high:
        return f"{_number(s.median / div)} {suffix}"
    return (f"{_number(s.median / div)} ({_number(s.low / div)}–{_number(s.high / div)})"
            f" {suffix}")
