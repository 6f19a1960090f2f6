"""The empty qcow2 images Strata writes itself are the very bytes the installed qemu-img writes."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from agent import errors, qcow2

GiB = 1 << 30
TiB = 1 << 40

SIZES = [512, 1 << 20, 5 * GiB + 512, GiB, TiB, 64 * TiB, 2048 * TiB]
BACKINGS = ["none", "relative qcow2", "raw", "1023-byte absolute path"]


def _backing(images: Any, kind: str) -> tuple[str | None, str | None]:
    """A backing reference of the given kind, relative to directory ``images``, with a real
    file behind it (both writers refuse a backing file they cannot open)."""
    if kind == "none":
        return None, None
    if kind == "relative qcow2":
        base = str(images.parent / "base.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(GiB)], check=True)
        return "../base.qcow2", "qcow2"
    if kind == "raw":
        (images / "base.raw").write_bytes(b"\0" * 4096)
        return "base.raw", "raw"
    # The longest name qemu takes, through directories (a file name is at most 255 bytes).
    path = str(images.parent / "long")
    while len(path) < 1023 - 201:
        path += "/" + "d" * 200
    os.makedirs(path)
    path += "/" + "f" * (1023 - len(path) - 1)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(GiB)], check=True)
    assert len(path.encode()) == 1023
    return path, "qcow2"


def _qemu_img_create(path: str, size: int, backing: str | None, fmt: str | None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1,lazy_refcounts=off"]
    if backing is not None:
        argv += ["-b", backing, "-F", fmt or "qcow2"]
    subprocess.run([*argv, path, str(size)], check=True)


def _data_ranges(path: str) -> list[tuple[int, int]]:
    """Where the file has data (SEEK_DATA/SEEK_HOLE), in file-system blocks."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past pos
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", BACKINGS)
def test_bytes_equal_qemu_img(tmp_path: Any, size: int, kind: str) -> None:
    images = tmp_path / "images"
    images.mkdir()
    backing, fmt = _backing(images, kind)
    ours, theirs = str(images / "ours.qcow2"), str(images / "theirs.qcow2")
    qcow2.create(ours, size, backing, fmt)
    _qemu_img_create(theirs, size, backing, fmt)
    assert _read(ours) == _read(theirs)
    # The same ranges are allocated, too: the L1 table is written, not left a hole. (Compared
    # as data ranges, not st_blocks, which also counts the file system's own extent-tree
    # blocks: ext4 gave one more 4 KiB block to one of two identical 32 MiB files, once.)
    assert _data_ranges(ours) == _data_ranges(theirs)


@pytest.mark.parametrize(("backing", "content", "error"), [
    ("missing.qcow2", None, "cannot open backing file"),
    ("raw-data.bin", b"guest data, not qcow2", "is not a qcow2 image"),
])
def test_refuses_a_backing_file_it_cannot_use(tmp_path: Any, backing: str,
                                               content: bytes | None, error: str) -> None:
    if content is not None:
        (tmp_path / backing).write_bytes(content)
    path = tmp_path / "top.qcow2"
    with pytest.raises(errors.ImageBroken, match=error):
        qcow2.create(str(path), GiB, backing, "qcow2")
    assert not path.exists()


def test_an_image_qemu_uses(tmp_path: Any) -> None:
    """qemu opens, checks, writes and reads through an overlay Strata wrote, and the header
    reader reads it back."""
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(GiB)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", base], check=True,
                   stdout=subprocess.DEVNULL)
    qcow2.create(top, 2 * GiB, "base.qcow2", "qcow2")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 1M 1M", top], check=True,
                   stdout=subprocess.DEVNULL)
    for offset, pattern in ((0, 0x5A), (1 << 20, 0xA5), (GiB + (1 << 20), 0)):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P {pattern} {offset} 1M", top],
                       check=True, stdout=subprocess.DEVNULL)
    check = subprocess.run(["qemu-img", "check", "--output=json", top], capture_output=True,
                           check=True)
    report = json.loads(check.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", top],
                                     capture_output=True, check=True).stdout)
    assert info["virtual-size"] == 2 * GiB
    assert info["backing-filename-format"] == "qcow2"
    header = qcow2.read_header(top)
    assert header == qcow2.Header(3, 2 * GiB, "base.qcow2", "qcow2")


@pytest.mark.parametrize(("size", "backing"), [
    (0, None), (1000, None), (-512, None), (2048 * TiB + 512, None), (GiB, ""), (GiB, "x" * 1024),
])
def test_bad_input_writes_nothing(tmp_path: Any, size: int, backing: str | None) -> None:
    path = tmp_path / "bad.qcow2"
    with pytest.raises(errors.InvalidArgument):
        qcow2.create(str(path), size, backing, "qcow2")
    assert not path.exists()
