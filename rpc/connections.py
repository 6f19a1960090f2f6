"""One client connection: its TLS handshake, a deadline for each phase, and how many may be open.

Given an ``ssl_context``, pywsgi wraps each accepted socket in the stdlib's SSLSocket, whose
handshake and reads block the whole process (the agent does not monkey-patch): one TCP
connection that sent nothing froze every call, the Unix socket's too. Here the handshake runs on
a gevent SSLSocket in the connection's own greenlet, and every phase has a deadline ([rpc] keys,
seconds):

- ``handshake_timeout``: from accept until the TLS handshake is done;
- ``header_timeout``: the request line and headers, from the end of the handshake for a
  connection's first request, from the first byte for later ones;
- ``body_timeout``: the whole body once the headers are in, and the whole answer's sending;
- ``idle_timeout``: a keep-alive connection waiting for its next request.

Deadlines, not per-read timeouts: a client sending one byte a second never trips a read timeout.
Each listener holds at most ``max_connections``; past it a connection gets HTTP 503 with a
JSON-RPC error body (after the handshake on TLS, or the client could not read it) while at most
``REFUSING`` such refusals are under way, and is closed at once beyond that.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.pywsgi
import gevent.ssl

from agent import config as agent_config
from rpc import dispatch, encoding

log = logging.getLogger(__name__)

# Refusals in progress per listener: each holds a descriptor for its handshake and its answer.
REFUSING = 64
# How long a refused client gets to read its 503 and close before we close under it.
LINGER = 2.0
# At most one log line per this many seconds about refused connections (a flood would fill the
# log otherwise); the line counts the refusals since the last one.
REFUSAL_LOG_INTERVAL = 10.0
ENVIRON_KEY = "strata.connection"


class Cut(BaseException):
    """A deadline passed. A BaseException, so that pywsgi's ``except Exception`` around request
    parsing lets it through to the handler that set the deadline."""

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(f"{phase} took longer than {seconds:g} s")
        self.phase = phase
        self.seconds = seconds


class TooLarge(Exception):
    pass


class _Deadline:
    """A deadline that may end in another method than the one that set it (the header phase
    starts before pywsgi reads the request line and ends when it has parsed the headers)."""

    def __init__(self, phase: str, seconds: float) -> None:
        self.cut = Cut(phase, seconds)
        self._timer = gevent.Timeout(seconds, self.cut)
        self._timer.start()

    def cancel(self) -> None:
        self._timer.close()


@contextlib.contextmanager
def deadline(phase: str, seconds: float) -> Iterator[Cut]:
    d = _Deadline(phase, seconds)
    try:
        yield d.cut
    finally:
        d.cancel()


def tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """A server context whose sockets are gevent's: their handshake and reads wait on the hub
    instead of blocking it. (gevent.ssl.create_default_context returns the stdlib's class.)"""
    ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    result: ssl.SSLContext = ctx
    return result


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The request body, read within body_timeout; TooLarge past ``limit`` bytes (the rest is
    read and dropped, within the same deadline, so the client gets its answer instead of a
    reset connection); Cut when the deadline passes (nothing more is read from the client)."""
    handler: Handler = environ[ENVIRON_KEY]
    stream = environ["wsgi.input"]
    try:
        length = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        length = -1
    try:
        with deadline("body", handler.server.cfg.body_timeout):
            body = b"" if length > limit else stream.read(limit + 1)
            if length > limit or len(body) > limit:
                while stream.read(1 << 16):
                    pass
                raise TooLarge()
            return bytes(body)
    except Cut as e:
        handler.server.cut(handler.peer, e)
        handler.read_no_more()
        raise


class _QuietLog:
    """pywsgi's access log goes to our logger at debug level, in our key=value style."""

    def write(self, line: str) -> None:
        log.debug("event=http %s", line.strip())


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "unix"


def _busy_response(max_connections: int) -> bytes:
    body = encoding.encode(dispatch.error_body(
        dispatch.SERVER_BUSY,
        f"Server busy: {max_connections} connections are open on this listener "
        "([rpc] max_connections); retry later",
    ))
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n")
    return head.encode() + body


class Server(gevent.pywsgi.WSGIServer):  # type: ignore[misc]
    """A pywsgi server whose connections are counted, handshaken in their own greenlet and held
    to deadlines."""

    def __init__(self, listener: Any, application: Any, cfg: agent_config.Rpc,
                 tls: ssl.SSLContext | None, name: str) -> None:
        super().__init__(listener, application, log=_QuietLog(), error_log=_QuietLog(),
                         handler_class=Handler)
        self.cfg = cfg
        self.name = name
        self._tls = tls
        self.open = 0
        self._refusing = 0
        self._refused = 0
        self._refusals_logged_at = -REFUSAL_LOG_INTERVAL
        self._busy = _busy_response(cfg.max_connections)

    def handle(self, sock: Any, address: Any) -> None:
        # Runs in the connection's own greenlet (pywsgi spawns one per accepted socket).
        peer = _peer(address)
        if self.open >= self.cfg.max_connections:
            self._refuse(sock, peer)
            return
        self.open += 1
        try:
            conn = sock if self._tls is None else self._handshake(sock, peer)
            if conn is None:
                return
            try:
                super().handle(conn, address)
            finally:
                if conn is not sock:
                    conn.close()
        finally:
            self.open -= 1

    def _handshake(self, sock: Any, peer: str) -> Any:
        assert self._tls is not None
        conn = None
        try:
            with deadline("handshake", self.cfg.handshake_timeout):
                conn = self._tls.wrap_socket(sock, server_side=True,
                                             do_handshake_on_connect=False)
                conn.do_handshake()
            return conn
        except Cut as e:
            self.cut(peer, e)
        except OSError as e:  # ssl.SSLError is one: no client certificate, not TLS, ...
            log.info("event=tls_refused listener=%s peer=%s error=%r", self.name, peer, str(e))
        if conn is not None:
            conn.close()
        return None

    def _refuse(self, sock: Any, peer: str) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refusals_logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning("event=connections_refused listener=%s peer=%s open=%d "
                        "max_connections=%d refused=%d", self.name, peer, self.open,
                        self.cfg.max_connections, self._refused)
            self._refusals_logged_at = now
            self._refused = 0
        if self._refusing >= REFUSING:
            return  # pywsgi closes the socket when this returns
        self._refusing += 1
        conn = sock
        try:
            if self._tls is not None:
                conn = self._handshake(sock, peer)
                if conn is None:
                    return
            with deadline("refusal", LINGER):
                conn.sendall(self._busy)
                # Wait for the client to close after reading the answer: closing first with its
                # request unread would reset the connection, and the answer with it.
                while conn.recv(1 << 16):
                    pass
        except (Cut, OSError):
            pass
        finally:
            self._refusing -= 1
            if conn is not sock and conn is not None:
                conn.close()

    def cut(self, peer: str, e: Cut) -> None:
        log.info("event=connection_cut listener=%s peer=%s phase=%s timeout=%g",
                 self.name, peer, e.phase, e.seconds)


class Handler(gevent.pywsgi.WSGIHandler):  # type: ignore[misc]
    server: Server

    def __init__(self, sock: Any, address: Any, server: Server) -> None:
        super().__init__(sock, address, server)
        self.peer = _peer(address)
        self._answered = False
        self._header_deadline: _Deadline | None = None

    def handle_one_request(self) -> Any:
        cfg = self.server.cfg
        if self.rfile.closed:
            return None
        if self._answered:
            try:
                with deadline("idle", cfg.idle_timeout):
                    if not self.rfile.peek(1):
                        return None  # the client closed
            except Cut:
                log.debug("event=idle_closed listener=%s peer=%s timeout=%d",
                          self.server.name, self.peer, cfg.idle_timeout)
                return None
            except OSError:
                return None
        # For a first request this also bounds the wait for its first byte.
        self._header_deadline = _Deadline("header", cfg.header_timeout)
        try:
            result = super().handle_one_request()
        except Cut as e:
            if e is not self._header_deadline.cut:
                raise
            self.server.cut(self.peer, e)
            return None
        finally:
            self._header_deadline.cancel()
        self._answered = True
        return result

    def read_request(self, raw_requestline: str) -> Any:
        try:
            return super().read_request(raw_requestline)
        finally:
            # The headers are in: the body and the call have their own bounds.
            if self._header_deadline is not None:
                self._header_deadline.cancel()

    def get_environ(self) -> Any:
        environ = super().get_environ()
        environ[ENVIRON_KEY] = self
        return environ

    def process_result(self) -> None:
        # Sending the answer: a client that does not take it is cut like a slow sender.
        try:
            with deadline("send", self.server.cfg.body_timeout) as cut:
                super().process_result()
        except Cut as e:
            if e is not cut:
                raise
            self.server.cut(self.peer, e)
            self.read_no_more()

    def read_no_more(self) -> None:
        """Close after this request without reading the rest of its body: pywsgi would
        otherwise drain it, unbounded, before reading the next request."""
        self.wsgi_input = gevent.pywsgi.Input(self.rfile, 0)
        self.close_connection = True
