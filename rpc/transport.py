"""Client side of the wire: JSON-RPC 2.0 over HTTP on the agent's Unix socket or on TLS TCP."""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

PATH = "/jsonrpc"


def wait_for_socket(path: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Wait until something accepts connections on a Unix socket (an agent starting up);
    False when ``alive`` says it died first, or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return True
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    return False


class RemoteError(Exception):
    """The agent answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data

    @property
    def name(self) -> str:
        if isinstance(self.data, dict):
            return str(self.data.get("name", ""))
        return ""


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Client:
    """A keep-alive JSON-RPC client; one per thread."""

    def __init__(
        self,
        socket_path: str | None = None,
        address: tuple[str, int] | None = None,
        tls: ssl.SSLContext | None = None,
        timeout: float = 60.0,
    ) -> None:
        if address is not None:
            if tls is not None:
                self._conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    address[0], address[1], timeout=timeout, context=tls
                )
            else:
                self._conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
        elif socket_path is not None:
            self._conn = UnixHTTPConnection(socket_path, timeout)
        else:
            raise ValueError("a socket path or an address is needed")
        self._ids = itertools.count(1)

    def post(self, body: bytes) -> tuple[int, bytes]:
        """Send a raw body; return the HTTP status and raw response body."""
        try:
            self._conn.request("POST", PATH, body, {"Content-Type": "application/json"})
            resp = self._conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # The agent closed an idle keep-alive connection ([rpc] idle_timeout; over TLS the
            # close is a TLS alert or EOF): one retry on a fresh one.
            self._conn.close()
            self._conn.request("POST", PATH, body, {"Content-Type": "application/json"})
            resp = self._conn.getresponse()
        data = resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self._conn.close()
        return resp.status, data

    def call(self, method: str, *args: Any, **params: Any) -> Any:
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": next(self._ids)}
        if args and params:
            raise ValueError("params by position or by name, not both")
        if args:
            request["params"] = list(args)
        elif params:
            request["params"] = params
        status, data = self.post(json.dumps(request).encode())
        answer = json.loads(data)
        if "error" in answer:
            e = answer["error"]
            raise RemoteError(e["code"], e["message"], e.get("data"))
        return answer["result"]

    def call_batch(self, calls: list[tuple[str, Mapping[str, Any]]]) -> list[Any]:
        """Several calls by name in one JSON-RPC batch (one round trip; the agent runs them
        one after the other): each one's result, or the RemoteError it got, in order. A batch
        the agent refuses as a whole (too many calls) raises that RemoteError: none ran."""
        first = next(self._ids)
        ids = [first + i for i in range(len(calls))]
        self._ids = itertools.count(first + len(calls))
        body = [{"jsonrpc": "2.0", "method": m, "params": dict(p), "id": i}
                for i, (m, p) in zip(ids, calls, strict=True)]
        _, data = self.post(json.dumps(body).encode())
        answer = json.loads(data)
        if isinstance(answer, dict):
            e = answer["error"]
            raise RemoteError(e["code"], e["message"], e.get("data"))
        by_id = {a.get("id"): a for a in answer if isinstance(a, dict)}
        out: list[Any] = []
        for i in ids:
            a = by_id.get(i)
            if a is None:
                out.append(RemoteError(-32603, "the batch's answer has none for this call"))
            elif "error" in a:
                e = a["error"]
                out.append(RemoteError(e["code"], e["message"], e.get("data")))
            else:
                out.append(a["result"])
        return out

    def close(self) -> None:
        self._conn.close()


def call_once(socket_path: str, method: str, *args: Any, **params: Any) -> Any:
    """One call on a connection of its own, closed after it (a test or a script asking an
    agent one thing)."""
    c = Client(socket_path=socket_path)
    try:
        return c.call(method, *args, **params)
    finally:
        c.close()
