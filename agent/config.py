"""The agent's configuration: typed, frozen sections with defaults, read from INI files.

``load(path)`` reads the main file, then every ``conf.d/*.conf`` beside it in sorted order; a key
set later wins. The section dataclasses below are the one table of keys: each field carries its
default and its ``_Kind`` (how its text is parsed, checked and written back), so adding a key is one
line.
Every value is checked as it is read, so a bad value is an error even when a later file overrides
it: the operator sees every mistake, not only the effective ones.
"""

from __future__ import annotations

import configparser
import dataclasses
import glob
import ipaddress
import os
import re
from typing import Any, ClassVar, Protocol, TypeVar

from agent import errors

T = TypeVar("T")

# The limit of sockaddr_un.sun_path (108 bytes) less the terminating NUL.
MAX_SOCKET_PATH = 107

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(errors.Error):
    code = 1002
    name = "ConfigError"


class _Kind(Protocol):
    """How one key's text becomes a value; ``parse`` raises ValueError for a bad one."""

    @property
    def expect(self) -> str: ...

    def parse(self, text: str) -> Any: ...

    def format(self, value: Any) -> str: ...


@dataclasses.dataclass(frozen=True)
class _Int:
    low: int
    high: int

    @property
    def expect(self) -> str:
        return f"an integer from {self.low} to {self.high}"

    def parse(self, text: str) -> int:
        # Stricter than int(): no "1_000", no "0x10", no spaces inside.
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise ValueError(text)
        value = int(text)
        if not self.low <= value <= self.high:
            raise ValueError(text)
        return value

    def format(self, value: int) -> str:
        return str(value)


@dataclasses.dataclass(frozen=True)
class _Bool:
    expect: ClassVar[str] = "a boolean (yes/no, true/false, on/off, 1/0)"

    def parse(self, text: str) -> bool:
        # The spellings configparser's getboolean() accepts.
        try:
            return configparser.ConfigParser.BOOLEAN_STATES[text.lower()]
        except KeyError:
            raise ValueError(text) from None

    def format(self, value: bool) -> str:
        return "true" if value else "false"


@dataclasses.dataclass(frozen=True)
class _Choice:
    choices: tuple[str, ...]

    @property
    def expect(self) -> str:
        return "one of " + ", ".join(self.choices)

    def parse(self, text: str) -> str:
        value = text.upper()
        if value not in self.choices:
            raise ValueError(text)
        return value

    def format(self, value: str) -> str:
        return value


@dataclasses.dataclass(frozen=True)
class _Path:
    """An absolute path: the daemon runs from / under systemd, so a relative one would surprise."""

    optional: bool = False
    max_bytes: int = 0

    @property
    def expect(self) -> str:
        text = "an absolute path"
        if self.max_bytes:
            text += f" of at most {self.max_bytes} bytes (the limit of a Unix socket address)"
        if self.optional:
            text += " or empty"
        return text

    def parse(self, text: str) -> str:
        if text == "" and self.optional:
            return text
        if not os.path.isabs(text):
            raise ValueError(text)
        path = os.path.normpath(text)
        if self.max_bytes and len(os.fsencode(path)) > self.max_bytes:
            raise ValueError(text)
        return path

    def format(self, value: str) -> str:
        return value


@dataclasses.dataclass(frozen=True)
class _Address:
    """An IP address to listen on, or nothing; a literal so "is it loopback?" has a sure answer."""

    expect: ClassVar[str] = "an IP address (e.g. 0.0.0.0, ::, 127.0.0.1) or nothing for no TCP"

    def parse(self, text: str) -> str:
        if text:
            ipaddress.ip_address(text)
        return text

    def format(self, value: str) -> str:
        return value


def _key(kind: _Kind, default: T) -> T:
    return dataclasses.field(default=default, metadata={"kind": kind})


@dataclasses.dataclass(frozen=True)
class Host:
    # sanlock's host ids go from 1 to 2000.
    id: int = _key(_Int(1, 2000), 1)


@dataclasses.dataclass(frozen=True)
class Rpc:
    socket: str = _key(_Path(max_bytes=MAX_SOCKET_PATH), "/run/strata/agent.sock")
    tcp_address: str = _key(_Address(), "")
    tcp_port: int = _key(_Int(1, 65535), 54323)
    tls_cert: str = _key(_Path(optional=True), "")
    tls_key: str = _key(_Path(optional=True), "")
    tls_ca: str = _key(_Path(optional=True), "")
    plain_tcp: bool = _key(_Bool(), False)
    max_request_bytes: int = _key(_Int(1024, 1 << 30), 1 << 20)
    # Calls about one repository run on that repository's own threads, so a file system that
    # hangs holds only its own; a call waits at most the timeout (seconds) for its answer.
    repository_threads: int = _key(_Int(1, 64), 4)
    repository_call_timeout: int = _key(_Int(1, 3600), 30)
    # What one careless or hostile client may hold (see rpc/connections.py); seconds and counts.
    handshake_timeout: int = _key(_Int(1, 3600), 10)
    header_timeout: int = _key(_Int(1, 3600), 10)
    body_timeout: int = _key(_Int(1, 3600), 30)
    idle_timeout: int = _key(_Int(1, 86400), 60)
    max_connections: int = _key(_Int(1, 100_000), 1000)
    max_batch: int = _key(_Int(1, 10_000), 100)
    max_response_bytes: int = _key(_Int(1 << 20, 1 << 30), 64 << 20)


@dataclasses.dataclass(frozen=True)
class Agent:
    state_dir: str = _key(_Path(), "/var/lib/strata")
    # Runtime files: the shared formats mount their file systems under <run_dir>/mnt.
    run_dir: str = _key(_Path(), "/run/strata")
    workers: int = _key(_Int(1, 64), 4)
    # The quick lane's threads per repository: empty qcow2s and reflinks, never behind copies.
    quick_workers: int = _key(_Int(1, 256), 8)
    rpc_threads: int = _key(_Int(1, 256), 16)
    # Chains deeper than this are reported degraded and get an optimize fix.
    max_chain_depth: int = _key(_Int(2, 200), 10)
    # Seconds a data-changing call's options.requestId is remembered (a retry within it is
    # answered from the record): a day by default, up to a year.
    request_ttl: int = _key(_Int(1, 366 * 86400), 86400)
    # Take up at start what was running when the agent stopped or died (a mend otherwise).
    resume_on_start: bool = _key(_Bool(), True)


@dataclasses.dataclass(frozen=True)
class Log:
    level: str = _key(_Choice(LOG_LEVELS), "INFO")
    file: str = _key(_Path(optional=True), "")


def _section(cls: type[T]) -> T:
    return dataclasses.field(default_factory=cls, metadata={"section": cls})


@dataclasses.dataclass(frozen=True)
class Config:
    host: Host = _section(Host)
    rpc: Rpc = _section(Rpc)
    agent: Agent = _section(Agent)
    log: Log = _section(Log)
    # The files that were read, in order, for --show-config; not part of the value.
    sources: tuple[str, ...] = dataclasses.field(default=(), compare=False)


def _sections() -> dict[str, dict[str, _Kind]]:
    """Section name -> key -> kind, from the dataclasses above."""
    table: dict[str, dict[str, _Kind]] = {}
    for section in dataclasses.fields(Config):
        if "section" in section.metadata:
            cls = section.metadata["section"]
            table[section.name] = {f.name: f.metadata["kind"] for f in dataclasses.fields(cls)}
    return table


_SECTIONS = _sections()

# (section, key) -> (parsed value, where it came from); the origin names the file in later errors.
_Values = dict[tuple[str, str], tuple[Any, str]]


def load(path: str | None) -> Config:
    """Read ``path`` and its ``conf.d/*.conf`` drop-ins; ``None`` gives the defaults."""
    if path is None:
        return Config()
    conf_d = os.path.join(os.path.dirname(path), "conf.d")
    files = [path, *sorted(glob.glob(os.path.join(glob.escape(conf_d), "*.conf")))]
    values: _Values = {}
    for name in files:
        _read(name, values)
    return _build(values, tuple(files))


def dev(directory: str) -> Config:
    """Everything under ``directory``: the configuration of ``strata-agent --dev DIR``."""
    base = os.path.abspath(directory)
    origin = f"--dev {directory}"
    texts = {
        ("host", "id"): "1",
        ("rpc", "socket"): os.path.join(base, "agent.sock"),
        ("agent", "state_dir"): os.path.join(base, "state"),
        ("agent", "run_dir"): os.path.join(base, "run"),
        ("log", "file"): "",
    }
    values: _Values = {}
    for (section, key), text in texts.items():
        values[section, key] = (_parse(origin, section, key, text), origin)
    return _build(values, ())


def dump(config: Config) -> str:
    """The effective configuration as INI text, every key with its value."""
    lines = ["# strata-agent effective configuration"]
    if config.sources:
        lines.append("# read from: " + ", ".join(config.sources))
    for section, keys in _SECTIONS.items():
        lines += ["", f"[{section}]"]
        values = getattr(config, section)
        for key, kind in keys.items():
            text = kind.format(getattr(values, key))
            lines.append(f"{key} = {text}" if text else f"{key} =")
    return "\n".join(lines) + "\n"


def _read(path: str, values: _Values) -> None:
    # No interpolation: a "%" in a path is just a "%". One parser per file, so that a duplicate key
    # within a file is an error while a key repeated in a drop-in overrides.
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}", file=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e.reason}", file=path) from None
    except configparser.Error as e:
        raise ConfigError(f"{path}: {_syntax_error(e)}", file=path) from None

    # configparser copies [DEFAULT] into every section, which would hide typos; refuse it.
    if parser.defaults():
        raise ConfigError(f"{path}: unknown section [DEFAULT]", file=path, section="DEFAULT")
    for section in parser.sections():
        if section not in _SECTIONS:
            known = ", ".join(sorted(_SECTIONS))
            raise ConfigError(
                f"{path}: unknown section [{section}]; known sections: {known}",
                file=path,
                section=section,
            )
        for key, text in parser.items(section):
            values[section, key] = (_parse(path, section, key, text), path)


def _parse(origin: str, section: str, key: str, text: str) -> Any:
    keys = _SECTIONS[section]
    if key not in keys:
        known = ", ".join(sorted(keys))
        raise ConfigError(
            f"{origin}: [{section}] {key}: unknown key; known keys: {known}",
            file=origin,
            section=section,
            key=key,
        )
    kind = keys[key]
    try:
        return kind.parse(text)
    except ValueError:
        raise ConfigError(
            f"{origin}: [{section}] {key}: expected {kind.expect}, got {text!r}",
            file=origin,
            section=section,
            key=key,
            value=text,
        ) from None


def _syntax_error(e: configparser.Error) -> str:
    # configparser's own messages span several lines and quote the file again; say it in one.
    if isinstance(e, configparser.MissingSectionHeaderError):
        return f"line {e.lineno}: a key before any [section]: {e.line.strip()!r}"
    if isinstance(e, configparser.ParsingError):
        # configparser stores the line already quoted with repr().
        lineno, line = e.errors[0]
        return f"line {lineno}: not 'key = value' or '[section]': {line}"
    if isinstance(e, configparser.DuplicateOptionError):
        return f"line {e.lineno}: [{e.section}] {e.option}: set twice in this file"
    if isinstance(e, configparser.DuplicateSectionError):
        return f"line {e.lineno}: [{e.section}] appears twice in this file"
    return str(e)


def _build(values: _Values, sources: tuple[str, ...]) -> Config:
    sections: dict[str, Any] = {}
    for section in dataclasses.fields(Config):
        if "section" in section.metadata:
            cls = section.metadata["section"]
            kwargs = {key: value for (s, key), (value, _) in values.items() if s == section.name}
            sections[section.name] = cls(**kwargs)
    config = Config(**sections, sources=sources)
    _check_tcp(config, values)
    return config


def _check_tcp(config: Config, values: _Values) -> None:
    """TCP needs TLS with client certificates, unless plain TCP is asked for on loopback."""
    rpc = config.rpc

    def origin(key: str) -> str:
        return values.get(("rpc", key), (None, "defaults"))[1]

    if rpc.plain_tcp:
        where = origin("plain_tcp")
        if not rpc.tcp_address or not ipaddress.ip_address(rpc.tcp_address).is_loopback:
            raise ConfigError(
                f"{where}: [rpc] plain_tcp: plain TCP is allowed only on a loopback tcp_address "
                f"(127.0.0.1 or ::1), got tcp_address {rpc.tcp_address!r}",
                file=where,
                section="rpc",
                key="plain_tcp",
                value=rpc.tcp_address,
            )
        tls = [key for key in ("tls_cert", "tls_key", "tls_ca") if getattr(rpc, key)]
        if tls:
            # Both set is ambiguous, and silently serving without TLS would be the worse guess.
            raise ConfigError(
                f"{where}: [rpc] plain_tcp: plain TCP contradicts {', '.join(tls)}; "
                "remove one or the other",
                file=where,
                section="rpc",
                key="plain_tcp",
            )
        return
    if rpc.tcp_address:
        missing = [key for key in ("tls_cert", "tls_key", "tls_ca") if not getattr(rpc, key)]
        if missing:
            where = origin("tcp_address")
            raise ConfigError(
                f"{where}: [rpc] tcp_address: TCP requires TLS with client certificates; "
                f"set {', '.join(missing)} (or plain_tcp = true on a loopback address)",
                file=where,
                section="rpc",
                key="tcp_address",
                value=rpc.tcp_address,
            )
