"""The request-id store: what makes a retried data-changing call safe (``options.requestId``).

A client whose call got no answer (a timeout, a dropped connection, an agent that died) cannot
know whether the call was carried out. It sends the same call again with the same requestId, and
the agent answers with the first call's result instead of doing it twice.

One record per request id, ``<state_dir>/requests/<requestId>.json``, written durably through
``agent.fileio``: first ``started`` (the method, a digest of its params, and an id reserved for
what the call creates) BEFORE the call commits anything, then ``done`` with the result. Because
the id a create gives its new image is reserved before the intent is committed, a crash between
the commit and the ``done`` record cannot make the retry create a second image: the retry sees
``started``, runs the call again with the same reserved id, and the call recognises what the
attempt cut short already made (``Attempt.retry``).

A call refused with a domain error changed nothing: its record is dropped, so the request may be
sent again. A requestId sent with other params (or to another method) is refused with
``RequestIdReused``. Duplicates that arrive together are run one after the other (one lock per
request id), so the second sees the first's ``done`` record. Records are kept ``ttl`` seconds
after their last write, then pruned (when the agent starts, then every ``min(ttl, 600)`` s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from agent import crashpoint, errors, fileio

log = logging.getLogger(__name__)

T = TypeVar("T")

STARTED = "started"
DONE = "done"
# Pruning lists the directory: at most this often, however short the ttl.
MAX_PRUNE_INTERVAL = 600.0
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SUFFIX = ".json"


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What one run of a call learns from the store."""

    # The id the call gives what it creates: fresh on the first attempt, the same on a retry.
    reserved_id: str
    # An earlier attempt with this requestId started and its outcome is unknown (the agent died,
    # or the call failed unexpectedly): part of it, or all of it, may already be done.
    retry: bool = False


def fresh() -> Attempt:
    """The attempt of a call sent without a requestId."""
    return Attempt(str(uuid.uuid4()))


def digest(method: str, params: Mapping[str, Any]) -> str:
    """The params' fingerprint, requestId left out: the same call sent again has the same one."""
    plain = dict(params)
    options = plain.get("options")
    if isinstance(options, dict):
        plain["options"] = {k: v for k, v in options.items() if k != "requestId"}
    text = json.dumps({"method": method, "params": plain}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass
class _Slot:
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    users: int = 0


class Store:
    """``directory`` None keeps the records in memory only (an agent without a state_dir)."""

    def __init__(self, directory: str | None, ttl: float) -> None:
        self.directory = directory
        self.ttl = ttl
        self._memory: dict[str, tuple[float, dict[str, Any]]] = {}
        self._slots: dict[str, _Slot] = {}
        self._guard = threading.Lock()
        self._pruning = threading.Lock()
        self._next_prune = 0.0
        if directory is not None:
            os.makedirs(directory, 0o750, exist_ok=True)
        self.prune()

    # -- the one entry point -------------------------------------------------------------------

    def run(self, request_id: str | None, method: str, params: Mapping[str, Any],
            call: Callable[[Attempt], T]) -> T:
        """Run ``call`` once per request id: the first time for real, then the stored result."""
        if request_id is None:
            return call(fresh())
        if not isinstance(request_id, str) or not _UUID.fullmatch(request_id):
            raise errors.InvalidArgument(
                f"options.requestId must be a lower-case UUID, got {request_id!r}",
                param="options")
        self._maybe_prune()
        fingerprint = digest(method, params)
        with self._locked(request_id):
            record = self._read(request_id)
            if record is not None:
                if record.get("method") != method or record.get("digest") != fingerprint:
                    raise errors.RequestIdReused(
                        f"requestId {request_id} was already used for another call "
                        f"({record.get('method')} with other params); a retry must send the "
                        "same params, a new call needs a new requestId",
                        requestId=request_id, method=record.get("method"))
                if record.get("state") == DONE:
                    log.info("event=request_replayed request=%s method=%s", request_id, method)
                    stored: T = record["result"]
                    return stored
                attempt = Attempt(str(record.get("reservedId")), retry=True)
                log.info("event=request_retried request=%s method=%s reserved=%s",
                         request_id, method, attempt.reserved_id)
            else:
                attempt = fresh()
                record = {"requestId": request_id, "method": method, "digest": fingerprint,
                          "reservedId": attempt.reserved_id, "state": STARTED}
                self._write(request_id, record)
            crashpoint.hit("request", "run")
            try:
                result = call(attempt)
            except errors.Error:
                # Refused: nothing changed, so nothing to remember; the request may come again.
                self._drop(request_id)
                raise
            # Between the call's commit and its record: the case the reserved id is for.
            crashpoint.hit("request", "record")
            self._write(request_id, {**record, "state": DONE, "result": result})
            return result

    # -- records -------------------------------------------------------------------------------

    def _path(self, request_id: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, request_id + SUFFIX)

    def _read(self, request_id: str) -> dict[str, Any] | None:
        """The live record of a request id; None when there is none or it expired."""
        if self.directory is None:
            at, kept = self._memory.get(request_id, (0.0, {}))
            return kept if kept and at + self.ttl >= time.time() else None
        path = self._path(request_id)
        record: Any
        try:
            if os.stat(path).st_mtime + self.ttl < time.time():
                return None  # expired: the call is new again (the file goes at the next prune)
            record = fileio.read_json(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            record = e
        if not isinstance(record, dict) or record.get("requestId") != request_id:
            # Written atomically, so only damage or a hand edit makes it unreadable: whether the
            # call was done is unknown, and running it again could make a duplicate.
            log.warning("event=request_record_unreadable path=%s error=%r", path, record)
            raise errors.Error(
                f"the record of requestId {request_id} ({path}) cannot be read, so whether the "
                "call was carried out is unknown; check the images, then send the call with a "
                "new requestId", requestId=request_id, path=path)
        return record

    def _write(self, request_id: str, record: dict[str, Any]) -> None:
        if self.directory is None:
            with self._guard:  # prune iterates over it
                self._memory[request_id] = (time.time(), record)
        else:
            fileio.write_json(self._path(request_id), record)

    def _drop(self, request_id: str) -> None:
        if self.directory is None:
            with self._guard:
                self._memory.pop(request_id, None)
        else:
            fileio.remove(self._path(request_id))

    @contextlib.contextmanager
    def _locked(self, request_id: str) -> Iterator[None]:
        """Serialize the calls of one request id in this process; other ids run freely."""
        with self._guard:
            slot = self._slots.setdefault(request_id, _Slot())
            slot.users += 1
        try:
            with slot.lock:
                yield
        finally:
            with self._guard:
                slot.users -= 1
                if not slot.users:
                    del self._slots[request_id]

    # -- expiry --------------------------------------------------------------------------------

    def _maybe_prune(self) -> None:
        if time.monotonic() >= self._next_prune and self._pruning.acquire(blocking=False):
            try:
                self.prune()
            finally:
                self._pruning.release()

    def prune(self) -> int:
        """Delete the records older than ttl (and temporary files a crash left); return how
        many records went."""
        self._next_prune = time.monotonic() + min(self.ttl, MAX_PRUNE_INTERVAL)
        now = time.time()
        if self.directory is None:
            with self._guard:
                old = [k for k, (at, _) in self._memory.items() if at + self.ttl < now]
            for request_id in old:
                with self._locked(request_id):
                    at, _ = self._memory.get(request_id, (now, {}))
                    if at + self.ttl < time.time():
                        self._drop(request_id)
            return len(old)
        gone = 0
        with os.scandir(self.directory) as entries:
            names = [(e.name, e.stat(follow_symlinks=False).st_mtime) for e in entries]
        for name, mtime in names:
            if mtime + self.ttl >= now:
                continue
            path = os.path.join(self.directory, name)
            request_id = name.removesuffix(SUFFIX)
            try:
                if fileio.is_temporary(name):
                    fileio.remove(path, durable=False)
                elif name.endswith(SUFFIX) and _UUID.fullmatch(request_id):
                    # Under the request's lock, and only if still old: a retry of an expired
                    # request may be writing its new record right now.
                    with self._locked(request_id):
                        if os.stat(path).st_mtime + self.ttl < time.time():
                            gone += fileio.remove(path, durable=False)
            except OSError as e:
                log.warning("event=request_prune_failed path=%s error=%r", path, str(e))
        if gone:
            fileio.fsync_dir(self.directory)
            log.info("event=requests_pruned count=%d ttl=%s", gone, self.ttl)
        return gone
