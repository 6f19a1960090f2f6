"""``strata-client``: call the Strata agent's JSON-RPC API from a shell.

    strata-client [-s SOCKET | -a HOST:PORT [--cert C --key K --ca CA]] [--json] [--timeout S]
                  METHOD [name=value ...] [-f params.json] [--watch] [-h]

Methods and params come from the agent's API document (``rpc.discover``); ``-h`` lists the
methods and ``METHOD -h`` describes one, from the packaged document when the agent is down.

A value is parsed as JSON where it is valid JSON, else taken as a string (a param whose schema
only takes strings keeps the text as typed, so ``repoId=2024`` stays a string). The ``size``
param takes bytes or binary units: ``10G``, ``512M``, ``1.5T``, ``4096``, ``64MiB``.
``-f FILE`` (``-f -``: stdin) gives a JSON object of params; name=value pairs override it.

Output: a table for list calls, ``key: value`` lines for objects, the bare value for strings
(``id=$(strata-client createVirtualDisk targetRepoId=default size=10G)``), nothing for null;
``--json`` prints the raw result as JSON. ``--watch`` follows the image that getImageStatus names
or that createVirtualDisk, createSnapshot or copyImage returns, with a progress line on stderr,
until it is optimized or degraded, or failed.

Exit codes:
    0    success
    1    the agent answered with an error (one line on stderr: NAME (code): message)
    2    usage error: bad arguments, unknown method or param, bad size
    3    cannot reach the agent (the socket path or address and the OS error on stderr)
    4    a watched operation failed (the image is broken with last_error), or with --all:
         a fix failed or a finding needs a person
    130  interrupted (Ctrl-C)

Keeping a repository healthy:
    strata-client checkStorageRepository repositoryId=R            what is left to do
    strata-client fixStorageRepository repositoryId=R --all         do it all, in a safe order
    strata-client fixStorageRepository repositoryId=R --all --types clean,merge
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import fractions
import http.client
import importlib.resources
import json
import os
import re
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn, TextIO

from rpc import fixall, transport

PROG = "strata-client"
DEFAULT_SOCKET = "/run/strata/agent.sock"
SOCKET_ENV = "STRATA_SOCKET"
DEFAULT_TIMEOUT = 60.0
POLL_INTERVAL = 0.5

EXIT_OK = 0
EXIT_REMOTE_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_WATCH_FAILED = 4
EXIT_INTERRUPTED = 130

DISCOVER = "rpc.discover"
STATUS_METHOD = "getImageStatus"
CREATE_METHODS = ("createVirtualDisk", "createSnapshot", "copyImage")  # --watch follows the id
DONE_STATUSES = ("optimized", "degraded")
FAILED_STATUS = "broken"
SIZE_KEYS = ("size", "capacity", "free", "allocated")  # integer bytes, shown human-readable too

Doc = dict[str, Any]
Row = Mapping[str, Any]

USAGE = (
    f"{PROG} [-s SOCKET | -a HOST:PORT [--cert C --key K --ca CA]] [--json] [--timeout S]\n"
    f"       {' ' * len(PROG)} METHOD [name=value ...] [-f params.json] [--watch] [-h]\n"
    f"       {PROG} fixStorageRepository repositoryId=R --all [--types clean,merge]"
)
EPILOG = """\
values:
  name=value is parsed as JSON where it is valid JSON, else taken as a string;
  size=10G, 512M, 1.5T, 4096 (binary units K/M/G/T/P, optional iB/B) is integer bytes.
  -f FILE (- for stdin) gives a JSON object of params; name=value pairs override it.

exit codes:
  0    success
  1    the agent answered with an error
  2    usage error: bad arguments, unknown method or param, bad size
  3    cannot reach the agent
  4    a watched operation failed; with --all, a fix failed or needs a person
  130  interrupted

keeping a repository healthy:
  strata-client fixStorageRepository repositoryId=R --all [--types clean,merge]
      applies every fix checkStorageRepository proposes, in a safe order, following each
"""

DISCOVER_METHOD: Doc = {
    "name": DISCOVER,
    "summary": "The OpenRPC document of the whole API.",
    "params": [],
}

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(?:([KMGTP])(?:i?B)?|B)?", re.IGNORECASE)
_UNITS = ("", "K", "M", "G", "T", "P")
_JSONRPC_NAMES = {
    -32700: "ParseError",
    -32600: "InvalidRequest",
    -32601: "MethodNotFound",
    -32602: "InvalidParams",
    -32603: "InternalError",
}


class UsageError(Exception):
    """Bad arguments: exit 2."""


class Unreachable(Exception):
    """The agent cannot be reached or did not answer JSON-RPC: exit 3."""


class WatchFailed(Exception):
    """A watched operation failed: exit 4."""


# -- values and params (pure) ---------------------------------------------------------------------


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
        return size_value(param["name"], raw)
    value = parse_value(raw)
    if takes_only_strings(param.get("schema", {})) and not isinstance(value, str):
        return raw  # repoId=2024 is the name "2024", not a number the schema refuses
    return value


def size_value(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value  # a number from -f is already bytes; the agent checks the rest
    try:
        return parse_size(value)
    except ValueError as e:
        raise UsageError(f"bad size for param {name!r}: {e}") from None


def split_pair(pair: str) -> tuple[str, str]:
    name, sep, raw = pair.partition("=")
    if not sep or not name:
        raise UsageError(f"{pair!r} is not name=value")
    return name, raw


def params_by_name(method: Doc) -> dict[str, Doc]:
    return {p["name"]: p for p in method.get("params", [])}


def check_names(method: Doc, names: Iterable[str]) -> None:
    known = params_by_name(method)
    unknown = [n for n in names if n not in known]
    if unknown:
        valid = ", ".join(known) or "none"
        raise UsageError(
            f"unknown param {unknown[0]!r} for {method['name']} (valid: {valid})"
        )


def check_required(method: Doc, params: Mapping[str, Any]) -> None:
    missing = [p["name"] for p in method.get("params", [])
               if p.get("required") and p["name"] not in params]
    if missing:
        raise UsageError(f"{method['name']} needs {', '.join(missing)}")


def assemble_params(method: Doc, base: Mapping[str, Any], pairs: Sequence[str]) -> dict[str, Any]:
    """Params from ``-f`` (``base``) overridden by ``name=value`` pairs, checked by name."""
    known = params_by_name(method)
    check_names(method, base)
    out = dict(base)
    for name in out:
        if is_size_param(known[name]):
            out[name] = size_value(name, out[name])
    split = [split_pair(p) for p in pairs]
    check_names(method, (name for name, _ in split))
    for name, raw in split:
        out[name] = convert(known[name], raw)
    check_required(method, out)
    return out


def parse_params_text(text: str, source: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{source} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{source} must hold a JSON object of params")
    return value


def load_params_file(path: str, stdin: TextIO) -> dict[str, Any]:
    if path == "-":
        return parse_params_text(stdin.read(), "stdin")
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_params_text(text, path)


# -- the API document (pure) ----------------------------------------------------------------------


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
    raise UsageError(f"unknown method {name!r}{hint}")


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
    if is_size_param(param):
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
    props = schema.get("properties", {})
    if props:
        sub = max(len(name) for name in props)
        for name, s in props.items():
            default = f", default {json.dumps(s['default'])}" if "default" in s else ""
            desc = f": {s['description']}" if "description" in s else ""
            lines.append(f"{pad}  {name.ljust(sub)}  {schema_type(s)}{default}{desc}")
    return lines


# -- rendering results (pure) ---------------------------------------------------------------------


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


def render_object(obj: Mapping[str, Any]) -> str:
    lines = []
    for key, value in obj.items():
        text = scalar_text(value)
        if key in SIZE_KEYS and isinstance(value, int) and not isinstance(value, bool):
            text = f"{value} ({human_size(value)})"
        lines.append(f"{key}: {text}")
    return "\n".join(lines)


def render_list(method: str, rows: list[Any]) -> str:
    if method in TABLES:
        return render_table([r for r in rows if isinstance(r, dict)], TABLES[method])
    if rows and all(isinstance(r, dict) for r in rows):
        return render_table(rows, generic_columns(rows))
    return "\n".join(scalar_text(r) for r in rows)


def render_result(method: str, result: Any, as_json: bool = False) -> str | None:
    """What to print on stdout for ``result``; None prints nothing."""
    if as_json or method == DISCOVER:
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


# -- watching (pure parts) ------------------------------------------------------------------------


def watch_target(method: str, params: Mapping[str, Any], result: Any) -> tuple[str, str]:
    """(repositoryId, imageId) that ``--watch`` polls after ``method`` returned ``result``."""
    if method == STATUS_METHOD:
        return str(params["repositoryId"]), str(params["imageId"])
    if method in CREATE_METHODS and isinstance(result, str):
        return str(params["targetRepoId"]), result
    raise UsageError(f"{method} returned no image id to watch")


def check_watchable(method: str, params: Mapping[str, Any]) -> None:
    if method != STATUS_METHOD and method not in CREATE_METHODS:
        names = ", ".join((STATUS_METHOD, *CREATE_METHODS))
        raise UsageError(f"--watch works with {names}, not {method}")
    options = params.get("options")
    if isinstance(options, dict) and options.get("AutoFix") is False:
        raise UsageError("--watch would wait forever: with AutoFix=false the work waits for "
                         "fixStorageRepository")


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
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


# -- talking to the agent -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Endpoint:
    socket: str | None = None
    address: tuple[str, int] | None = None
    tls: ssl.SSLContext | None = None

    def describe(self) -> str:
        if self.address is not None:
            host, port = self.address
            host = f"[{host}]" if ":" in host else host
            return f"{'https' if self.tls else 'http'}://{host}:{port}"
        return str(self.socket)


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bad address {text!r}: expected HOST:PORT")
    return host, int(port)


def tls_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    if not (cert or key or ca):
        return None
    if key and not cert:
        raise UsageError("--key needs --cert")
    try:
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
    except OSError as e:  # ssl.SSLError is an OSError
        raise UsageError(f"cannot load the TLS files: {e.strerror or e}") from None
    return ctx


def endpoint(args: argparse.Namespace, environ: Mapping[str, str]) -> Endpoint:
    if args.address is None:
        if args.cert or args.key or args.ca:
            raise UsageError("--cert, --key and --ca go with -a HOST:PORT")
        return Endpoint(socket=args.socket or environ.get(SOCKET_ENV) or DEFAULT_SOCKET)
    return Endpoint(address=parse_address(args.address),
                    tls=tls_context(args.cert, args.key, args.ca))


class Agent:
    """One agent: calls by name, with every transport failure turned into ``Unreachable``."""

    def __init__(self, where: Endpoint, timeout: float) -> None:
        self.where = where
        self._client = transport.Client(
            socket_path=where.socket, address=where.address, tls=where.tls, timeout=timeout
        )

    def call(self, method: str, params: Mapping[str, Any]) -> Any:
        try:
            return self._client.call(method, **params)
        except transport.RemoteError:
            raise
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise Unreachable(f"cannot reach the agent at {self.where.describe()}: {reason}") \
                from None
        except (ValueError, KeyError, TypeError) as e:
            raise Unreachable(
                f"the agent at {self.where.describe()} did not answer JSON-RPC: {e!r}"
            ) from None

    def document(self) -> Doc:
        """The live API document; the packaged one when this agent has no rpc.discover."""
        try:
            doc = self.call(DISCOVER, {})
        except transport.RemoteError:
            return packaged_document()
        if not isinstance(doc, dict):
            raise Unreachable(f"the agent at {self.where.describe()} sent no API document")
        return doc

    def close(self) -> None:
        self._client.close()


def help_document(agent: Agent) -> Doc:
    """The live document, else the packaged one: help works offline."""
    try:
        return agent.document()
    except Unreachable:
        return packaged_document()


def watch(agent: Agent, repo_id: str, image_id: str, progress: Progress,
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
                raise WatchFailed(f"image {image_id} failed: {status.get('last_error')}")
            sleep(POLL_INTERVAL)
    finally:
        progress.finish()


# -- command line ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, usage=USAGE, add_help=False, epilog=EPILOG,
                description="Call the Strata storage agent's JSON-RPC API.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("-s", "--socket", metavar="SOCKET",
                       help=f"the agent's Unix socket (default ${SOCKET_ENV}, else "
                       f"{DEFAULT_SOCKET})")
    where.add_argument("-a", "--address", metavar="HOST:PORT",
                       help="the agent's TCP address (TLS when --cert/--key/--ca are given)")
    p.add_argument("--cert", metavar="C", help="client certificate (PEM)")
    p.add_argument("--key", metavar="K", help="client key (PEM), if not in --cert")
    p.add_argument("--ca", metavar="CA", help="CA bundle that signed the agent's certificate")
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    p.add_argument("--timeout", metavar="S", type=_positive_seconds, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for each answer (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("-f", dest="params_file", metavar="FILE",
                   help="a JSON object of params ('-' reads stdin); name=value overrides it")
    p.add_argument("--watch", action="store_true",
                   help="follow the image until it is optimized or failed (progress on stderr)")
    p.add_argument("--all", action="store_true",
                   help="fixStorageRepository: apply every proposed fix in a safe order and "
                   "follow each until done")
    p.add_argument("--types", metavar="T,T",
                   help="with --all: only these fix types (mend, merge, optimize, clean)")
    p.add_argument("-h", "--help", action="store_true",
                   help="list the methods; with METHOD, describe its params")
    p.add_argument("method", nargs="?", metavar="METHOD", help="an API method (listed below)")
    p.add_argument("params", nargs="*", metavar="name=value",
                   help="a param of METHOD: JSON, else a string; size=10G for sizes")
    return p


def print_help(parser: argparse.ArgumentParser, agent: Agent, method: str | None) -> int:
    doc = help_document(agent)
    if method is None:
        print(parser.format_help())
        print(format_method_list(doc))
    else:
        print(format_method_help(doc, find_method(doc, method)))
    return EXIT_OK


def emit(text: str | None) -> None:
    if text is not None:
        print(text, flush=True)


def run_fix_all(args: argparse.Namespace, agent: Agent) -> int:
    """``fixStorageRepository repositoryId=R --all [--types ...]``: converge a repository."""
    if args.method != "fixStorageRepository" or not args.all:
        raise UsageError("--all (and --types) go with: fixStorageRepository repositoryId=R --all")
    params = dict(split_pair(pair) for pair in args.params)
    if set(params) != {"repositoryId"}:
        raise UsageError("with --all, give only repositoryId=R")
    try:
        types = fixall.parse_types(args.types)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _, failed, manual = fixall.fix_all(agent.call, params["repositoryId"], types, sys.stdout)
    return EXIT_OK if not failed and not manual else EXIT_WATCH_FAILED


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, agent: Agent) -> int:
    if args.help:
        return print_help(parser, agent, args.method)
    if args.method is None:
        raise UsageError(f"a METHOD is needed ({PROG} -h lists them)")
    if args.all or args.types:
        return run_fix_all(args, agent)
    base = load_params_file(args.params_file, sys.stdin) if args.params_file else {}
    doc = agent.document()
    method = find_method(doc, args.method)
    params = assemble_params(method, base, args.params)
    if args.watch:
        check_watchable(args.method, params)
    result = agent.call(args.method, params)
    if not args.watch or args.method != STATUS_METHOD:
        emit(render_result(args.method, result, args.json))
    if args.watch:
        repo_id, image_id = watch_target(args.method, params, result)
        final = watch(agent, repo_id, image_id, Progress(sys.stderr))
        if args.method == STATUS_METHOD:
            emit(render_result(args.method, final, args.json))
    return EXIT_OK


def fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_intermixed_args(argv)
        agent = Agent(endpoint(args, os.environ), args.timeout)
    except UsageError as e:
        return fail(str(e), EXIT_USAGE)
    try:
        return run(args, parser, agent)
    except UsageError as e:
        return fail(str(e), EXIT_USAGE)
    except transport.RemoteError as e:
        return fail(remote_error_line(e), EXIT_REMOTE_ERROR)
    except Unreachable as e:
        return fail(str(e), EXIT_UNREACHABLE)
    except WatchFailed as e:
        return fail(str(e), EXIT_WATCH_FAILED)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # stdout went away (| head): quiet, and no second error when Python flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        agent.close()


if __name__ == "__main__":
    sys.exit(main())
