"""``strata-client`` values and params (pure): sizes, JSON-or-string values, ``-f`` files, and
params assembled and checked against a method of the API document.

A value is parsed as JSON where it is valid JSON, else taken as a string; a param whose schema only
takes strings keeps the text as typed. The ``size`` param takes bytes or binary units.
"""

from __future__ import annotations

import fractions
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from rpc import clierrors, clirender

Doc = dict[str, Any]  # a piece of the OpenRPC document: a method, a param, a schema

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(?:([KMGTP])(?:i?B)?|B)?", re.IGNORECASE)
_UNITS = ("", "K", "M", "G", "T", "P")


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``1.5T``, ``4096``, ``64MiB`` -> integer bytes (binary units)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size (bytes, or a number with K, M, G, T or P)")
    unit = (m.group(2) or "").upper()
    value = fractions.Fraction(m.group(1)) * 1024 ** _UNITS.index(unit)
    if value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_value(text: str) -> Any:
    """JSON where the text is valid JSON, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def is_size_param(param: Doc) -> bool:
    return bool(param.get("name") == "size" and param.get("schema", {}).get("type") == "integer")


def takes_only_strings(schema: Doc) -> bool:
    return bool(schema.get("type") == "string")


def convert(param: Doc, raw: str) -> Any:
    """The value of ``name=raw`` for this param of the document."""
    if is_size_param(param):
        return size_value(param, raw)
    value = parse_value(raw)
    if takes_only_strings(param.get("schema", {})) and not isinstance(value, str):
        return raw  # repoId=2024 is the name "2024", not a number the schema refuses
    return value


def size_value(param: Doc, value: Any) -> int:
    """Integer bytes for a size param, from ``10G`` or from bytes (a number in ``-f``), checked
    against the param's schema here: a bad size is a usage error (exit 2), never a call."""
    name = param["name"]
    try:
        if isinstance(value, str):
            size = parse_size(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            size = value
        else:
            raise ValueError(f"{json.dumps(value)} is not a size (bytes, or a string such as "
                             "\"10G\")")
        check_size(size, param.get("schema", {}))
    except ValueError as e:
        raise clierrors.UsageError(f"bad size for param {name!r}: {e}") from None
    return size


def check_size(size: int, schema: Doc) -> None:
    """The schema's bounds and alignment, said in bytes and in binary units."""
    low, high, step = schema.get("minimum"), schema.get("maximum"), schema.get("multipleOf")
    if isinstance(low, int) and size < low:
        raise ValueError(f"{_bytes(size)} is less than the minimum, {_bytes(low)}")
    if isinstance(high, int) and size > high:
        raise ValueError(f"{_bytes(size)} is more than the maximum, {_bytes(high)}")
    if isinstance(step, int) and step > 0 and size % step:
        raise ValueError(f"{_bytes(size)} is not a multiple of {step} bytes")


def _bytes(n: int) -> str:
    text = f"{n} bytes"
    return text if abs(n) < 1024 else f"{text} ({clirender.human_size(n)})"


def split_pair(pair: str) -> tuple[str, str]:
    name, sep, raw = pair.partition("=")
    if not sep or not name:
        raise clierrors.UsageError(f"{pair!r} is not name=value")
    return name, raw


def split_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``name=value`` pairs by name; a name given twice is refused rather than one of its values
    silently dropped (``-f`` values may be overridden by a pair: that is what -f is for)."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, raw = split_pair(pair)
        if name in out:
            raise clierrors.UsageError(
                f"param {name!r} is given twice ({name}={out[name]} and {pair}): give it once"
            )
        out[name] = raw
    return out


def params_by_name(method: Doc) -> dict[str, Doc]:
    return {p["name"]: p for p in method.get("params", [])}


def check_names(method: Doc, names: Iterable[str]) -> None:
    known = params_by_name(method)
    unknown = [n for n in names if n not in known]
    if unknown:
        valid = ", ".join(known) or "none"
        raise clierrors.UsageError(
            f"unknown param {unknown[0]!r} for {method['name']} (valid: {valid})"
        )


def check_required(method: Doc, params: Mapping[str, Any]) -> None:
    missing = [p["name"] for p in method.get("params", [])
               if p.get("required") and p["name"] not in params]
    if missing:
        raise clierrors.UsageError(f"{method['name']} needs {', '.join(missing)}")


def assemble_params(method: Doc, base: Mapping[str, Any], pairs: Sequence[str]) -> dict[str, Any]:
    """Params from ``-f`` (``base``) overridden by ``name=value`` pairs, checked by name."""
    known = params_by_name(method)
    check_names(method, base)
    out = dict(base)
    split = split_pairs(pairs)
    check_names(method, split)
    for name in out:
        if is_size_param(known[name]) and name not in split:
            out[name] = size_value(known[name], out[name])
    for name, raw in split.items():
        out[name] = convert(known[name], raw)
    check_required(method, out)
    return out


def parse_params_text(text: str, source: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise clierrors.UsageError(f"{source} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise clierrors.UsageError(f"{source} must hold a JSON object of params")
    return value


def load_params_file(path: str, stdin: TextIO) -> dict[str, Any]:
    if path == "-":
        return parse_params_text(stdin.read(), "stdin")
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise clierrors.UsageError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_params_text(text, path)
