"""What ``strata-client`` prints for a result (pure): tables for list calls, ``key: value`` lines
for objects, the bare value for strings, human-readable sizes, and the one-line remote error.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rpc import clihelp, transport

SIZE_KEYS = ("size", "capacity", "free", "allocated")  # integer bytes, shown human-readable too
TIME_KEYS = ("created",)  # seconds since the epoch, shown as a local ISO date and time
DURATION_KEYS = ("uptime",)  # seconds
COUNT_KEYS = ("images",)  # {name: count}

Row = Mapping[str, Any]

_JSONRPC_NAMES = {
    -32700: "ParseError",
    -32600: "InvalidRequest",
    -32601: "MethodNotFound",
    -32602: "InvalidParams",
    -32603: "InternalError",
}


def human_size(n: int) -> str:
    """Binary units, at most one decimal: 67108864 -> '64 MiB', 1610612736 -> '1.5 GiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    value = float(n)
    exponent = 0
    while abs(value) >= 1024 and exponent < len(units) - 1:
        value /= 1024
        exponent += 1
    unit = units[exponent]
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text} {unit}"


def scalar_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def time_text(value: Any) -> str:
    """Seconds since the epoch -> the local date and time, ISO 8601 with the UTC offset:
    1763857025.5 -> '2025-11-23 00:17:05+00:00' (with TZ=UTC)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            when = datetime.datetime.fromtimestamp(value).astimezone()
        except (OverflowError, OSError, ValueError):
            return scalar_text(value)
        return when.isoformat(sep=" ", timespec="seconds")
    return scalar_text(value)


def duration_text(value: Any) -> str:
    """Seconds -> '3723.5 s (1 h 2 min)'; under a minute, '12.5 s'."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return scalar_text(value)
    if value < 60:
        return f"{value} s"
    days, rest = divmod(int(value // 60), 24 * 60)
    hours, minutes = divmod(rest, 60)
    parts = [f"{n} {unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "min")) if n]
    return f"{value} s ({' '.join(parts)})"


def size_text(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return human_size(value)
    return scalar_text(value)


def counts_text(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return scalar_text(value)


@dataclasses.dataclass(frozen=True)
class Column:
    title: str
    cell: Callable[[Row], str]


def field(key: str, fmt: Callable[[Any], str] = scalar_text, *alts: str) -> Callable[[Row], str]:
    """A cell showing ``row[key]`` (or the first of ``alts`` present) through ``fmt``."""

    def cell(row: Row) -> str:
        for k in (key, *alts):
            if k in row:
                return fmt(row[k])
        return "-"

    return cell


TABLES: dict[str, tuple[Column, ...]] = {
    "listImages": (
        Column("IMAGE ID", field("imageId")),
        Column("KIND", field("kind")),
        Column("SIZE", field("size", size_text)),
        Column("STATUS", field("status")),
        Column("PREPARED", field("prepared")),
        Column("PARENT", field("parentId", scalar_text, "parent")),
        Column("CREATED", field("created", time_text)),
    ),
    "listStorageRepositories": (
        Column("REPO ID", field("repoId")),
        Column("FORMAT", field("repoFormat", scalar_text, "format")),
        Column("CAPACITY", field("capacity", size_text)),
        Column("FREE", field("free", size_text)),
        Column("IMAGES", field("images", counts_text)),
    ),
    "checkStorageRepository": (
        Column("TYPE", field("type")),
        Column("IMAGES", field("imageIds", scalar_text, "images")),
        Column("DESCRIPTION", field("description")),
    ),
}


def render_table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    cells = [[c.title for c in columns]] + [[c.cell(r) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def generic_columns(rows: Sequence[Row]) -> tuple[Column, ...]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return tuple(Column(k.upper(), field(k)) for k in keys)


def object_value_text(key: str, value: Any) -> str:
    """One value of a ``key: value`` line: sizes in binary units with the exact byte count,
    times as local dates; everything else as it came (``--json`` shows it all raw)."""
    if key in SIZE_KEYS and isinstance(value, int) and not isinstance(value, bool):
        return human_size(value) if abs(value) < 1024 else f"{human_size(value)} ({value} bytes)"
    if key in TIME_KEYS:
        return time_text(value)
    if key in DURATION_KEYS:
        return duration_text(value)
    if key in COUNT_KEYS and isinstance(value, dict):
        return counts_text(value)
    return scalar_text(value)


def render_object(obj: Mapping[str, Any]) -> str:
    return "\n".join(f"{key}: {object_value_text(key, value)}" for key, value in obj.items())


def render_list(method: str, rows: list[Any]) -> str:
    if method in TABLES:
        return render_table([r for r in rows if isinstance(r, dict)], TABLES[method])
    if rows and all(isinstance(r, dict) for r in rows):
        return render_table(rows, generic_columns(rows))
    return "\n".join(scalar_text(r) for r in rows)


def render_result(method: str, result: Any, as_json: bool = False) -> str | None:
    """What to print on stdout for ``result``; None prints nothing."""
    if as_json or method == clihelp.DISCOVER:
        return json.dumps(result, indent=2)
    if result is None:
        return None
    if isinstance(result, str):
        return result
    if isinstance(result, list):
        return render_list(method, result)
    if isinstance(result, dict):
        return render_object(result)
    return json.dumps(result)


def remote_error_line(e: transport.RemoteError) -> str:
    name = e.name or _JSONRPC_NAMES.get(e.code, "error")
    message = " ".join(str(e.message).split())
    return f"{name} ({e.code}): {message}"
