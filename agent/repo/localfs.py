"""``localfs-1.0``: a repository in a local directory.

On-disk layout (everything a host needs to resume any operation is here)::

    ROOT/repository.json          format, uuid, version
    ROOT/lock                     fcntl lock held by the one agent using the repository
    ROOT/images/<imageId>.json    image records
    ROOT/volumes/<volId>.<fmt>    volume data; qcow2 backing files are bare names in this directory
    ROOT/volumes/<volId>.json     volume records
    ROOT/journal/<opId>.json      operations not yet finished

Writers hold ``meta_lock`` (a process-local lock) for each read-modify-write of a record; the
fcntl lock on ``ROOT/lock`` keeps a second agent out of the whole repository, as VDSM does for
local storage domains. A local repository needs no sanlock daemon.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from agent import errors, fileio
from agent.image import model

IMAGES = "images"
VOLUMES = "volumes"
JOURNAL = "journal"
PARTIAL = ".partial"

R = TypeVar("R")



class LocalRepository:
    FORMAT = "localfs-1.0"
    VERSION = 1
    CAPABILITIES = ("thin", "snapshot", "copy", "merge")
    # Reading a few small records of a local file system takes microseconds from the page
    # cache, so a status poll may run on the RPC event loop itself (see Api.runs_inline). A
    # shared-storage driver, whose reads can hang on a lost server, must say False.
    INLINE_READS = True

    def __init__(self, root: str, repo_uuid: str) -> None:
        self.root = root
        self.uuid = repo_uuid
        self.meta_lock = threading.RLock()
        self.direct_io = True
        self.reflink = False
        self._lock_fd: int | None = None
        # Set by close (a disconnect, forced or not): a call still in flight, stuck on the
        # file system when it was disconnected, finds it closed when it wakes and stops there,
        # as a crash would have stopped it, instead of writing to a repository nobody serves.
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def parse_parameters(params: dict[str, Any]) -> str:
        path = params.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise errors.InvalidArgument(
                "connectionParameters.path must be an absolute directory path", param="path"
            )
        return os.path.normpath(path)

    @classmethod
    def format(cls, params: dict[str, Any]) -> str:
        root = cls.parse_parameters(params)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise errors.InvalidArgument(f"cannot create {root}: {e.strerror}") from e
        # A format interrupted before repository.json was written left only empty
        # subdirectories: formatting again finishes it. Anything else is someone's data.
        ours = (IMAGES, VOLUMES, JOURNAL)
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name not in ours or not os.path.isdir(path) or os.listdir(path):
                raise errors.RepositoryNotEmpty(
                    f"{root} is not empty; formatting needs an empty directory", path=root
                )
        for sub in ours:
            os.makedirs(os.path.join(root, sub), 0o750, exist_ok=True)
        repo_uuid = str(uuid.uuid4())
        # repository.json is written last: a directory without it is not a repository.
        fileio.write_json(
            os.path.join(root, "repository.json"),
            {"format": cls.FORMAT, "uuid": repo_uuid, "version": cls.VERSION},
        )
        return repo_uuid

    @classmethod
    def open(cls, params: dict[str, Any]) -> LocalRepository:
        root = cls.parse_parameters(params)
        try:
            meta = fileio.read_json(os.path.join(root, "repository.json"))
        except FileNotFoundError:
            raise errors.RepositoryNotFormatted(f"{root} is not a formatted repository") from None
        except (OSError, ValueError) as e:
            raise errors.RepositoryNotFormatted(f"{root}/repository.json unreadable: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != cls.FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise errors.UnsupportedFormat(f"{root} has format {found!r}, not {cls.FORMAT}")
        missing = [sub for sub in (IMAGES, VOLUMES, JOURNAL)
                   if not os.path.isdir(os.path.join(root, sub))]
        if not isinstance(meta.get("uuid"), str) or missing:
            raise errors.RepositoryNotFormatted(
                f"{root} is damaged: "
                + (f"missing {', '.join(missing)}" if missing else "repository.json has no uuid")
            )
        repo = cls(root, meta["uuid"])
        repo._take_lock()
        repo.direct_io = repo._probe_direct_io()
        repo.reflink = repo._probe_reflink()
        return repo

    def capabilities(self) -> list[str]:
        """What this repository can do, as measured on its file system when it was opened."""
        extra = [name for name, has in (("reflink", self.reflink), ("direct-io", self.direct_io))
                 if has]
        return [*self.CAPABILITIES, *extra]

    def _probe_reflink(self) -> bool:
        """Whether the file system clones files (XFS with reflink, btrfs): FICLONE on two
        scratch files. Performance-strategy disks are then clones, not copies."""
        base = os.path.join(self.root, VOLUMES, f".reflink{fileio.TMP_MARK}probe")
        src, dst = base + "-a", base + "-b"
        try:
            with open(src, "wb") as a:
                a.write(b"\0" * 4096)
            fileio.clone(src, dst)
            return True
        except OSError:
            return False
        finally:
            for path in (src, dst):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def _probe_direct_io(self) -> bool:
        """Whether the file system takes O_DIRECT (tmpfs does not); copies bypass the page
        cache where they can."""
        probe = os.path.join(self.root, VOLUMES, f".direct-io{fileio.TMP_MARK}probe")
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        except OSError:
            return False
        os.close(fd)
        os.unlink(probe)
        return True

    def _take_lock(self) -> None:
        # Read-only: flock needs no write access, and a file open for writing would keep the
        # administrator from remounting a failing file system read-only (EBUSY).
        fd = os.open(os.path.join(self.root, "lock"),
                     os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise errors.RepositoryLocked(
                    f"{self.root} is in use by another agent on this host"
                ) from None
            raise
        self._lock_fd = fd

    def close(self) -> None:
        """Let the repository go: the lock file is the one descriptor the agent keeps open
        there (every other is closed by the call that opened it), so once calls stuck in the
        file system drain, nothing of the agent's holds the mount (``umount -l`` at once)."""
        self.closed = True
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):  # EIO from a failed file system: it is closed
                os.close(self._lock_fd)
            self._lock_fd = None

    def _check_open(self) -> None:
        if self.closed:
            raise errors.RepositoryNotConnected(
                f"the repository at {self.root} was disconnected while this call ran",
                path=self.root,
            )

    def _failed(self, path: str, e: OSError) -> None:
        fileio.raise_unavailable(path, e)

    # -- space -------------------------------------------------------------------------------

    def capacity(self) -> tuple[int, int]:
        try:
            st = os.statvfs(self.root)
        except OSError as e:
            self._failed(self.root, e)
            raise
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    # -- paths -------------------------------------------------------------------------------

    def _path(self, sub: str, name: str) -> str:
        return os.path.join(self.root, sub, name)

    def volume_path(self, vol_id: str, fmt: model.VolumeFormat) -> str:
        return self._path(VOLUMES, f"{vol_id}.{fmt.value}")

    def volume_partial_path(self, vol_id: str, fmt: model.VolumeFormat) -> str:
        return self.volume_path(vol_id, fmt) + PARTIAL

    @staticmethod
    def backing_reference(vol_id: str, fmt: model.VolumeFormat) -> str:
        """How a qcow2 names its backing volume: a bare name, resolved from its own directory."""
        return f"{vol_id}.{fmt.value}"

    # -- records -----------------------------------------------------------------------------
    # Three kinds, one shape: ``<sub>/<id>.json`` holding a model record's dict.

    def _record_path(self, sub: str, rec_id: str) -> str:
        return self._path(sub, f"{rec_id}.json")

    def _get(self, sub: str, rec_id: str, parse: Callable[[dict[str, Any]], R]) -> R | None:
        self._check_open()
        try:
            return parse(fileio.read_json(self._record_path(sub, rec_id)))
        except FileNotFoundError:
            return None

    def _all(self, sub: str, parse: Callable[[dict[str, Any]], R]) -> list[R]:
        out = []
        for name in self._names(sub):
            if name.endswith(".json") and not name.startswith("."):
                rec = self._get(sub, name[: -len(".json")], parse)
                if rec is not None:  # removed since the scan: fine
                    out.append(rec)
        return out

    def _names(self, sub: str) -> list[str]:
        """The entries of one of the repository's directories."""
        self._check_open()
        directory = os.path.join(self.root, sub)
        try:
            with os.scandir(directory) as it:
                return [entry.name for entry in it]
        except OSError as e:
            self._failed(directory, e)
            raise

    def get_image(self, image_id: str) -> model.Image | None:
        return self._get(IMAGES, image_id, model.Image.from_dict)

    def put_image(self, image: model.Image) -> None:
        self._check_open()
        fileio.write_many([self._image_record(image)], still=self._check_open)

    def _image_record(self, image: model.Image) -> tuple[str, bytes]:
        image.generation += 1  # every write is a new generation: fixes made before are stale
        return self._record_path(IMAGES, image.id), fileio.encode_json(image.to_dict())

    def put_intent(self, op: model.Operation, image: model.Image) -> None:
        """A new operation's journal and the image record naming it, both fsync'd at once and
        durable in that order: a journal without its image is a finished-nothing the checker
        cleans; an image naming a journal that is not there could never be resumed."""
        self._check_open()
        fileio.write_many([(self._record_path(JOURNAL, op.id), fileio.encode_json(op.to_dict())),
                           self._image_record(image)], still=self._check_open)

    def delete_image(self, image_id: str) -> None:
        self._check_open()
        fileio.remove(self._record_path(IMAGES, image_id))

    def images(self) -> list[model.Image]:
        return self._all(IMAGES, model.Image.from_dict)

    def get_volume(self, vol_id: str) -> model.Volume | None:
        return self._get(VOLUMES, vol_id, model.Volume.from_dict)

    def put_volume(self, vol: model.Volume, sync_dir: bool = True,
                   data: str | None = None) -> None:
        """``data``: the volume's new data file, made durable together with the record."""
        self._check_open()
        fileio.write_json(self._record_path(VOLUMES, vol.id), vol.to_dict(), sync_dir,
                          () if data is None else (data,), self._check_open)

    def delete_volume_data(self, vol: model.Volume) -> None:
        """Data first, record last (``delete_volume_record``): a record whose data is gone
        is still found and finished by the next clean."""
        self._check_open()
        fileio.remove(self.volume_partial_path(vol.id, vol.format))
        fileio.remove(self.volume_path(vol.id, vol.format))

    def delete_volume_record(self, vol: model.Volume) -> None:
        self._check_open()
        fileio.remove(self._record_path(VOLUMES, vol.id))

    def volumes(self) -> list[model.Volume]:
        return self._all(VOLUMES, model.Volume.from_dict)

    def get_operation(self, op_id: str) -> model.Operation | None:
        return self._get(JOURNAL, op_id, model.Operation.from_dict)

    def put_operation(self, op: model.Operation) -> None:
        self._check_open()
        fileio.write_json(self._record_path(JOURNAL, op.id), op.to_dict(),
                          still=self._check_open)

    def delete_operation(self, op_id: str, durable: bool = True) -> None:
        """``durable=False`` for a finished operation: a journal that comes back after a crash
        names an image that no longer waits for it, and clean removes it."""
        self._check_open()
        fileio.remove(self._record_path(JOURNAL, op_id), durable)

    def operations(self) -> list[model.Operation]:
        return self._all(JOURNAL, model.Operation.from_dict)

    def stray_files(self) -> list[str]:
        """Files that are neither records nor volume data: leftover temporary and partial files."""
        out = []
        for sub in (IMAGES, VOLUMES, JOURNAL):
            for name in self._names(sub):
                if fileio.is_temporary(name) or name.endswith(PARTIAL):
                    out.append(self._path(sub, name))
        return out

    def volume_files(self) -> dict[str, str]:
        """Volume data files by volume id, whether or not a record names them."""
        out = {}
        for name in self._names(VOLUMES):
            stem, _, ext = name.partition(".")
            if ext in ("qcow2", "raw"):
                out[stem] = self._path(VOLUMES, name)
        return out
