"""What a repository-wide call derives from records, kept for the next such call.

A scan hands out the same record objects for as long as their files have not changed
(agent/repo/recordcache.py). So what was derived from records — a chain, whether a volume's
file matches its record, an image's summary in a listing — holds as long as the records it was
derived from are still the very objects a scan gives: checking that is a few identity
comparisons per image, where deriving it again is a walk, file reads and a status.

What depends on the files of volumes as well (their headers: qemu writes them in place) is kept
only when it was sound, and only for REVALIDATE: a fault is looked for afresh every time, and
a change made in place outside Strata is seen within that bound. A decision that destroys
something never uses any of this (its inventory is ``fresh``).
"""

from __future__ import annotations

import dataclasses
import operator
import random
import threading
import time
import weakref
from typing import Any

from agent.image import model
from agent.repo import contract

# Nanoseconds what was derived from volume files is trusted at most without looking at them
# again. Each entry lives a random 1/2..1 of it, so entries made together (a listing's) are
# looked at again spread out, not by one slow call; a whole listing is kept for 1/2 of it.
# So a change in place outside Strata is in a listing within 1.5 x REVALIDATE: 5 minutes, the
# record cache's bound too (looking at 100,000 volume files again costs seconds of CPU).
REVALIDATE = 200_000_000_000


def _stamp(now_ns: int) -> int:
    """When an entry made now counts as made: now, less a random part of REVALIDATE/2."""
    return now_ns - random.randrange(REVALIDATE // 2)


Scanned = tuple[list[model.Operation], list[model.Image], list[model.Volume]]
# Every image in listing order, and by id its summary when that follows from records alone
# (None: describe it afresh).
Rows = tuple[list[model.Image], dict[str, "dict[str, Any] | None"]]


@dataclasses.dataclass
class _Listing:
    scanned: Scanned
    findings: dict[str, str]
    made_ns: int
    rows: Rows


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


class Memo:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.deriving = threading.Lock()  # held by whoever derives a listing's rows
        # Image id -> (its record, its walked chain, the parent image records the walk read).
        self.chains: dict[str, tuple[model.Image, list[model.Volume],
                                     tuple[model.Image | None, ...]]] = {}
        # Volume id -> (its record, its parent's record, when its file was found sound).
        self.sound: dict[str, tuple[model.Volume, model.Volume | None, int]] = {}
        # Image id -> (what its summary was derived from, when, the summary).
        self.summaries: dict[str, tuple[tuple[Any, ...], int, dict[str, Any]]] = {}
        self._listing: _Listing | None = None
        self._counts: tuple[list[model.Image], dict[str, int]] | None = None
        # Volume id -> (its record, when, the backing its file's header named, if another).
        self.backings: dict[str, tuple[model.Volume, int, str | None]] = {}

    def chain(self, img: model.Image, volumes: dict[str, model.Volume],
              images: dict[str, model.Image]) -> list[model.Volume] | None:
        """The sound chain walked for this very record, when every record it went through is
        still the one the scan gave (None: walk it)."""
        kept = self.chains.get(img.id)
        if kept is None or kept[0] is not img:
            return None
        _, vols, parents = kept
        for v in vols:
            if volumes.get(v.id) is not v:
                return None
        for p in parents:
            if p is not None and images.get(p.id) is not p:
                return None
        return vols

    def keep_chain(self, img: model.Image, vols: list[model.Volume],
                   images: dict[str, model.Image]) -> None:
        parents = tuple(images.get(v.parent_image_id) for v in vols
                        if v.parent_image_id is not None)
        with self.lock:
            self.chains[img.id] = (img, vols, parents)

    def is_sound(self, vol: model.Volume, parent: model.Volume | None) -> bool:
        kept = self.sound.get(vol.id)
        return (kept is not None and kept[0] is vol and kept[1] is parent
                and time.monotonic_ns() - kept[2] < REVALIDATE)

    def keep_sound(self, vol: model.Volume, parent: model.Volume | None) -> None:
        with self.lock:
            self.sound[vol.id] = (vol, parent, _stamp(time.monotonic_ns()))

    def counts(self, images: list[model.Image]) -> dict[str, int]:
        """The images of a scan by kind (removed and incomplete apart), counted again only
        when the scan gave other records than the last one counted."""
        kept = self._counts
        if kept is not None and _same(kept[0], images):
            return dict(kept[1])
        counts = {"disk": 0, "snapshot": 0, "incomplete": 0, "removed": 0}
        for img in images:
            if img.removed:
                counts["removed"] += 1
            elif not img.strong:
                counts["incomplete"] += 1
            else:
                counts[img.kind.value] += 1
        with self.lock:
            self._counts = (images, counts)
        return dict(counts)

    def backing(self, vol: model.Volume, now_ns: int) -> tuple[bool, str | None]:
        """(known, the volume its file's header named as backing) as read lately for this
        very record: what a clean keeps is derived again under its claim, from the files."""
        kept = self.backings.get(vol.id)
        if kept is None or kept[0] is not vol or now_ns - kept[1] >= REVALIDATE:
            return False, None
        return True, kept[2]

    def keep_backing(self, vol: model.Volume, stem: str | None, now_ns: int) -> None:
        with self.lock:
            self.backings[vol.id] = (vol, _stamp(now_ns), stem)

    def summary(self, image_id: str, key: tuple[Any, ...], now_ns: int) -> dict[str, Any] | None:
        """The summary derived from exactly these objects (compared by identity: a chain
        kept above is the same list object while it holds)."""
        kept = self.summaries.get(image_id)
        if kept is None or now_ns - kept[1] >= REVALIDATE or len(kept[0]) != len(key):
            return None
        for a, b in zip(kept[0], key, strict=True):
            if a is not b:
                return None
        return kept[2]

    def keep_summary(self, image_id: str, key: tuple[Any, ...], summary: dict[str, Any],
                     now_ns: int) -> None:
        with self.lock:
            self.summaries[image_id] = (key, _stamp(now_ns), summary)

    def listing(self, scanned: Scanned, findings: dict[str, str], now_ns: int
                ) -> Rows | None:
        """The rows of the last listing, when its scans gave exactly the same records (a
        repository nobody changed since: one comparison of object identities per record)."""
        kept = self._listing
        if kept is None or now_ns - kept.made_ns >= REVALIDATE // 2 or kept.findings != findings:
            return None
        if not (_same(kept.scanned[0], scanned[0]) and _same(kept.scanned[1], scanned[1])
                and _same(kept.scanned[2], scanned[2])):
            return None
        return kept.rows

    def keep_listing(self, scanned: Scanned, findings: dict[str, str], now_ns: int,
                     rows: Rows) -> None:
        with self.lock:
            self._listing = _Listing(scanned, dict(findings), now_ns, rows)

    def keep_only(self, image_ids: set[str], volume_ids: set[str]) -> None:
        """Forget what was derived for images and volumes a scan no longer has."""
        with self.lock:
            tables: tuple[tuple[dict[str, Any], set[str]], ...] = (
                (self.chains, image_ids), (self.summaries, image_ids),
                (self.sound, volume_ids), (self.backings, volume_ids))
            for table, ids in tables:
                for gone in [k for k in table if k not in ids]:
                    del table[gone]


_MEMOS: weakref.WeakKeyDictionary[contract.Repository, Memo] = weakref.WeakKeyDictionary()
_MEMOS_LOCK = threading.Lock()


def of(repo: contract.Repository) -> Memo:
    """The memo of one open repository (gone with it)."""
    with _MEMOS_LOCK:
        m = _MEMOS.get(repo)
        if m is None:
            m = _MEMOS[repo] = Memo()
        return m
