"""Group commit: concurrent durable writes share directory fsyncs, and each still returns only
once an fsync of its directory that began after its rename has ended.

The fsyncs and renames are the real ones (os.fsync, os.rename), wrapped to log their order and
to make a directory fsync last long enough (seeded random milliseconds) for writers to pile up
behind it, as on a slow disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent import fileio
from tests import conftest


class Log:
    """Real fsyncs and renames, logged with a sequence number; directory fsyncs slowed."""

    def __init__(self, monkeypatch: Any, rng: random.Random | None = None,
                 hold: dict[str, threading.Event] | None = None) -> None:
        self.lock = threading.Lock()
        self.n = 0
        self.events: list[tuple[int, str, str]] = []
        self.rng = rng
        self.hold = hold or {}  # a directory -> an event its next fsync waits for
        self.held: dict[str, threading.Event] = {}  # set when that fsync is waiting
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                real_fsync(fd)
                return
            self.add("dir_start", path)
            gate = self.hold.pop(path, None)
            if gate is not None:
                self.held.setdefault(path, threading.Event()).set()
                assert gate.wait(30)
            if self.rng is not None:
                with self.lock:
                    pause = self.rng.uniform(0.002, 0.012)
                time.sleep(pause)
            real_fsync(fd)
            self.add("dir_end", path)

        def rename(src: str, dst: str) -> None:
            real_rename(src, dst)
            self.add("rename", dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)

    def add(self, kind: str, path: str) -> int:
        with self.lock:
            self.n += 1
            self.events.append((self.n, kind, path))
            return self.n

    def of(self, kind: str, path: str | None = None) -> list[int]:
        with self.lock:
            return [n for n, k, p in self.events if k == kind and (path is None or p == path)]

    def fsyncs(self, directory: str) -> list[tuple[int, int]]:
        """(start, end) of each fsync of ``directory``: they never overlap, so in order."""
        return list(zip(self.of("dir_start", directory), self.of("dir_end", directory),
                        strict=True))


@pytest.mark.parametrize("seed", range(4))
def test_concurrent_writers_share_directory_fsyncs_and_each_returns_once_its_rename_is_durable(
        tmp_path: Any, monkeypatch: Any, seed: int) -> None:
    directory = str(tmp_path / "images")
    os.mkdir(directory)
    log = Log(monkeypatch, random.Random(seed))
    writers = 16
    start = threading.Barrier(writers)
    returned: dict[str, int] = {}
    failures: list[BaseException] = []

    def write(i: int) -> None:
        path = os.path.join(directory, f"{i}.json")
        try:
            start.wait()
            fileio.write_bytes(path, f'{{"n": {i}}}\n'.encode())
            returned[path] = log.add("return", path)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    fsyncs = log.fsyncs(directory)
    # Shared: while one fsync runs, everyone who renamed meanwhile waits for the next one.
    assert 1 <= len(fsyncs) < writers // 2, log.events
    for path, back in returned.items():
        renamed = log.of("rename", path)[0]
        # Durable when it returns: an fsync of its directory began after its rename and
        # ended before it returned (one that began before the rename need not cover it).
        assert any(renamed < begin and end < back for begin, end in fsyncs), (path, log.events)
        with open(path, "rb") as f:
            assert f.read() == f'{{"n": {os.path.basename(path)[:-5]}}}\n'.encode()
    assert len(returned) == writers
    assert sorted(os.listdir(directory)) == sorted(f"{i}.json" for i in range(writers))


def test_a_failed_directory_fsync_fails_every_writer_it_answered_for(
        tmp_path: Any, monkeypatch: Any) -> None:
    directory = str(tmp_path / "images")
    os.mkdir(directory)
    sync = fileio.dir_sync(directory)
    gate, calls = threading.Event(), []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            calls.append(fd)
            if len(calls) == 1:
                assert gate.wait(30)  # the first runs while the others queue for the next
            elif len(calls) == 2:
                raise OSError(5, "Input/output error")  # EIO: the file system failed
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    results: list[BaseException | None] = []
    lock = threading.Lock()

    def ask() -> None:
        try:
            sync.sync()
            err: BaseException | None = None
        except BaseException as e:
            err = e
        with lock:
            results.append(err)

    first = threading.Thread(target=ask)
    first.start()
    while not calls:
        time.sleep(0.001)
    waiting = [threading.Thread(target=ask) for _ in range(5)]
    for t in waiting:
        t.start()
    time.sleep(0.05)  # all five wait for the second fsync, which one of them runs for all
    gate.set()
    for t in [first, *waiting]:
        t.join(30)
    assert len(calls) == 2
    assert results.count(None) == 1  # the first fsync's writer
    errs = [e for e in results if e is not None]
    assert len(errs) == 5 and all(type(e).__name__ == "RepositoryUnavailable" for e in errs)
    sync.sync()  # the next fsync is a new one, which succeeds
    assert len(calls) == 3


def test_a_deferred_block_renames_in_order_and_waits_for_durability_after_the_lock(
        tmp_path: Any, monkeypatch: Any) -> None:
    journal, images = str(tmp_path / "journal"), str(tmp_path / "images")
    os.mkdir(journal)
    os.mkdir(images)
    gate = threading.Event()
    log = Log(monkeypatch, hold={images: gate})
    lock = threading.Lock()
    done = threading.Event()
    op, img = os.path.join(journal, "op.json"), os.path.join(images, "img.json")

    def commit() -> None:
        with fileio.deferred(), lock:
            fileio.write_bytes(op, b"op\n")
            fileio.write_bytes(img, b"img\n")
        done.set()

    t = threading.Thread(target=commit)
    t.start()
    try:
        assert log.held.setdefault(images, threading.Event()).wait(30)
        # The image's directory fsync is running (held here): the lock is free already, the
        # block has not returned, and the record is in place.
        assert lock.acquire(timeout=10)
        lock.release()
        assert not done.is_set()
        with open(img, "rb") as f:
            assert f.read() == b"img\n"
    finally:
        gate.set()
        t.join(30)
    assert done.is_set()
    # The journal durable before the image was renamed; the block returned after the image's
    # directory fsync ended.
    (j_start, j_end), = log.fsyncs(journal)
    (i_start, i_end), = log.fsyncs(images)
    assert log.of("rename", op)[0] < j_start < j_end < log.of("rename", img)[0] < i_start


@contextlib.contextmanager
def create_held_at(e: conftest.Engine, monkeypatch: Any, directory: str
                   ) -> Iterator[tuple[Log, list[str]]]:
    """A thin create on its own thread, held inside the fsync of ``directory`` until the
    block ends; the block gets the fsync log and the list the create's answer lands in."""
    gate = threading.Event()
    log = Log(monkeypatch, hold={directory: gate})
    made: list[str] = []
    t = threading.Thread(target=lambda: made.append(e.call("createVirtualDisk", "r1", 1 << 30)))
    t.start()
    try:
        assert log.held.setdefault(directory, threading.Event()).wait(30)
        yield log, made
    finally:
        gate.set()
        t.join(30)


def test_a_create_does_not_hold_the_metadata_lock_across_a_directory_fsync(
        tmp_path: Any, monkeypatch: Any) -> None:
    """Sixteen clients' creates queued on the repository's metadata lock, held across every
    fsync of their intent and seal (the throughput fell as clients were added)."""
    e = conftest.Engine(str(tmp_path))
    try:
        repo = e.api.host.connection("r1").repo
        images = os.path.join(repo.root, "images")
        journal = os.path.join(repo.root, "journal")
        with create_held_at(e, monkeypatch, images) as (log, made):
            # The intent's image record is renamed and its directory fsync runs: another
            # writer of the repository may take the lock meanwhile.
            assert repo.meta_lock.acquire(timeout=10)
            repo.meta_lock.release()
            assert not made  # the call returns once its intent is durable, not before
        image_id, = made
        # The journal was durable before the image naming it was renamed into place.
        jpath = [p for _, k, p in log.events if k == "rename" and p.startswith(journal)][0]
        ipath = os.path.join(images, f"{image_id}.json")
        (j_start, j_end), *_ = log.fsyncs(journal)
        assert log.of("rename", jpath)[0] < j_start < j_end < log.of("rename", ipath)[0]
        assert e.settle("r1", image_id)["status"] == "optimized"
    finally:
        e.api.close()


def test_the_journal_of_an_intent_being_committed_is_never_cleaned_away(
        tmp_path: Any, monkeypatch: Any) -> None:
    """A thin create's journal is in place (and being made durable) before its image record,
    outside the metadata lock: a check meanwhile sees a journal no image names, which is what a
    finished operation leaves, and must not offer to clean it."""
    e = conftest.Engine(str(tmp_path))
    try:
        repo = e.api.host.connection("r1").repo
        journal = os.path.join(repo.root, "journal")
        with create_held_at(e, monkeypatch, journal) as (_, made):
            op_ids = [n[:-5] for n in os.listdir(journal) if not n.startswith(".")]
            assert len(op_ids) == 1  # renamed, its directory fsync running
            offered = e.call("checkStorageRepository", "r1")
            assert not [f for f in offered if op_ids[0] in json.dumps(f)], offered
            for fix in offered:
                e.call("fixStorageRepository", "r1", fix)
        image_id, = made
        assert e.settle("r1", image_id)["status"] == "optimized"
    finally:
        e.api.close()
