"""The request id and operation id that every log line carries when it has them.

Both live in context variables: the RPC layer sets the request id around a call (on the thread
that runs it), the runner sets the operation id around an operation. ``Filter`` puts them on each
record, so messages need not repeat them.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
operation_id: contextvars.ContextVar[str] = contextvars.ContextVar("operation_id", default="")


def bound(req: str, fn: Callable[..., T]) -> Callable[..., T]:
    """fn, run with the request id set: for handing a call to another thread."""

    def run(*args: Any, **kwargs: Any) -> T:
        token = request_id.set(req)
        try:
            return fn(*args, **kwargs)
        finally:
            request_id.reset(token)

    return run


class Filter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        parts = []
        req, op = request_id.get(), operation_id.get()
        if req:
            parts.append(f" req={req}")
        if op:
            parts.append(f" op={op}")
        record.ctx = "".join(parts)
        return True
