"""``strata-client fixStorageRepository repositoryId=R --all [--types clean,merge]``.

Applies every fix the checker proposes, in a safe order, and follows them until they are done:
mend first (finish what was interrupted), then merge, then optimize, then clean (which reclaims
what the others freed). Each round takes the fixes of the first type left, sends them together
(JSON-RPC batches of ``BATCH`` fixStorageRepository calls: the agent checks and claims each on
its own, as if sent alone) and waits on their operations (waitForOperations: the agent answers
as soon as they are over, no polling); then the repository is checked again, because fixes
change what is left to do. A clean goes alone. A fix that fails is reported and not retried in
the same run; one the state moved past (StaleFix) is simply derived again by the next check;
findings that need a person are listed at the end. A recovery of 1,000 operations is then a
check, ten batches and a few waits, instead of a check, a call and a 0.25 s poll per fix.

While fixes run, the progress of the first one still running goes to ``progress``: the line
``--watch`` draws (cliwatch), on stderr; redrawn in place on a terminal, else one line each time
it changes, so a log of the run shows it too. Stdout keeps one line per fix and the summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from rpc import cliwatch, transport

ORDER = {"mend": 0, "merge": 1, "optimize": 2, "clean": 3}
TYPES = tuple(ORDER)
MAX_ROUNDS = 1000
# fixStorageRepository calls per JSON-RPC batch: the agent's default [rpc] max_batch (a batch
# it refuses as too large ran nothing, and is sent again in halves).
BATCH = 100
# How long one waitForOperations call waits at most: the progress line is redrawn this often.
WAIT = 1.0
INVALID_REQUEST = -32600
# An agent without waitForOperations (older than this client) is polled instead, this often.
POLL = 0.25
WAIT_METHOD = "waitForOperations"

Call = Callable[[str, Mapping[str, Any]], Any]
# Several calls in one round trip: each one's result, or the transport.RemoteError it got.
Batch = Callable[[list[tuple[str, Mapping[str, Any]]]], list[Any]]


def parse_types(text: str | None) -> list[str] | None:
    if not text:
        return None
    types = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in types if t not in ORDER]
    if bad:
        raise ValueError(f"unknown fix type(s) {', '.join(bad)}; known: {', '.join(TYPES)}")
    return types


def one_by_one(call: Call) -> Batch:
    """A Batch for an agent reached one call at a time."""
    def send(calls: list[tuple[str, Mapping[str, Any]]]) -> list[Any]:
        out: list[Any] = []
        for name, params in calls:
            try:
                out.append(call(name, params))
            except transport.RemoteError as e:
                out.append(e)
        return out
    return send


def fix_all(call: Call, repo_id: str, types: list[str] | None, out: TextIO,
            sleep: Callable[[float], None] = time.sleep,
            progress: cliwatch.Progress | None = None,
            batch: Batch | None = None, wait: bool = False) -> tuple[int, int, int]:
    """Return (applied, failed, needing a person). ``batch``: how to send many calls at once
    (else one by one); ``wait``: the agent has waitForOperations (else getImageStatus is
    polled, every POLL seconds)."""
    send = batch or one_by_one(call)
    options: dict[str, Any] = {"types": types} if types else {}
    failed: set[str] = set()
    applied = 0
    manual: list[Mapping[str, Any]] = []
    for _ in range(MAX_ROUNDS):
        fixes = call("checkStorageRepository", {"repositoryId": repo_id, "options": options})
        manual = [f for f in fixes if f.get("manual")]
        todo = [f for f in fixes if not f.get("manual") and f["data"] not in failed]
        if not todo:
            break
        first = min(ORDER[f["type"]] for f in todo)
        group = [f for f in todo if ORDER[f["type"]] == first]
        if group[0]["type"] == "clean":
            group = group[:1]
        started = _apply(send, repo_id, group, out, failed)
        errors = (_follow(call, repo_id, started, progress) if wait
                  else _poll(call, repo_id, started, sleep, progress))
        for fix in started:
            error = next((errors[i] for i in fix["imageIds"] if i in errors), None)
            if error:
                out.write(f"failed   {fix['type']} of {', '.join(fix['imageIds'])}: {error}\n")
                failed.add(fix["data"])
            else:
                applied += 1
        out.flush()
    for f in manual:
        out.write(f"needs a person: {f['description']}\n")
    out.write(f"{applied} fix(es) applied, {len(failed)} failed, "
              f"{len(manual)} finding(s) need a person\n")
    out.flush()
    return applied, len(failed), len(manual)


def _apply(send: Batch, repo_id: str, group: list[Mapping[str, Any]], out: TextIO,
           failed: set[str]) -> list[Mapping[str, Any]]:
    """Send the fixes in batches; the ones the agent started."""
    started: list[Mapping[str, Any]] = []
    size = BATCH
    i = 0
    while i < len(group):
        chunk = group[i:i + size]
        try:
            results = send([("fixStorageRepository", {"repositoryId": repo_id, "fix": f})
                            for f in chunk])
        except transport.RemoteError as e:
            if e.code == INVALID_REQUEST and size > 1:
                size //= 2  # the agent takes smaller batches: none of this one ran
                continue
            raise
        for fix, result in zip(chunk, results, strict=True):
            out.write(f"{fix['type']:<8} {fix['description']}\n")
            if isinstance(result, transport.RemoteError):
                if result.name == "StaleFix":
                    continue  # the state moved on: the next check derives it again
                out.write(f"         failed: {result.message}\n")
                failed.add(fix["data"])
                continue
            started.append(fix)
        out.flush()
        i += len(chunk)
    return started


def _follow(call: Call, repo_id: str, fixes: list[Mapping[str, Any]],
            progress: cliwatch.Progress | None = None) -> dict[str, str]:
    """Wait until nothing of this host runs on the fixes' images, showing the progress of the
    first still running; image id -> its last_error, for those that failed."""
    pending = list(dict.fromkeys(i for f in fixes if f["type"] != "clean"
                                 for i in f["imageIds"]))
    errors: dict[str, str] = {}
    try:
        while pending:
            statuses = call(WAIT_METHOD, {"repositoryId": repo_id,
                                                  "imageIds": pending,
                                                  "options": {"timeout": WAIT}})
            still: list[str] = []
            shown: Mapping[str, Any] | None = None
            for image_id, status in zip(pending, statuses, strict=True):
                if status is None:
                    continue  # a removed image the fix folds away
                # Running on another host (runningOn) is not this run's to wait for.
                if status.get("running") and not status.get("runningOn"):
                    still.append(image_id)
                    shown = shown or status
                    continue
                if status.get("last_error"):
                    errors[image_id] = str(status["last_error"])
                if not still:
                    shown = status
            if progress is not None and shown is not None:
                progress.update(shown)
            pending = still
    finally:
        if progress is not None:
            progress.finish()
    return errors


def _poll(call: Call, repo_id: str, fixes: list[Mapping[str, Any]],
          sleep: Callable[[float], None],
          progress: cliwatch.Progress | None = None) -> dict[str, str]:
    """_follow for an agent without waitForOperations: each fix's images one after the other,
    by getImageStatus every POLL seconds."""
    errors: dict[str, str] = {}
    for fix in fixes:
        if fix["type"] == "clean":
            continue  # done when the call returned
        try:
            for image_id in fix["imageIds"]:
                while True:
                    try:
                        status = call("getImageStatus",
                                      {"repositoryId": repo_id, "imageId": image_id})
                    except transport.RemoteError as e:
                        if e.name == "ImageNotFound":
                            break  # a removed image the fix folds away
                        raise
                    if progress is not None:
                        progress.update(status)
                    if not status.get("running"):
                        if status.get("last_error"):
                            errors[image_id] = str(status["last_error"])
                        break
                    sleep(POLL)
                if image_id in errors:
                    break
        finally:
            if progress is not None:
                progress.finish()
    return errors
