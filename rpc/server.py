"""JSON-RPC 2.0 over HTTP (``POST /jsonrpc``) on gevent's pywsgi, without monkey-patching.

Listeners are gevent sockets (a stdlib socket would block the hub): always the Unix socket
(mode 0660), and TCP when configured, with TLS and client-certificate verification unless plain
TCP on loopback was asked for explicitly. TCP_NODELAY is set because pywsgi sends headers and body
separately and Nagle plus delayed ACK would add ~40 ms to every keep-alive call. What one client may
hold (handshake, deadlines, open connections) is rpc/connections.py's business.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket as stdsocket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import gevent.socket
import gevent.threadpool

from agent import api as agent_api
from agent import config as agent_config
from agent import errors, fileio
from rpc import connections, dispatch, encoding, executors

log = logging.getLogger(__name__)

PATH = "/jsonrpc"
StartResponse = Callable[..., Any]


class Server:
    def __init__(self, cfg: agent_config.Config, api: agent_api.Api) -> None:
        self._cfg = cfg
        self._api = api
        # The host pool: host calls (getHostInfo, listStorageRepositories, a forced
        # disconnect, formatting). Calls about a repository run on its own executor.
        self.pool = gevent.threadpool.ThreadPool(cfg.agent.rpc_threads)
        self._executors: dict[str, executors.Executor] = {}
        self.dispatcher = dispatch.Dispatcher(
            api, self._run_in_thread, max_batch=cfg.rpc.max_batch,
            max_response_bytes=cfg.rpc.max_response_bytes,
        )
        self._servers: list[connections.Server] = []

    # -- where a call runs -------------------------------------------------------------------

    def _run_in_thread(self, method: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        repos = self._api.repositories_of(method, kwargs)
        # A repoId nobody connected gets its error at once on the host pool; only a connect
        # may need threads of its own for a repository not connected yet (it may hang).
        if not repos or (self._api.host.get(repos[0]) is None
                         and method != "connectStorageRepository"):
            return self._run_on_host_pool(fn, **kwargs)
        for r in repos[1:]:
            other = self._executors.get(r)
            if other is not None and other.saturated():  # copyImage's source: its reads
                raise other.unavailable(method, f"all its {other.threads} threads are stuck; "
                                        "the call was not started, nothing was done")
        ex = self._executor(repos[0])
        try:
            value = ex.run(method, fn, kwargs)
        except errors.RepositoryUnavailable as e:
            self._api.note_failure(self._api.name_failure(e, ex.repo_id), e.message)
            raise
        except OSError as e:
            # One the agent did not map where it surfaced: still about this repository.
            err = fileio.unavailable(e.filename if isinstance(e.filename, str) else
                                     f"repository {ex.repo_id!r}", e)
            if err is None:
                raise
            self._api.note_failure(self._api.name_failure(err, ex.repo_id), err.message)
            raise err from e
        finally:
            if ex.owner is None and ex.idle():
                self._drop(ex)
        if not ex.stuck():
            self._api.note_failure(ex.repo_id, None)
        return value

    def _executor(self, repo_id: str) -> executors.Executor:
        """The repository's executor; a new one for a new connection under the same repoId
        (the old one's threads end as their calls do)."""
        owner = self._api.host.get(repo_id)
        ex = self._executors.get(repo_id)
        if ex is None or ex.owner is not owner:
            if ex is not None:
                ex.retire()
            rpc = self._cfg.rpc
            ex = self._executors[repo_id] = executors.Executor(
                repo_id, rpc.repository_threads, float(rpc.repository_call_timeout), owner)
        return ex

    def _drop(self, ex: executors.Executor) -> None:
        if self._executors.get(ex.repo_id) is ex:
            del self._executors[ex.repo_id]
            ex.retire()

    def _run_on_host_pool(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        # The outcome travels back as a value: gevent re-raising some exceptions across the
        # thread boundary can fail (a RecursionError's traceback), leaving the call hanging.
        def guarded() -> tuple[bool, Any]:
            try:
                return True, fn(**kwargs)
            except BaseException as e:
                return False, e

        ok, value = self.pool.spawn(guarded).get()
        if not ok:
            raise value
        return value

    # -- WSGI --------------------------------------------------------------------------------

    def app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return _plain(start_response, "404 Not Found", f"use POST {PATH}\n")
        if environ.get("REQUEST_METHOD") != "POST":
            return _plain(start_response, "405 Method Not Allowed", f"use POST {PATH}\n",
                          [("Allow", "POST")])
        limit = self._cfg.rpc.max_request_bytes
        try:
            body = connections.read_body(environ, limit)
        except connections.TooLarge:
            return _refuse(start_response, "413 Request Entity Too Large",
                           f"Invalid Request: body larger than {limit} bytes")
        except connections.Cut as e:
            return _refuse(start_response, "408 Request Timeout",
                           f"Invalid Request: the body did not arrive within {e.seconds:g} s")
        answer = self.dispatcher.handle(body)
        if answer is None:
            start_response("204 No Content", [])
            return [b""]
        start_response(
            "200 OK",
            [("Content-Type", "application/json"),
             ("Content-Length", str(sum(len(chunk) for chunk in answer)))],
        )
        return answer

    # -- listeners ---------------------------------------------------------------------------

    def start(self) -> None:
        rpc = self._cfg.rpc
        self._servers.append(self._serve(_unix_listener(rpc.socket), "unix"))
        log.info("event=listening socket=%s", rpc.socket)
        if rpc.tcp_address:
            listener = _tcp_listener(rpc.tcp_address, rpc.tcp_port)
            ctx = (None if rpc.plain_tcp
                   else connections.tls_context(rpc.tls_cert, rpc.tls_key, rpc.tls_ca))
            self._servers.append(self._serve(listener, "tcp", ctx))
            log.info("event=listening tcp=%s:%d tls=%s", rpc.tcp_address,
                     listener.getsockname()[1], ctx is not None)
        _raise_nofile(len(self._servers) * (rpc.max_connections + connections.REFUSING))

    def tcp_port(self) -> int | None:
        for s in self._servers[1:]:
            port: int = s.socket.getsockname()[1]
            return port
        return None

    def _serve(self, listener: Any, name: str,
               ctx: ssl.SSLContext | None = None) -> connections.Server:
        server = connections.Server(listener, self.app, self._cfg.rpc, ctx, name)
        server.start()
        return server

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting and let calls in flight (and their metadata writes) finish."""
        for s in self._servers:
            s.close()
        for s in self._servers:
            s.stop(timeout=timeout)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._cfg.rpc.socket)
        for ex in self._executors.values():
            ex.retire()
        self.pool.kill()


def _refuse(start_response: StartResponse, status: str, message: str) -> Iterable[bytes]:
    """An HTTP error with a JSON-RPC error body, closing the connection (what is left of the
    request was not read)."""
    body = encoding.encode(dispatch.error_body(dispatch.INVALID_REQUEST, message))
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))), ("Connection", "close")])
    return [body]


# Descriptors the agent needs besides its connections: repositories' locks and journals, log
# file, qemu-img pipes, udev.
OWN_FILES = 1024


def _raise_nofile(connections_max: int) -> None:
    """Make room for every connection the caps allow: raise the soft RLIMIT_NOFILE toward the
    hard one (systemd's default soft limit is 1024), and say so when even that is too low."""
    need = connections_max + OWN_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning("event=nofile_low limit=%d need=%d hint=%s", soft, need,
                    "raise LimitNOFILE= or lower [rpc] max_connections")


def _plain(start_response: StartResponse, status: str, text: str,
           extra: list[tuple[str, str]] | None = None) -> Iterable[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
                   + (extra or []))
    return [body]


def _unix_listener(path: str) -> Any:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        if isinstance(e, ConnectionRefusedError):
            os.unlink(path)  # a socket file left by a dead agent
    else:
        raise OSError(f"{path}: another agent is listening there")
    finally:
        probe.close()
    sock = gevent.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    # Bind with a umask so the socket is never, even briefly, more open than 0660.
    old = os.umask(0o117)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


def _tcp_listener(address: str, port: int) -> Any:
    family = stdsocket.AF_INET6 if ":" in address else stdsocket.AF_INET
    sock = gevent.socket.socket(family, stdsocket.SOCK_STREAM)
    sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
    # Accepted sockets inherit TCP_NODELAY from the listener on Linux.
    sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
    sock.bind((address, port))
    sock.listen(128)
    return sock
