"""``strata-client fixStorageRepository repositoryId=R --all [--types clean,merge]``.

Applies every fix the checker proposes, one at a time in a safe order, and follows each until it
is done: mend first (finish what was interrupted), then merge, then optimize, then clean (which
reclaims what the others freed). After each fix the repository is checked again, because a fix
changes what is left to do. A fix that fails is reported and not retried in the same run;
findings that need a person are listed at the end.

While a fix runs, its progress goes to ``progress``: the line ``--watch`` draws (cliwatch), on
stderr; redrawn in place on a terminal, else one line each time it changes, so a log of the run
shows it too. Stdout keeps one line per fix and the summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from rpc import cliwatch, transport

ORDER = {"mend": 0, "merge": 1, "optimize": 2, "clean": 3}
TYPES = tuple(ORDER)
MAX_ROUNDS = 1000
POLL = 0.25

Call = Callable[[str, Mapping[str, Any]], Any]


def parse_types(text: str | None) -> list[str] | None:
    if not text:
        return None
    types = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in types if t not in ORDER]
    if bad:
        raise ValueError(f"unknown fix type(s) {', '.join(bad)}; known: {', '.join(TYPES)}")
    return types


def fix_all(call: Call, repo_id: str, types: list[str] | None, out: TextIO,
            sleep: Callable[[float], None] = time.sleep,
            progress: cliwatch.Progress | None = None) -> tuple[int, int, int]:
    """Return (applied, failed, needing a person)."""
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
        fix = min(todo, key=lambda f: ORDER[f["type"]])
        out.write(f"{fix['type']:<8} {fix['description']}\n")
        out.flush()
        try:
            call("fixStorageRepository", {"repositoryId": repo_id, "fix": fix})
        except transport.RemoteError as e:
            if e.name == "StaleFix":
                continue  # the state moved on: check again
            out.write(f"         failed: {e.message}\n")
            failed.add(fix["data"])
            continue
        error = _follow(call, repo_id, fix, sleep, progress)
        if error:
            out.write(f"         failed: {error}\n")
            failed.add(fix["data"])
        else:
            applied += 1
    for f in manual:
        out.write(f"needs a person: {f['description']}\n")
    out.write(f"{applied} fix(es) applied, {len(failed)} failed, "
              f"{len(manual)} finding(s) need a person\n")
    out.flush()
    return applied, len(failed), len(manual)


def _follow(call: Call, repo_id: str, fix: Mapping[str, Any],
            sleep: Callable[[float], None],
            progress: cliwatch.Progress | None = None) -> str | None:
    """Wait until nothing runs on the fix's images, showing each one's progress; the first
    last_error, if any."""
    if fix["type"] == "clean":
        return None  # done when the call returned
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
                        return str(status["last_error"])
                    break
                sleep(POLL)
    finally:
        if progress is not None:
            progress.finish()
    return None
