"""listImages: which images, in which order, and one page of them at a time.

Order is ``(created, imageId)``, ascending: unique, and fixed for an image's life. A cursor names
the sort key of the last image a page gave (keyset paging), so the next page is "every wanted
image after that key": images made or removed between pages neither repeat nor shift the others
(an image made meanwhile shows up on a later page when its key sorts after the cursor, which a
new image's does unless its host's clock is behind).

Everything a record alone says (kind, userData, created, removed, weak) is filtered and ordered
on the records, before any image's status is worked out: the status of an image (its chain's
files, its journal) costs a header read or more, so a page computes it only for the images it
considers, in order, until the page is full. Only ``status`` needs that summary to filter.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import heapq
import json
import math
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from agent import errors
from agent.image import model

MAX_LIMIT = 10_000
# A cursor is a short base64 text; anything much longer is not one of ours.
MAX_CURSOR = 256
STATUSES = frozenset(s.value for s in model.Status)
KINDS = frozenset(k.value for k in model.Kind)

Key = tuple[float, str]
Summary = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Query:
    """A listImages call's options, checked."""

    kind: str | None = None
    statuses: frozenset[str] | None = None
    # Every key must be in the image's userData; with a value other than None, that very value.
    user_data: dict[str, Any] | None = None
    include_weak: bool = False
    limit: int | None = None
    after: Key | None = None
    # The answer is a page ({"images", "nextCursor"}): limit or cursor was given.
    paged: bool = False
    with_warnings: bool = False


def _bad(message: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(message, param="options")


def parse(options: dict[str, Any]) -> Query:
    """The query of ``options``, or InvalidArgument naming the bad option (nothing is read)."""
    kind = options.get("kind")
    if kind is not None and kind not in KINDS:
        raise _bad(f"options.kind must be one of {sorted(KINDS)}, got {kind!r}")
    limit = options.get("limit")
    if limit is not None:
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)  # 1000.0 is a JSON integer
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise _bad(f"options.limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}")
    cursor = options.get("cursor")
    after = None if cursor is None else decode_cursor(cursor)
    return Query(
        kind=kind,
        statuses=_statuses(options.get("status")),
        user_data=_user_data(options.get("userData")),
        include_weak=bool(options.get("includeIncomplete", False)),
        limit=limit,
        after=after,
        paged=limit is not None or cursor is not None,
        with_warnings=bool(options.get("withWarnings", False)),
    )


def _statuses(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    given = [value] if isinstance(value, str) else value
    if (not isinstance(given, list) or not given
            or not all(isinstance(s, str) and s in STATUSES for s in given)):
        raise _bad(f"options.status must be one of {sorted(STATUSES)} or a non-empty list of "
                   f"them, got {value!r}")
    return frozenset(given)


def _user_data(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("options.userData must be an object of the keys an image's userData must "
                   f"hold (null: any value), got {value!r}")
    return value


# -- cursors ---------------------------------------------------------------------------------


def encode_cursor(key: Key) -> str:
    """Opaque to clients: the sort key of the last image of a page (repr keeps the float
    exact)."""
    text = json.dumps([1, key[0], key[1]], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: Any) -> Key:
    bad = _bad(f"options.cursor {_short(cursor)} is not a cursor a listImages page gave "
               "(pass nextCursor as it came)")
    if not isinstance(cursor, str) or not cursor or len(cursor) > MAX_CURSOR:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError):
        raise bad from None
    if not (isinstance(value, list) and len(value) == 3 and value[0] == 1
            and isinstance(value[1], int | float) and not isinstance(value[1], bool)
            and math.isfinite(value[1]) and model.is_id(value[2])):
        raise bad
    return float(value[1]), value[2]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- selection -------------------------------------------------------------------------------


def key(img: model.Image) -> Key:
    return img.created, img.id


_KEY = operator.attrgetter("created", "id")  # key() in C: sorts call it per image


def by_record(img: model.Image, q: Query) -> bool:
    """Whether the image's record alone lets it into the listing."""
    return bool(_candidates([img], q))


def _candidates(images: Iterable[model.Image], q: Query) -> list[model.Image]:
    """The images the records let in, in no order. One comprehension per filter given, with
    the tests inline: at 100,000 images a Python call per image costs more than the page."""
    weak = q.include_weak
    pool = [i for i in images if not i.removed and (i.strong or weak)]
    if q.kind is not None:
        kind = q.kind
        pool = [i for i in pool if i.kind == kind]
    for k, value in (q.user_data or {}).items():
        if value is None:
            pool = [i for i in pool if k in i.user_data]
        elif isinstance(value, str):  # the usual case: only an equal str is == to a str
            pool = [i for i in pool if i.user_data.get(k) == value]
        else:
            pool = [i for i in pool if k in i.user_data and same(i.user_data[k], value)]
    if q.after is not None:
        created, image_id = q.after
        pool = [i for i in pool
                if i.created > created or (i.created == created and i.id > image_id)]
    return pool


def ordered(images: Iterable[model.Image], q: Query) -> Iterator[model.Image]:
    """The images the records let in, in order, lazily. Without a limit, all of them sorted;
    with one, no sort of the whole repository: the ``limit + 1``-th smallest creation time
    (heapq.nsmallest over bare floats, in C) bounds the first page's images, which alone are
    sorted; then more in growing rounds, if a status filter turned some down."""
    pool = _candidates(images, q)
    want = len(pool) if q.limit is None else q.limit + 1  # one more: is there a next page?
    while pool:
        if want * 4 >= len(pool):  # most of what is left: one sort is cheaper than rounds
            pool.sort(key=_KEY)
            yield from pool
            return
        edge = heapq.nsmallest(want, [i.created for i in pool])[-1]
        # Every image of the first ``want`` has created <= edge (ties included: sorted too).
        head = [i for i in pool if i.created <= edge]
        head.sort(key=_KEY)
        yield from head
        pool = [i for i in pool if i.created > edge]
        want *= 4


def page(images: Iterable[model.Image], q: Query,
         summarize: Callable[[model.Image], Summary]) -> tuple[list[Summary], str | None]:
    """The rows of one page (all of them without a limit), and the cursor of the next page:
    None when no image is left after this page."""
    rows: list[Summary] = []
    last: Key | None = None
    for img in ordered(images, q):
        if last is not None and q.limit is not None and len(rows) == q.limit:
            # One more image the records let in: there may be more rows (a status filter may
            # still turn it down; the next page then says so, empty, with a null cursor).
            return rows, encode_cursor(last)
        row = summarize(img)
        if q.statuses is None or row["status"] in q.statuses:
            rows.append(row)
            last = key(img)
    return rows, None


def answer(q: Query, rows: list[Summary], next_cursor: str | None,
           warnings: Callable[[], list[dict[str, Any]]]) -> list[Summary] | dict[str, Any]:
    """The result's shape: the bare list as ever, unless paged ({"images", "nextCursor"}) or
    withWarnings ({"images", "warnings"}), or both."""
    if not q.paged and not q.with_warnings:
        return rows
    out: dict[str, Any] = {"images": rows}
    if q.paged:
        out["nextCursor"] = next_cursor
    if q.with_warnings:
        out["warnings"] = warnings()
    return out


# -- userData equality -----------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1 (as Python's == says), 1 is 1.0; iterative, since a record
    written by hand may nest deeper than Python recurses."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if isinstance(x, bool) or isinstance(y, bool) or x is None or y is None:
            if x is not y:
                return False
        elif ((isinstance(x, int | float) and isinstance(y, int | float))
              or (isinstance(x, str) and isinstance(y, str))):
            if x != y:
                return False
        elif isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        else:
            return False
    return True
