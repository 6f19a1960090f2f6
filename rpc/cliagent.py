"""Talking to the agent from ``strata-client``: where it is (a Unix socket, or TCP with optional
TLS) and calls by name, with every transport failure turned into ``clierrors.Unreachable``, or
into ``NoAnswer`` once the call may have reached the agent.
"""

from __future__ import annotations

import dataclasses
import http.client
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from rpc import clierrors, clihelp, transport

# The connection broke after the request went out: the agent may have received it.
_DROPPED = (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionResetError,
            BrokenPipeError)


class NoAnswer(Exception):
    """The call was sent but no answer came (a timeout, a dropped connection): the agent may
    have carried it out, or may still be carrying it out. Exit 5."""


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
        raise clierrors.UsageError(f"bad address {text!r}: expected HOST:PORT")
    return host, int(port)


def tls_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    if not (cert or key or ca):
        return None
    if key and not cert:
        raise clierrors.UsageError("--key needs --cert")
    try:
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
    except OSError as e:  # ssl.SSLError is an OSError
        raise clierrors.UsageError(f"cannot load the TLS files: {e.strerror or e}") from None
    return ctx


class Agent:
    """One agent: calls by name, with every transport failure turned into ``Unreachable``."""

    def __init__(self, where: Endpoint, timeout: float) -> None:
        self.where = where
        self.timeout = timeout
        self._client = transport.Client(
            socket_path=where.socket, address=where.address, tls=where.tls, timeout=timeout
        )

    def call(self, method: str, params: Mapping[str, Any]) -> Any:
        return self._guarded(lambda: self._client.call(method, **params))

    def call_batch(self, calls: list[tuple[str, Mapping[str, Any]]]) -> list[Any]:
        """One JSON-RPC batch: each call's result or its ``transport.RemoteError``."""
        return self._guarded(lambda: self._client.call_batch(calls))  # type: ignore[no-any-return]

    def _guarded(self, send: Callable[[], Any]) -> Any:
        try:
            return send()
        except transport.RemoteError:
            raise
        except TimeoutError:
            raise NoAnswer(
                f"no answer from the agent at {self.where.describe()} within "
                f"{self.timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            # transport retries once on a fresh connection after a drop: the first try (the
            # exception's context) may have reached the agent even if the second was refused.
            if isinstance(e, _DROPPED) or isinstance(e.__context__, _DROPPED):
                raise NoAnswer(
                    f"the agent at {self.where.describe()} closed the connection before "
                    "answering"
                ) from None
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise clierrors.Unreachable(
                f"cannot reach the agent at {self.where.describe()}: {reason}"
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise clierrors.Unreachable(
                f"the agent at {self.where.describe()} did not answer JSON-RPC: {e!r}"
            ) from None

    def document(self) -> clihelp.Doc:
        """The live API document; the packaged one when this agent has no rpc.discover."""
        try:
            doc = self.call(clihelp.DISCOVER, {})
        except transport.RemoteError:
            return clihelp.packaged_document()
        if not isinstance(doc, dict):
            raise clierrors.Unreachable(
                f"the agent at {self.where.describe()} sent no API document"
            )
        return doc

    def close(self) -> None:
        self._client.close()


def help_document(agent: Agent) -> clihelp.Doc:
    """The live document, else the packaged one: help works offline."""
    try:
        return agent.document()
    except clierrors.Unreachable:
        return clihelp.packaged_document()
