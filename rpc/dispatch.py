"""The one adapter around jsonrpcserver, and the one place exceptions become wire errors.

We parse the body and split batches ourselves, because jsonrpcserver answers some batches
against the JSON-RPC 2.0 spec (``[]``, ``[1,2,3]``) and puts exception text into ``-32603``.
jsonrpcserver then validates each request object and calls our method wrappers, which bind the
params against the API document and run the call on a real thread of the gevent thread pool,
so the hub keeps serving while a call fsyncs or waits on qemu-img (a bounded metadata read the
agent declares safe, getImageStatus, runs on the hub itself: see Api.runs_inline).
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import jsonrpcserver
from jsonrpcserver import dispatcher as jrs_dispatcher
from jsonrpcserver import response as jrs_response
from jsonrpcserver import sentinels as jrs_sentinels

from agent import api as agent_api
from agent import errors, logctx
from rpc import apidoc

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603

# submit(method, fn, **kwargs) runs fn(**kwargs) on a real thread (which one the method and
# its params decide: the repository's, or the host's) and returns its result.
Submit = Callable[..., Any]

_request_ids = itertools.count(1)


def error_body(code: int, message: str, req_id: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": req_id}


class Dispatcher:
    def __init__(self, api: agent_api.Api, submit: Submit) -> None:
        self._api = api
        self._submit = submit
        self._methods: dict[str, Callable[..., Any]] = {
            name: self._wrap(method) for name, method in apidoc.methods().items()
        }
        self._methods["rpc.discover"] = lambda: jsonrpcserver.Success(apidoc.document())

    def handle(self, body: bytes) -> bytes | None:
        """Answer one HTTP body; None when there is nothing to send (notifications only)."""
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return _encode(error_body(PARSE_ERROR, f"Parse error: {e}"))
        except RecursionError:
            return _encode(error_body(PARSE_ERROR, "Parse error: nested too deeply"))
        if isinstance(request, list):
            if not request:
                return _encode(error_body(INVALID_REQUEST, "Invalid Request: empty batch"))
            answers = [a for a in (self._one(r) for r in request) if a is not None]
            return _encode(answers) if answers else None
        answer = self._one(request)
        return _encode(answer) if answer is not None else None

    def _one(self, request: Any) -> dict[str, Any] | None:
        if not isinstance(request, dict):
            return error_body(INVALID_REQUEST, "Invalid Request: not an object")
        rid = next(_request_ids)
        token = logctx.request_id.set(str(rid))
        started = time.monotonic()
        # The request is already parsed; jsonrpcserver's "deserializer" just hands it over.
        response: Any = jrs_dispatcher.dispatch_to_response_pure(
            deserializer=lambda _text: request,
            validator=_validate_request,
            post_process=lambda r: r,
            context=jrs_sentinels.NOCONTEXT,
            methods=self._methods,
            request="",
        )
        answer: Any = None if response is None else jrs_response.to_serializable_one(response)
        error = (answer or {}).get("error", {}).get("code")
        # Every call that changes something, and every error, is logged at INFO; reads (a
        # cluster manager polls getImageStatus many times a second) only at DEBUG.
        level = logging.DEBUG if request.get("method") in READS and error is None else logging.INFO
        log.log(
            level,
            "event=call method=%s id=%r ms=%.1f error=%s",
            request.get("method"),
            request.get("id"),
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
})
_ID_TYPES = (str, int, float, type(None))


def _validate_request(request: Any) -> Any:
    """The JSON-RPC 2.0 request object, checked by hand: jsonrpcserver's default runs a
    jsonschema validation per call, which cost a fifth of the hub's time per getImageStatus."""
    if (
        not isinstance(request, dict)
        or request.get("jsonrpc") != "2.0"
        or not isinstance(request.get("method"), str)
        or not isinstance(request.get("params", []), list | dict)
        or not isinstance(request.get("id"), _ID_TYPES)
        or isinstance(request.get("id"), bool)
        or not set(request) <= {"jsonrpc", "method", "params", "id"}
    ):
        raise ValueError("not a JSON-RPC 2.0 request object")
    return request


def _encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()
