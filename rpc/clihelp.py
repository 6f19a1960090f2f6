"""The API document as ``strata-client`` reads it (pure): the packaged copy, method lookup, the
method list and the help of one method.
"""

from __future__ import annotations

import difflib
import importlib.resources
import json
from typing import Any

from rpc import clierrors, cliparams

PROG = "strata-client"
DISCOVER = "rpc.discover"

Doc = dict[str, Any]  # a piece of the OpenRPC document: a method, a param, a schema

DISCOVER_METHOD: Doc = {
    "name": DISCOVER,
    "summary": "The OpenRPC document of the whole API.",
    "params": [],
}


def packaged_document() -> Doc:
    text = importlib.resources.files("rpc").joinpath("openrpc.json").read_text()
    doc: Doc = json.loads(text)
    return doc


def method_names(doc: Doc) -> list[str]:
    return [m["name"] for m in doc.get("methods", [])]


def find_method(doc: Doc, name: str) -> Doc:
    if name == DISCOVER:
        return DISCOVER_METHOD
    for m in doc.get("methods", []):
        if m["name"] == name:
            found: Doc = m
            return found
    close = difflib.get_close_matches(name, method_names(doc), n=1)
    hint = f"; did you mean {close[0]}?" if close else f" ({PROG} -h lists the methods)"
    raise clierrors.UsageError(f"unknown method {name!r}{hint}")


def schema_type(schema: Doc) -> str:
    if "enum" in schema:
        return "one of " + "|".join(json.dumps(v) for v in schema["enum"])
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return " or ".join(schema_type(s) for s in schema[key])
    t = schema.get("type")
    if isinstance(t, list):
        return " or ".join(str(x) for x in t)
    return str(t) if t else "any"


def schema_description(schema: Doc) -> str:
    if "description" in schema:
        return str(schema["description"])
    for key in ("oneOf", "anyOf"):
        for sub in schema.get(key, []):
            if "description" in sub:
                return str(sub["description"])
    return ""


def param_default(param: Doc) -> str:
    schema = param.get("schema", {})
    if "default" in schema:
        return json.dumps(schema["default"])
    return "{}" if schema.get("type") == "object" else "null"


def param_summary(param: Doc) -> str:
    kind = schema_type(param.get("schema", {}))
    if cliparams.is_size_param(param):
        kind += " (bytes; 10G, 512M, 1.5T accepted)"
    if param.get("required"):
        return f"{kind}, required"
    return f"{kind}, optional, default {param_default(param)}"


def method_errors(doc: Doc, method: Doc) -> list[tuple[str, int, str]]:
    known = doc.get("components", {}).get("errors", {})
    out = []
    for ref in method.get("errors", []):
        name = str(ref.get("$ref", "")).rsplit("/", 1)[-1]
        e = known.get(name, ref)
        description = e.get("data", {}).get("description", "")
        out.append((name or str(e.get("message", "")), int(e.get("code", 0)), description))
    return out


def format_method_list(doc: Doc) -> str:
    methods = [*doc.get("methods", []), DISCOVER_METHOD]
    width = max(len(m["name"]) for m in methods)
    lines = [f"methods ({PROG} METHOD -h describes one):"]
    lines += [f"  {m['name'].ljust(width)}  {m.get('summary', '')}".rstrip() for m in methods]
    return "\n".join(lines)


def format_method_help(doc: Doc, method: Doc) -> str:
    params = method.get("params", [])
    call = " ".join(
        f"{p['name']}=..." if p.get("required") else f"[{p['name']}=...]" for p in params
    )
    lines = [f"{method['name']}: {method.get('summary', '')}".rstrip(), "",
             f"usage: {PROG} {method['name']} {call}".rstrip()]
    if params:
        lines += ["", "params:"]
        width = max(len(p["name"]) for p in params)
        for p in params:
            lines += _param_lines(p, width)
    errors = method_errors(doc, method)
    if errors:
        lines += ["", "errors:"]
        width = max(len(f"{n} ({c})") for n, c, _ in errors)
        lines += [f"  {f'{n} ({c})'.ljust(width)}  {d}".rstrip() for n, c, d in errors]
    lines.append("  (and -32602 InvalidParams when a param does not fit; the message names it)")
    return "\n".join(lines)


def _param_lines(param: Doc, width: int) -> list[str]:
    pad = " " * (width + 4)
    schema = param.get("schema", {})
    lines = [f"  {param['name'].ljust(width)}  {param_summary(param)}"]
    text = param.get("description") or schema_description(schema)
    if text:
        lines.append(f"{pad}{text}")
    lines += _property_lines(schema, pad)
    # A param whose keys depend on another param (connectionParameters on repoFormat).
    for fmt, sub_schema in schema.get("x-formats", {}).items():
        lines.append(f"{pad}{fmt}:")
        lines += _property_lines(sub_schema, pad + "  ", show_required=True)
    return lines


def _property_lines(schema: Doc, pad: str, show_required: bool = False) -> list[str]:
    props = schema.get("properties", {})
    if not props:
        return []
    required = set(schema.get("required", []))
    sub = max(len(name) for name in props)
    lines = []
    for name, s in props.items():
        default = f", default {json.dumps(s['default'])}" if "default" in s else ""
        need = (", required" if name in required else ", optional") if show_required else ""
        desc = f": {s['description']}" if "description" in s else ""
        lines.append(f"{pad}  {name.ljust(sub)}  {schema_type(s)}{need}{default}{desc}")
    return lines
