"""Durable small-file writes: every metadata change in Strata goes through ``write_json``.

A metadata write is: write a temporary file beside the target, fsync it, rename it over the target,
fsync the directory. A crash leaves either the old or the new content, plus at most a temporary file
(named ``.<name>.tmp-<random>``) that the checker reports for cleaning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
from typing import Any

from agent import errors

TMP_MARK = ".tmp-"
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj: Any, sync_dir: bool = True) -> None:
    data = json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n"
    write_bytes(path, data, sync_dir)


def write_bytes(path: str, data: bytes, sync_dir: bool = True) -> None:
    """``sync_dir=False`` leaves the directory fsync to the caller, who batches it with other
    renames in the same directory."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}{TMP_MARK}{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, path)
        if sync_dir:
            fsync_dir(directory)
    except OSError as e:
        raise_no_space(path, e)
        raise


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_file(path: str, data: bytes | bytearray, mode: int = 0o644) -> None:
    """Create or truncate ``path`` and write ``data`` into it, not durably (the caller fsyncs
    it, or renames it into place after an fsync)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
    except OSError as e:
        raise_no_space(path, e)
        raise


def raise_no_space(path: str, e: OSError) -> None:
    """Out of space or quota writing ``path`` is the NoSpace a client can act on."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise errors.NoSpace(f"no space to write {path}: {e.strerror}") from e


def read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def remove(path: str, durable: bool = True) -> bool:
    """Remove a file (durably, unless told the removal may be lost in a crash); return False
    when it was already gone (idempotent)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    if durable:
        fsync_dir(os.path.dirname(path))
    return True


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


def allocated_bytes(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def clone(src: str, dst: str) -> None:
    """Make ``dst`` (created or truncated) share ``src``'s blocks: a reflink (XFS with reflink,
    btrfs), metadata only, in one ioctl. OSError where the file system cannot (EOPNOTSUPP,
    EXDEV, EINVAL); the caller copies instead."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # as qemu-img makes files
    try:
        with open(src, "rb") as a:
            fcntl.ioctl(fd, _FICLONE, a.fileno())
    finally:
        os.close(fd)
