"""The durable record writer: several records fsync'd at once, published in order, all or none."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import threading
import time
import uuid
from typing import Any

import pytest

from agent import errors, fileio
from agent.image import model
from agent.repo import localfs
from tests import mounts


def _listing(*dirs: str) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(d)) for d in dirs}


def test_records_written_together_land_whole_with_data_made_durable_alongside(
        tmp_path: Any) -> None:
    journal, images = tmp_path / "journal", tmp_path / "images"
    journal.mkdir()
    images.mkdir()
    data = tmp_path / "vol.partial"
    data.write_bytes(b"\x5a" * 65536)
    old = images / "img.json"
    old.write_bytes(b'{"generation": 1}\n')
    fileio.write_many([(str(journal / "op.json"), b'{"op": 1}\n'),
                       (str(old), b'{"generation": 2}\n')], sync_also=[str(data)])
    assert (journal / "op.json").read_bytes() == b'{"op": 1}\n'
    assert old.read_bytes() == b'{"generation": 2}\n'  # replaced, not appended to
    assert data.read_bytes() == b"\x5a" * 65536  # fsync'd, untouched
    assert _listing(str(journal), str(images)) == {str(journal): ["op.json"],
                                                   str(images): ["img.json"]}


def test_a_record_that_cannot_be_written_publishes_none_and_leaves_no_temporary_file(
        tmp_path: Any) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    with pytest.raises(FileNotFoundError):
        fileio.write_many([(str(journal / "op.json"), b"{}\n"),
                           (str(tmp_path / "missing" / "img.json"), b"{}\n")])
    assert os.listdir(journal) == []  # the first record was not renamed into place either


def test_a_data_file_that_is_not_there_publishes_nothing(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError):
        fileio.write_bytes(str(tmp_path / "vol.json"), b"{}\n",
                           sync_also=[str(tmp_path / "vol.qcow2.partial")])
    assert os.listdir(tmp_path) == []


def test_records_on_a_full_file_system_are_no_space_and_change_nothing(tmp_path: Any) -> None:
    with mounts.loop_mount(str(tmp_path), "ext4", 16) as mnt:
        kept = os.path.join(mnt, "kept.json")
        fileio.write_bytes(kept, b'{"v": 1}\n')
        _fill(os.path.join(mnt, "filler"))
        with pytest.raises(errors.NoSpace):
            fileio.write_many([(os.path.join(mnt, "new.json"), b"x" * 65536),
                               (kept, b'{"v": 2}\n' + b" " * 65536)])
        with open(kept, "rb") as f:
            assert f.read() == b'{"v": 1}\n'
        assert sorted(n for n in os.listdir(mnt) if n != "lost+found") == ["filler", "kept.json"]


def _fill(path: str) -> None:
    """Take every free block (MiBs, then single blocks)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    fileio.write_all(fd, b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        os.fsync(fd)
    finally:
        os.close(fd)


class Syscalls:
    """Records, in order and from every thread, the real fsyncs (by the file's path), renames
    and directory fsyncs a write makes; ``fail`` makes the fsync of a file (by path) fail or
    wait first. The calls themselves still happen: this watches the real writer."""

    def __init__(self, monkeypatch: Any) -> None:
        self.events: list[tuple[str, ...]] = []
        self.lock = threading.Lock()
        self.fail: dict[str, Any] = {}  # final record path -> callable run before the fsync
        real_fsync, real_rename, real_dir = os.fsync, os.rename, fileio.fsync_dir

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            for name, hook in self.fail.items():
                if os.path.basename(path).startswith(f".{os.path.basename(name)}") or \
                        path == name:
                    hook(fd, path)
            real_fsync(fd)
            if not os.path.isdir(path):  # directories are fsync_dir's events
                self._add("fsync", path)

        def rename(src: str, dst: str) -> None:
            for name, hook in self.fail.items():
                if dst == name and hook is RENAME_FAILS:
                    raise PermissionError(errno.EACCES, "refused", dst)
            real_rename(src, dst)
            self._add("rename", dst)

        def fsync_dir(path: str) -> None:
            real_dir(path)
            self._add("fsync_dir", path)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(fileio, "fsync_dir", fsync_dir)

    def _add(self, *event: str) -> None:
        with self.lock:
            self.events.append(event)


def RENAME_FAILS(fd: int, path: str) -> None:  # noqa: N802 - a marker, not a hook to call
    """Marks a record whose rename (not its fsync) fails."""


def _dirs(tmp_path: Any) -> tuple[str, str]:
    journal, images = str(tmp_path / "journal"), str(tmp_path / "images")
    os.mkdir(journal)
    os.mkdir(images)
    return journal, images


def test_every_file_is_fsynced_before_any_rename_and_each_directory_before_the_next(
        tmp_path: Any, monkeypatch: Any) -> None:
    journal, images = _dirs(tmp_path)
    data = str(tmp_path / "vol.partial")
    with open(data, "wb") as f:
        f.write(b"\x5a" * 4096)
    calls = Syscalls(monkeypatch)
    op, img = os.path.join(journal, "op.json"), os.path.join(images, "img.json")
    fileio.write_many([(op, b"{}\n"), (img, b"{}\n")], sync_also=[data])
    # The three fsyncs run at once, in any order, and all end before the first rename.
    first = sorted(calls.events[:3])
    assert [kind for kind, _ in first] == ["fsync"] * 3, calls.events
    names = sorted(os.path.basename(path).split(fileio.TMP_MARK)[0] for _, path in first)
    assert names == [".img.json", ".op.json", "vol.partial"], calls.events
    assert calls.events[3:] == [("rename", op), ("fsync_dir", journal),
                                ("rename", img), ("fsync_dir", images)]


def test_a_failed_fsync_waits_for_the_others_and_publishes_nothing(
        tmp_path: Any, monkeypatch: Any) -> None:
    journal, images = _dirs(tmp_path)
    paths = [os.path.join(journal, "op.json"), os.path.join(images, "a.json"),
             os.path.join(images, "b.json")]
    calls = Syscalls(monkeypatch)
    still_open: list[bool] = []

    def eio(fd: int, path: str) -> None:
        raise OSError(errno.EIO, "I/O error")

    def slow(fd: int, path: str) -> None:
        time.sleep(0.05)  # outlasts the failure: its fd must still be the file it was
        still_open.append(os.readlink(f"/proc/self/fd/{fd}") == path)

    calls.fail = {paths[1]: eio, paths[2]: slow}
    # An I/O error is the clear RepositoryUnavailable, naming the file, caused by the EIO.
    with pytest.raises(errors.RepositoryUnavailable) as raised:
        fileio.write_many([(p, b"{}\n") for p in paths])
    cause = raised.value.__cause__
    assert isinstance(cause, OSError)
    assert cause.errno == errno.EIO and cause.filename == paths[1]
    assert raised.value.data == {"path": paths[1], "errno": "EIO"}
    assert still_open == [True]
    assert not [e for e in calls.events if e[0] == "rename"]
    assert os.listdir(journal) == [] and os.listdir(images) == []


def test_a_rename_that_fails_keeps_the_records_before_it_and_no_temporary_file(
        tmp_path: Any, monkeypatch: Any) -> None:
    journal, images = _dirs(tmp_path)
    op, img = os.path.join(journal, "op.json"), os.path.join(images, "img.json")
    with open(img, "wb") as f:
        f.write(b"old\n")
    calls = Syscalls(monkeypatch)
    calls.fail = {img: RENAME_FAILS}
    with pytest.raises(PermissionError):
        fileio.write_many([(op, b"op\n"), (img, b"new\n")])
    with open(op, "rb") as f:
        assert f.read() == b"op\n"  # published and durable before the image was tried
    with open(img, "rb") as f:
        assert f.read() == b"old\n"
    assert os.listdir(journal) == ["op.json"] and os.listdir(images) == ["img.json"]


def test_records_are_still_written_once_no_thread_can_start(
        tmp_path: Any, monkeypatch: Any) -> None:
    journal, images = _dirs(tmp_path)
    closed = concurrent.futures.ThreadPoolExecutor(1)
    closed.shutdown()  # as at interpreter exit: submit raises RuntimeError
    monkeypatch.setattr(fileio, "_pool_for", lambda device: closed)
    calls = Syscalls(monkeypatch)
    op, img = os.path.join(journal, "op.json"), os.path.join(images, "img.json")
    fileio.write_many([(op, b"op\n"), (img, b"img\n")])
    assert len([e for e in calls.events if e[0] == "fsync"]) == 2
    with open(img, "rb") as f:
        assert f.read() == b"img\n"


def test_records_written_together_in_different_directories_must_fsync_them(
        tmp_path: Any) -> None:
    journal, images = _dirs(tmp_path)
    with pytest.raises(ValueError):
        fileio.write_many([(os.path.join(journal, "a"), b""), (os.path.join(images, "b"), b"")],
                          sync_dir=False)
    assert os.listdir(journal) == [] and os.listdir(images) == []


def test_an_intent_publishes_its_journal_before_its_image_and_a_volume_its_data_first(
        tmp_path: Any, monkeypatch: Any) -> None:
    params = {"path": str(tmp_path / "repo")}
    localfs.LocalRepository.format(params, {}, str(tmp_path / "run"))
    repo = localfs.LocalRepository.open(params, str(tmp_path / "run"))
    try:
        vol = model.Volume(str(uuid.uuid4()), model.VolumeFormat.QCOW2, size=1 << 20)
        img = model.Image(str(uuid.uuid4()), model.Kind.DISK, 1 << 20, vol.id)
        op = model.Operation(str(uuid.uuid4()), model.OpKind.CREATE_DISK, img.id,
                             model.OpParams(size=1 << 20, volume_id=vol.id))
        img.operation_id = op.id
        partial = repo.volume_partial_path(vol.id, vol.format)
        with open(partial, "wb") as f:
            f.write(b"QFI\xfb")
        calls = Syscalls(monkeypatch)
        repo.put_intent(op, img)
        repo.put_volume(vol, sync_dir=False, data=partial)
        published = [e[1] for e in calls.events if e[0] == "rename"]
        assert published == [os.path.join(repo.root, "journal", f"{op.id}.json"),
                             os.path.join(repo.root, "images", f"{img.id}.json"),
                             os.path.join(repo.root, "volumes", f"{vol.id}.json")]
        data_synced = calls.events.index(("fsync", partial))
        assert data_synced < calls.events.index(("rename", published[2]))
        assert repo.get_operation(op.id) == op and repo.get_volume(vol.id) == vol
        stored = repo.get_image(img.id)
        assert stored is not None and stored.operation_id == op.id and stored.generation == 1
    finally:
        repo.close()
