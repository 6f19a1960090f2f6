"""The OpenRPC document (``openrpc.json``): the one source of truth for methods and params.

The server binds and validates every call against it, ``rpc.discover`` returns it, and the CLI
reads it for help. ``bind`` turns positional or named params into a complete, checked dict.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
from typing import Any

import jsonschema

INVALID_PARAMS = -32602
# Deeper JSON than this is refused at the edge: nothing in the API needs it, and deep nesting
# makes recursive code (dataclasses.asdict, json) blow the stack.
MAX_DEPTH = 32


class ParamError(Exception):
    """A call's params do not fit the document; the message names the parameter."""


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    schema: dict[str, Any]
    required: bool
    validator: Any


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    params: tuple[Param, ...]

    def bind(self, args: list[Any] | None, kwargs: dict[str, Any] | None) -> dict[str, Any]:
        given: dict[str, Any] = {}
        if args:
            if len(args) > len(self.params):
                raise ParamError(
                    f"{self.name} takes at most {len(self.params)} params, got {len(args)}"
                )
            given = {p.name: v for p, v in zip(self.params, args, strict=False)}
        elif kwargs:
            known = {p.name for p in self.params}
            for name in kwargs:
                if name not in known:
                    raise ParamError(f"unknown parameter {name!r} for {self.name}")
            given = dict(kwargs)
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name not in given:
                if p.required:
                    raise ParamError(f"missing required parameter {p.name!r}")
                out[p.name] = _default(p.schema)
                continue
            value = given[p.name]
            if _depth(value) > MAX_DEPTH:
                raise ParamError(f"invalid parameter {p.name!r}: nested deeper than {MAX_DEPTH}")
            # is_valid stops at the first failure; best_match walks every error and is worth
            # it only for the message (a quarter of a getImageStatus call's CPU when always run).
            error = (None if p.validator.is_valid(value)
                     else jsonschema.exceptions.best_match(p.validator.iter_errors(value)))
            if error is not None:
                where = "".join(f"[{x!r}]" for x in error.absolute_path)
                hint = p.schema.get("description")
                raise ParamError(
                    f"invalid parameter {p.name!r}{where}: {error.message}"
                    + (f" (expected {hint})" if hint and not where else "")
                )
            limit = p.schema.get("x-maxJsonBytes")
            if limit is not None and len(json.dumps(value)) > limit:
                raise ParamError(f"invalid parameter {p.name!r}: larger than {limit} bytes")
            if p.schema.get("type") == "integer":
                value = int(value)  # 1024.0 is a valid JSON integer; qemu-img wants 1024
            out[p.name] = value
        return out


def _depth(value: Any, limit: int = MAX_DEPTH + 1) -> int:
    """Nesting depth of a JSON value, counted up to ``limit`` (iteratively: no recursion)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return depth
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _default(schema: dict[str, Any]) -> Any:
    if "default" in schema:
        return json.loads(json.dumps(schema["default"]))  # a fresh copy
    if schema.get("type") == "object":
        return {}
    return None


@functools.cache
def document() -> dict[str, Any]:
    text = importlib.resources.files("rpc").joinpath("openrpc.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc


@functools.cache
def methods() -> dict[str, Method]:
    out = {}
    for m in document()["methods"]:
        params = tuple(
            Param(
                p["name"],
                p["schema"],
                p.get("required", False),
                jsonschema.Draft202012Validator(
                    p["schema"], format_checker=jsonschema.FormatChecker()
                ),
            )
            for p in m["params"]
        )
        out[m["name"]] = Method(m["name"], params)
    return out


def error_codes() -> dict[str, int]:
    """Domain error names and codes, as the document publishes them."""
    return {name: e["code"] for name, e in document()["components"]["errors"].items()}
