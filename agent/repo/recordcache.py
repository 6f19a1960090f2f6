"""Parsed records kept in memory for as long as their files provably have not changed.

A repository-wide call (listImages, a check) scans every record. Reading and parsing 100,000
JSON files each time is most of its cost; an ``lstat`` of each is a small part of it. So a scan
asks the file system for each record's identity (inode, size, modification and change times,
as ``lstat`` gives them) and parses only the files whose identity differs from the one seen
when the kept copy was read.

Why that is sound: a record is replaced by renaming a new file over its name (a new inode,
new times), and whatever writes a file in place changes its modification time. The one gap
is a change within the file system's clock tick of the read (a coarse clock can give a file
written twice in quick succession the same times): like git's "racy" index entries, a record
whose change time is not at least SETTLED before the read is not kept, so it is parsed again
at the next scan, when its times are old enough to tell.

The records on storage stay the source of truth: the cache is only ever a copy of what a
scan would have parsed, and a caller about to destroy something scans with ``fresh``
(clean and merge derive their plan again under their claim that way).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

# Nanoseconds a record's change time must lie before its read for the parse to be kept: far
# more than any file system's timestamp granularity (ext4, XFS: a kernel tick; GlusterFS: the
# brick's; a second at worst).
SETTLED = 2_000_000_000
# Nanoseconds a whole scan of a directory that has not changed is answered from memory before
# every file of it is looked at again (see RecordCache.listing): what bounds how long a listing
# can miss a record edited in place outside Strata. Looking again costs an lstat per record
# (seconds of CPU at 100,000 records, in the background): minutes, not seconds.
REVALIDATE = 300_000_000_000

# (inode, size, mtime_ns, ctime_ns) packed: a tuple of four big ints costs 200 bytes a record.
Key = bytes
_KEY = struct.Struct("<Qqqq")  # inode numbers are unsigned 64-bit (GlusterFS: from the gfid)


class Entry(NamedTuple):
    """A directory entry as read (never followed): its name, directory and whether it is a
    regular file. Times and sizes are not kept: whoever needs them asks the file system."""

    name: str
    directory: str  # one string shared by every entry of the directory
    is_file: bool

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.name)


def _dir_key(st: os.stat_result) -> Key:
    return _KEY.pack(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def key_of(st: os.stat_result) -> Key | None:
    """The identity of a record file, None when it is not a regular file (never kept)."""
    if not stat.S_ISREG(st.st_mode):
        return None
    return _KEY.pack(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclasses.dataclass
class _Listing:
    """A whole scan of one directory, and the directory's identity before it was read."""

    key: Key
    records: list[Any]
    damage: list[Any]
    verified_ns: int  # when every file of it was last looked at


class RecordCache:
    """Parsed records of one repository, by kind (its directory) and id, and the last whole
    scan of each directory. Records handed out are shared between callers: they are read-only
    (whoever changes a record reads its own copy with the repository's ``get_*`` first)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, dict[str, tuple[Key, Any]]] = {}
        self._listings: dict[str, _Listing] = {}
        self._entries: dict[str, tuple[Key, int, list[Entry]]] = {}
        # Scans a kind again, looking at every file (set by the repository that owns this).
        self.refresh: Callable[[str], None] | None = None
        self._refreshing: set[str] = set()

    def listing(self, kind: str, dir_st: os.stat_result, now_ns: int
                ) -> tuple[list[Any], list[Any]] | None:
        """The last scan of a kind's directory, while the directory has not changed since:
        every write of a record renames a file into it, which changes its times, so the
        same names hold the same files. A record changed in place (never by Strata) changes
        no directory: a full look at every file at least every REVALIDATE bounds how long
        a listing can miss it."""
        with self._lock:
            kept = self._listings.get(kind)
            if kept is None or kept.key != _dir_key(dir_st) \
                    or now_ns - kept.verified_ns >= REVALIDATE:
                return None
            # Half way to the bound, every file is looked at again in the background, so a
            # call seldom waits for it (a scan of 100,000 records' times takes a second).
            refresh = self.refresh is not None and kind not in self._refreshing \
                and now_ns - kept.verified_ns >= REVALIDATE // 2
            if refresh:
                self._refreshing.add(kind)
        if refresh:
            threading.Thread(target=self._refresh, args=(kind,), name=f"revalidate-{kind}",
                             daemon=True).start()
        return list(kept.records), list(kept.damage)

    def _refresh(self, kind: str) -> None:
        try:
            if self.refresh is not None:
                self.refresh(kind)
        except Exception as e:  # the calls meet the same failure, and say so
            log.info("event=revalidate_failed kind=%s error=%r", kind, str(e))
        finally:
            with self._lock:
                self._refreshing.discard(kind)

    def entries(self, directory: str, dir_st: os.stat_result, now_ns: int
                ) -> list[Entry] | None:
        """The entries last read from a directory that has not changed since (any entry
        made, removed or renamed changes the directory's times, and nothing else is kept)."""
        with self._lock:
            kept = self._entries.get(directory)
        if kept is None or kept[0] != _dir_key(dir_st):
            return None
        return kept[2]

    def remember_entries(self, directory: str, dir_st: os.stat_result, taken_ns: int,
                         entries: list[Entry]) -> None:
        with self._lock:
            if taken_ns - max(dir_st.st_mtime_ns, dir_st.st_ctime_ns) < SETTLED:
                self._entries.pop(directory, None)
                return
            self._entries[directory] = (_dir_key(dir_st), taken_ns, entries)

    def remember(self, kind: str, dir_st: os.stat_result, taken_ns: int, records: list[Any],
                 damage: list[Any]) -> None:
        """Keep a whole scan of a directory whose identity ``dir_st`` was taken at
        ``taken_ns``, before its entries were read; only a directory settled by then (a
        change in the same clock tick as the read would leave its times the same)."""
        with self._lock:
            if taken_ns - max(dir_st.st_mtime_ns, dir_st.st_ctime_ns) < SETTLED:
                self._listings.pop(kind, None)
                return
            self._listings[kind] = _Listing(_dir_key(dir_st), records, damage, taken_ns)

    def get(self, kind: str, rec_id: str, st: os.stat_result) -> Any | None:
        """The record parsed from a file of this identity, None when none is kept."""
        k = key_of(st)
        if k is None:
            return None
        with self._lock:
            kept = self._kinds.get(kind, {}).get(rec_id)
        return kept[1] if kept is not None and kept[0] == k else None

    def put(self, kind: str, rec_id: str, st: os.stat_result, rec: Any, read_ns: int) -> None:
        """Keep ``rec``, parsed from the file ``st`` describes (the ``fstat`` of the open
        file it was read from), read at ``read_ns`` (the storage's clock, nanoseconds)."""
        k = key_of(st)
        with self._lock:
            kinds = self._kinds.setdefault(kind, {})
            if k is None or read_ns - max(st.st_mtime_ns, st.st_ctime_ns) < SETTLED:
                kinds.pop(rec_id, None)  # too young to tell a later change from it
                return
            # Keyed by the record's own id string (the file name's would be another copy).
            kinds[getattr(rec, "id", rec_id)] = (k, rec)

    def keep_only(self, kind: str, rec_ids: set[str]) -> None:
        """Forget the records of a kind whose files a full scan no longer found."""
        with self._lock:
            kinds = self._kinds.get(kind)
            if kinds is None:
                return
            for gone in [r for r in kinds if r not in rec_ids]:
                del kinds[gone]

    def forget(self, kind: str, rec_id: str) -> None:
        with self._lock:
            self._kinds.get(kind, {}).pop(rec_id, None)

    def clear(self) -> None:
        with self._lock:
            self._kinds.clear()
            self._listings.clear()
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(k) for k in self._kinds.values())
