"""The one adapter around jsonrpcserver, and the one place exceptions become wire errors.

We parse the body and split batches ourselves, because jsonrpcserver answers some batches
against the JSON-RPC 2.0 spec (``[]``, ``[1,2,3]``) and puts exception text into ``-32603``.
jsonrpcserver then validates each request object and calls our method wrappers, which bind the
params against the API document and run the call on a real thread of the gevent thread pool,
so the hub keeps serving while a call fsyncs or waits on qemu-img (a bounded metadata read the
agent declares safe, getImageStatus, runs on the hub itself: see Api.runs_inline).

Whatever a client sends, the answer is strict JSON: request objects are checked here (a method
that is not a string, an id JSON cannot carry), strings in params must be text (no NUL, no lone
surrogate), and encoding refuses NaN and lone surrogates. Batches are bounded in count and their
answers in bytes; a large answer is encoded on a thread, in pieces (rpc/encoding.py).
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import gevent
import jsonrpcserver
from jsonrpcserver import dispatcher as jrs_dispatcher
from jsonrpcserver import response as jrs_response
from jsonrpcserver import sentinels as jrs_sentinels

from agent import api as agent_api
from agent import errors, logctx
from rpc import apidoc, encoding

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603
# Server errors of the transport, in the range JSON-RPC 2.0 leaves to implementations.
SERVER_BUSY = -32000
RESPONSE_TOO_LARGE = -32001
# A batch of calls that run on the hub (getImageStatus, rpc.discover) lets other clients in at
# least this often, in seconds.
BATCH_SLICE = 0.002

# submit(method, fn, **kwargs) runs fn(**kwargs) on a real thread (which one the method and
# its params decide: the repository's, or the host's) and returns its result.
Submit = Callable[..., Any]

_request_ids = itertools.count(1)


def error_body(code: int, message: str, req_id: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": req_id}


def _error(code: int, message: str, req_id: Any = None) -> bytes:
    return encoding.encode(error_body(code, message, req_id))


class Dispatcher:
    def __init__(self, api: agent_api.Api, submit: Submit, max_batch: int = 100,
                 max_response_bytes: int = 64 << 20) -> None:
        self._api = api
        self._submit = submit
        self._max_batch = max_batch
        self._max_response = max_response_bytes
        self._methods: dict[str, Callable[..., Any]] = {
            name: self._wrap(method) for name, method in apidoc.methods().items()
        }
        self._methods["rpc.discover"] = lambda: jsonrpcserver.Success(apidoc.document())

    def handle(self, body: bytes) -> list[bytes] | None:
        """Answer one HTTP body, in chunks to send one after the other; None when there is
        nothing to send (notifications only)."""
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return [_error(PARSE_ERROR, f"Parse error: {e}")]
        except RecursionError:
            return [_error(PARSE_ERROR, "Parse error: nested too deeply")]
        if isinstance(request, list):
            if not request:
                return [_error(INVALID_REQUEST, "Invalid Request: empty batch")]
            if len(request) > self._max_batch:
                return [_error(
                    INVALID_REQUEST,
                    f"Invalid Request: a batch of {len(request)} requests; at most "
                    f"{self._max_batch} are allowed ([rpc] max_batch)",
                )]
            return self._batch(request)
        answer = self._one(request)
        if answer is None:
            return None
        return self._encode_answer(answer, self._max_response)[0]

    def _batch(self, requests: list[Any]) -> list[bytes] | None:
        """The batch's answers, within max_response_bytes: the call whose answer does not fit
        gets an error instead (it was carried out), and the calls after it are not carried out
        (each with an id gets an error saying so), so that no answer is built past the limit."""
        out = encoding.Chunks()
        room = self._max_response - 2  # the brackets
        full = False
        slice_start = time.monotonic()
        for request in requests:
            if time.monotonic() - slice_start > BATCH_SLICE:
                _let_others_in()
                slice_start = time.monotonic()
            if full:
                answer = self._not_carried_out(request)
                if answer is not None:
                    # Short errors, at most max_batch of them: they may go past the limit.
                    out.add(b"," if out.size else b"[", encoding.encode(answer))
                continue
            answer = self._one(request)
            if answer is None:
                continue
            chunks, fits = self._encode_answer(answer, room - 1, batch=True)
            full = not fits
            out.add(b"," if out.size else b"[", *chunks)
            room -= 1 + sum(len(c) for c in chunks)
        if not out.size:
            return None
        out.add(b"]")
        return out.done()

    def _not_carried_out(self, request: Any) -> dict[str, Any] | None:
        try:
            _validate_request(request)
        except ValueError:
            return self._one(request)  # refused as invalid, which runs nothing
        if "id" not in request:
            return None  # a notification: nothing to answer, and it is not carried out either
        return error_body(
            RESPONSE_TOO_LARGE,
            f"Response too large: the batch's answers reached the {self._max_response} bytes "
            "they may take ([rpc] max_response_bytes) before this call, which was not carried "
            "out",
            request["id"],
        )

    def _encode_answer(self, answer: dict[str, Any], room: int,
                       batch: bool = False) -> tuple[list[bytes], bool]:
        """The answer encoded, in chunks, and whether it fit in ``room`` bytes (if not: an
        error in its place, saying the call was carried out)."""
        try:
            # Errors are short; results are measured (a walk of a status costs ~3 us).
            if "error" in answer or encoding.small(answer):
                chunks: list[bytes] | None = [encoding.encode(answer)]
            else:
                # The C encoder holds the GIL for its whole run, so a thread alone would not
                # keep the hub serving: the pieces let it switch (see encoding.in_pieces).
                # (On the host pool: encoding is about no repository.)
                chunks = self._submit("", encoding.in_pieces, obj=answer, limit=room)
        except (ValueError, TypeError):  # NaN or a lone surrogate in a result: never bad JSON
            log.exception("event=unencodable_answer id=%s", _loggable(answer.get("id")))
            return [_error(INTERNAL_ERROR, "Internal error; the agent's log has the details",
                           answer.get("id"))], True
        if chunks is not None and sum(len(c) for c in chunks) <= room:
            return chunks, True
        log.info("event=response_too_large id=%s room=%d max_response_bytes=%d",
                 _loggable(answer.get("id")), room, self._max_response)
        where = (f"the {room} bytes left of the {self._max_response} bytes a batch's answers"
                 if batch else f"the {self._max_response} bytes an answer")
        return [_error(
            RESPONSE_TOO_LARGE,
            f"Response too large: the answer to this call does not fit in {where} may take "
            "([rpc] max_response_bytes); the call was carried out",
            answer.get("id"),
        )], False

    def _one(self, request: Any) -> dict[str, Any] | None:
        try:
            _validate_request(request)
        except ValueError as e:
            # The id of an invalid request is not trusted, not even echoed (JSON-RPC 2.0: null).
            log.info("event=call method=%s id=None ms=0.0 error=%d why=%r",
                     _loggable(request.get("method") if isinstance(request, dict) else None),
                     INVALID_REQUEST, str(e))
            return error_body(INVALID_REQUEST, f"Invalid Request: {e}")
        rid = next(_request_ids)
        token = logctx.request_id.set(str(rid))
        started = time.monotonic()
        try:
            # The request is parsed and checked; jsonrpcserver's "deserializer" just hands it
            # over.
            response: Any = jrs_dispatcher.dispatch_to_response_pure(
                deserializer=lambda _text: request,
                validator=lambda r: r,
                post_process=lambda r: r,
                context=jrs_sentinels.NOCONTEXT,
                methods=self._methods,
                request="",
            )
            answer: Any = (None if response is None
                           else jrs_response.to_serializable_one(response))
        except Exception:
            # Never lose the other answers of a batch to one request's surprise.
            log.exception("event=internal_error method=%s", _loggable(request.get("method")))
            answer = error_body(INTERNAL_ERROR, "Internal error; the agent's log has the details",
                                request.get("id"))
        error = (answer or {}).get("error", {}).get("code")
        method = request["method"]
        name = method if method in self._methods else _loggable(method)
        # Every call that changes something, and every error, is logged at INFO; reads (a
        # cluster manager polls getImageStatus many times a second) only at DEBUG.
        level = logging.DEBUG if method in READS and error is None else logging.INFO
        log.log(
            level,
            "event=call method=%s id=%s ms=%.1f error=%s",
            name,
            _loggable(request.get("id")),
            (time.monotonic() - started) * 1000,
            error,
        )
        logctx.request_id.reset(token)
        return answer if isinstance(answer, dict) else None

    def _wrap(self, method: apidoc.Method) -> Callable[..., Any]:
        target = getattr(self._api, method.name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = method.bind(list(args), kwargs)
                _check_text(bound)
            except apidoc.ParamError as e:
                # The message itself names the parameter: clients show message, not data.
                return jsonrpcserver.Error(apidoc.INVALID_PARAMS, f"Invalid params: {e}")
            try:
                if self._api.runs_inline(method.name, bound):
                    result = target(**bound)
                else:
                    result = self._submit(method.name,
                                          logctx.bound(logctx.request_id.get(), target),
                                          **bound)
            except errors.InvalidArgument as e:
                # A value the schema admits but the call cannot use names its parameter: to a
                # client that is invalid params, like any schema failure.
                return jsonrpcserver.Error(apidoc.INVALID_PARAMS, f"Invalid params: {e.message}",
                                           {"name": e.name, **e.data})
            except errors.Error as e:
                data = {"name": e.name, **e.data}
                return jsonrpcserver.Error(e.code, e.message, data)
            except Exception:
                log.exception("event=internal_error method=%s", method.name)
                return jsonrpcserver.Error(
                    INTERNAL_ERROR, "Internal error; the agent's log has the details"
                )
            return jsonrpcserver.Success(result)

        # jsonrpcserver checks every call's arguments against inspect.signature(call), which
        # would parse this closure anew each time; bind() above does the real checking.
        call.__signature__ = ANY_ARGS  # type: ignore[attr-defined]
        return call


ANY_ARGS = inspect.Signature([
    inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
    inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
])
READS = frozenset({
    "getImageStatus", "getImageInfo", "listImages", "listStorageRepositories",
    "getStorageRepositoryInfo", "getHostInfo", "checkStorageRepository", "rpc.discover",
    "waitForOperations",
})
_MEMBERS = frozenset({"jsonrpc", "method", "params", "id"})


def _validate_request(request: Any) -> None:
    """The JSON-RPC 2.0 request object, checked by hand (jsonrpcserver's default runs a
    jsonschema validation per call, which cost a fifth of the hub's time per getImageStatus);
    ValueError says what is wrong."""
    if not isinstance(request, dict):
        raise ValueError("not an object")
    if request.get("jsonrpc") != "2.0":
        raise ValueError('"jsonrpc" must be "2.0"')
    method = request.get("method")
    if not isinstance(method, str):
        raise ValueError('"method" must be a string')
    if _bad_text(method):
        raise ValueError(f'"method" {_bad_text(method)}')
    if not isinstance(request.get("params", []), list | dict):
        raise ValueError('"params" must be an array or an object')
    rid = request.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int | float | None):
        raise ValueError('"id" must be a string, a number or null')
    # NaN, Infinity and numbers too large for a double (1e400 parses as inf): no JSON can
    # carry them back.
    if isinstance(rid, float) and not math.isfinite(rid):
        raise ValueError('"id" must be a finite number')
    if isinstance(rid, str) and _bad_text(rid):
        raise ValueError(f'"id" {_bad_text(rid)}')
    if not request.keys() <= _MEMBERS:
        extra = sorted(repr(k)[:40] for k in request.keys() - _MEMBERS)
        raise ValueError(f"unknown member {', '.join(extra)}")


def _bad_text(s: str) -> str:
    """Why ``s`` is not text a client can send back and forth, or ''."""
    if "\0" in s:
        return "contains a NUL byte"
    if not s.isascii():
        try:
            s.encode()
        except UnicodeEncodeError:
            return "contains a lone surrogate (not UTF-8 text)"
    return ""


def _check_text(bound: dict[str, Any]) -> None:
    """Every string in the params is text and every number finite, or ParamError naming the
    parameter (a NUL cuts a path or a C string short; a lone surrogate cannot be written as
    UTF-8; NaN is not JSON)."""
    for name, value in bound.items():
        stack: list[tuple[Any, str]] = [(value, "")]
        while stack:
            item, where = stack.pop()
            why = ""
            if isinstance(item, str):
                why = _bad_text(item)
            elif isinstance(item, float) and not math.isfinite(item):
                why = "is not a finite number"
            elif isinstance(item, dict):
                for key, child in item.items():
                    if isinstance(key, str) and _bad_text(key):
                        raise apidoc.ParamError(
                            f"invalid parameter {name!r}{where}: a key {_bad_text(key)}")
                    stack.append((child, f"{where}[{key!r}]"))
            elif isinstance(item, list):
                stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
            if why:
                raise apidoc.ParamError(f"invalid parameter {name!r}{where}: {why}")


def _loggable(value: Any) -> str:
    """A client's value in a log line: known method names as they are, anything else quoted
    and cut short (no newline or NUL reaches the log, and no megabyte either)."""
    if isinstance(value, str) and value.isidentifier() and len(value) <= 64:
        return value
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _let_others_in() -> None:
    """Yield to the hub until it has polled for I/O and run due timers. Not gevent.sleep(0):
    that only queues a callback, and the hub checks for I/O only every 50 callbacks, so a
    batch yielding every 2 ms held everyone else off for 100 ms at a time (measured)."""
    hub = gevent.get_hub()
    with hub.loop.timer(0) as timer:
        hub.wait(timer)
