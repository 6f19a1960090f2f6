"""The durable record writer: several records fsync'd at once, published in order, all or none."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from agent import errors, fileio
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
