"""Durable small-file writes: every metadata change in Strata goes through ``write_many``.

A metadata write is: write a temporary file beside the target, fsync it, rename it over the target,
fsync the directory (records written together are fsync'd at once, then renamed in order). A
crash leaves either the old or the new content, plus at most a temporary file (named
``.<name>.tmp-<random>``) that the checker reports for cleaning.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import json
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

from agent import errors

TMP_MARK = ".tmp-"
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def fsync_dir(path: str) -> None:
    _fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


def _fsync_path(path: str, flags: int) -> None:
    try:
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise_unavailable(path, e)
        raise


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n"


def write_json(path: str, obj: Any, sync_dir: bool = True, sync_also: Sequence[str] = (),
               still: Callable[[], None] | None = None) -> None:
    write_bytes(path, encode_json(obj), sync_dir, sync_also, still)


def write_bytes(path: str, data: bytes, sync_dir: bool = True,
                sync_also: Sequence[str] = (), still: Callable[[], None] | None = None) -> None:
    """``sync_dir=False`` leaves the directory fsync to the caller, who batches it with other
    renames in the same directory. ``sync_also``: files (a volume's new data) made durable
    together with this record, before it is renamed into place."""
    write_many([(path, data)], sync_dir, sync_also, still)


def write_many(records: Sequence[tuple[str, bytes]], sync_dir: bool = True,
               sync_also: Sequence[str] = (), still: Callable[[], None] | None = None) -> None:
    """Write several records durably, in order: all are written to temporary files and fsync'd
    together, then each is renamed into place and its directory fsync'd before the next rename,
    so a crash can keep a later record only with every earlier one. Nothing is renamed unless
    every record (and ``sync_also``) was written and fsync'd; temporary files go on failure. A
    rename that fails leaves the records before it in place (as separate writes would have).
    ``still``, called just before the first rename, raises when the write must not land after
    all: the repository was disconnected while the write waited on a frozen file system."""
    if not sync_dir and len(records) > 1:
        raise ValueError("records are durable in order only when each directory is fsync'd")
    staged: list[tuple[str, str]] = []
    files: list[tuple[int, str]] = []
    try:
        try:
            for path in sync_also:
                files.append((os.open(path, os.O_RDONLY), path))
            for path, data in records:
                directory, name = os.path.split(path)
                tmp = os.path.join(directory, f".{name}{TMP_MARK}{secrets.token_hex(4)}")
                files.append((os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640), path))
                staged.append((tmp, path))
                write_all(files[-1][0], data)
            fsync_together(files)
        finally:
            for fd, _ in files:
                with contextlib.suppress(OSError):  # fsync'd or failing anyway: nothing to lose
                    os.close(fd)
        if still is not None:
            still()
        for tmp, path in staged:
            os.rename(tmp, path)
            if sync_dir:
                fsync_dir(os.path.dirname(path))
    except BaseException as e:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):  # gone (renamed) or unremovable: keep e
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise_no_space(e.filename or (staged[-1][1] if staged else records[0][0]), e)
        raise


def fsync_together(files: Sequence[tuple[int, str]]) -> None:
    """fsync several open files (fd, the path to name in an error) at once. Concurrent fsyncs
    on one file system share a journal commit (ext4's jbd2, XFS's log force), so two cost
    little more than one: 0.87 -> 0.59 ms for two small new files on an XFS loop mount here,
    0.41 -> 0.30 ms on ext4. Returns, or raises the first failure, only once every fsync has
    ended: the caller closes the fds next."""
    if not files:
        return
    first, rest = files[0], list(files[1:])
    others: list[concurrent.futures.Future[None]] = []
    if rest:
        pool = _pool_for(os.fstat(first[0]).st_dev)
        try:
            while rest:
                others.append(pool.submit(_fsync, *rest[0]))
                rest.pop(0)
        except RuntimeError:
            pass  # the interpreter is exiting and starts no thread: the rest one at a time here
    try:
        for fd, path in [first, *rest]:
            _fsync(fd, path)
    finally:
        concurrent.futures.wait(others)
    for f in others:
        f.result()


def _fsync(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        e.filename = e.filename or path
        raise


# One pool per file system: a file system whose fsyncs hang (a failing disk) holds only its
# own threads, never another repository's writes.
_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool_for(device: int) -> concurrent.futures.ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(device)
        if pool is None:
            pool = _pools[device] = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix=f"fsync-{device}")
        return pool


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
    """Out of space or quota writing ``path`` is the NoSpace a client can act on; a failed
    file system is RepositoryUnavailable (see ``raise_unavailable``)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise errors.NoSpace(f"no space to write {path}: {e.strerror}") from e
    raise_unavailable(path, e)


# What a failed file system answers, as opposed to a missing file or a bad request: an I/O
# error (a dying disk, XFS shut down), read-only (remounted so, or ext4's errors=remount-ro),
# corruption the file system found (EUCLEAN), a lost NFS handle, a FUSE daemon gone.
FAILED_ERRNOS = frozenset({errno.EIO, errno.EROFS, errno.EUCLEAN, errno.ESTALE, errno.ENOTCONN})


def unavailable(path: str, e: OSError) -> errors.RepositoryUnavailable | None:
    """The clear error for ``e`` when it says the file system of ``path`` failed, else None."""
    if e.errno not in FAILED_ERRNOS:
        return None
    code = errno.errorcode.get(e.errno or 0, str(e.errno))
    return errors.RepositoryUnavailable(
        f"the file system of {path} failed: {e.strerror} ({code}); calls about this "
        "repository fail until it is repaired (or disconnected with options.force)",
        path=path, errno=code,
    )


def raise_unavailable(path: str, e: OSError) -> None:
    err = unavailable(e.filename if isinstance(e.filename, str) else path, e)
    if err is not None:
        raise err from e


def read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise_unavailable(path, e)
        raise
    return json.loads(data)


def remove(path: str, durable: bool = True) -> bool:
    """Remove a file (durably, unless told the removal may be lost in a crash); return False
    when it was already gone (idempotent)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise_unavailable(path, e)
        raise
    if durable:
        fsync_dir(os.path.dirname(path))
    return True


def fsync_file(path: str) -> None:
    _fsync_path(path, os.O_RDONLY)


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


def allocated_bytes(path: str) -> int:
    try:
        return os.lstat(path).st_blocks * 512  # a planted symlink is never followed
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
