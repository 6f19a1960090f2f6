"""``localfs-1.0``: a repository in a local directory, in the layout of ``agent.repo.layout``
(plus ``ROOT/lock``, the fcntl lock held by the one agent using the repository).

Writers hold ``meta_lock`` (a process-local lock) for each read-modify-write of a record; the
fcntl lock on ``ROOT/lock`` keeps a second agent out of the whole repository, as VDSM does for
local storage domains. A local repository needs no sanlock daemon.

Everything read from disk is untrusted (DESIGN.md, "Ownership: one claim model"): a record is
read only as a regular file (never through a symlink), only under a name that is a bare UUID,
and its content must be a record of its kind whose ``id`` is that name; paths are made from the
validated id alone. Anything else is a ``layout.Damage`` naming the file: listings skip it and
say so, the checker reports it, clean deletes nothing it might need.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from agent import errors, fileio
from agent.image import journals, model
from agent.repo import contract, layout, recordcache

if TYPE_CHECKING:
    from agent.repo import lockspace

R = TypeVar("R")
log = logging.getLogger(__name__)

# Far larger than any record the agent writes (user data included): a bigger "record" is planted.
MAX_RECORD = 16 << 20
# Reads of a record again after ESTALE (a rename-over met on a shared file system; see _read).
ESTALE_RETRIES = 5


class _Damaged(Exception):
    def __init__(self, damage: layout.Damage) -> None:
        super().__init__(damage.message)
        self.damage = damage


def lock(path: str, what: str) -> int:
    """The fcntl lock that keeps a second agent of this host away from ``what``: its fd."""
    # Read-only: flock needs no write access, and a file open for writing would keep the
    # administrator from remounting a failing file system read-only (EBUSY).
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise errors.RepositoryLocked(
                f"{what} is in use by another agent on this host") from None
        raise
    return fd


def _checked(rec_id: str) -> str:
    """An id that is about to become a path: a bug if it is not a bare UUID (every id read
    from disk was validated on the way in)."""
    if not model.is_id(rec_id):
        raise ValueError(f"not a bare UUID: {rec_id!r}")
    return rec_id


class LocalRepository(contract.Repository):
    FORMAT = "localfs-1.0"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["path"],
        "additionalProperties": False,
        "properties": {
            "path": {"type": "string", "pattern": "^/", "maxLength": 4000,
                     "description": "the repository's directory, an absolute path"},
        },
    }
    CAPABILITIES: ClassVar[tuple[contract.Capability, ...]] = (
        contract.Capability.THIN, contract.Capability.SNAPSHOT, contract.Capability.COPY,
        contract.Capability.MERGE)
    # Reading a few small records of a local file system takes microseconds from the page
    # cache, so a status poll may run on the RPC event loop itself (see Api.runs_inline). A
    # shared-storage driver, whose reads can hang on a lost server, must say False.
    INLINE_READS = True
    # Whether several hosts mount it (then it has a lockspace, and claims are leases too), and
    # sanlock's io_timeout there (seconds, recorded at format so every host uses the same).
    shared = False
    io_timeout = 0

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
        self._warned: set[str] = set()
        self._records = recordcache.RecordCache()
        self._records.refresh = self._revalidate
        self._scanning: dict[str, threading.Lock] = {}
        # Volume id -> what the last deep check found wrong with it (corruption, unreadable):
        # until a deep check finds it sound again, its images are broken.
        self.findings: dict[str, str] = {}
        # This host in the repository's lockspace: shared formats only (a local repository
        # is kept to one agent by its fcntl lock and needs no sanlock daemon).
        self.membership: lockspace.Membership | None = None
        # Which journals name which image (agent/image/journals.py): told of every journal
        # this process writes; none on a shared repository, where other hosts write too.
        self.journal_index: journals.Index | None = None if self.shared else journals.Index()

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def location(cls, params: dict[str, Any], run_dir: str) -> str:
        cls.check_parameters(params)
        return str(os.path.normpath(params["path"]))

    @classmethod
    def format(cls, params: dict[str, Any], options: dict[str, Any], run_dir: str,
               connected: tuple[str, ...] = ()) -> str:
        """``connected``: the roots of the connected repositories, which the new one may
        neither be inside of nor contain."""
        root = cls.location(params, run_dir)
        if options.get("ioTimeout") is not None:
            # sanlock's io_timeout: a local repository has no leases, so no value could mean
            # anything here; taking it silently would let an admin believe it was recorded.
            raise errors.InvalidArgument(
                f"options.ioTimeout is for the shared formats (their sanlock leases); "
                f"{cls.FORMAT} has no leases", param="options.ioTimeout")
        cls._not_nested(root, connected)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise errors.InvalidArgument(f"cannot create {root}: {e.strerror}") from e
        return cls._format_root(root, {})

    @classmethod
    def _format_root(cls, root: str, extra: dict[str, Any]) -> str:
        """Lay the repository out in the existing directory ``root``; ``extra``: more fields
        of repository.json (a shared format's ioTimeout)."""
        # A format interrupted before repository.json was written left only empty
        # subdirectories: formatting again finishes it. Anything else is someone's data.
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name not in layout.AREAS or not os.path.isdir(path) or os.listdir(path):
                if name == layout.META:
                    raise errors.RepositoryNotEmpty(
                        f"{root} is already a formatted repository", path=root)
                raise errors.RepositoryNotEmpty(
                    f"{root} is not empty; formatting needs an empty directory", path=root
                )
        for sub in layout.AREAS:
            os.makedirs(os.path.join(root, sub), 0o750, exist_ok=True)
        repo_uuid = str(uuid.uuid4())
        meta = {"format": cls.FORMAT, "uuid": repo_uuid, "version": cls.VERSION, **extra}
        cls._before_meta(root, meta)
        # repository.json is written last: a directory without it is not a repository.
        fileio.write_json(os.path.join(root, layout.META), meta)
        return repo_uuid

    @classmethod
    def _before_meta(cls, root: str, meta: dict[str, Any]) -> None:
        """What a format writes once the directories exist and before repository.json: a
        local repository, nothing."""

    @staticmethod
    def _not_nested(root: str, connected: tuple[str, ...]) -> None:
        """A repository inside another (or under its own directories) would have its files
        taken for the other's planted files, and clean of one could delete the other's."""
        real = os.path.realpath(root)
        for other in connected:
            for a, b in ((root, other), (real, os.path.realpath(other))):
                # The very same path is not empty: RepositoryNotEmpty says so below.
                if a != b and os.path.commonpath([a, b]) in (a, b):
                    raise errors.InvalidArgument(
                        f"connectionParameters.path {root} is inside, or contains, the "
                        f"connected repository at {other}", param="path")
        for path in {root, real}:
            parent = os.path.dirname(path)
            while True:
                if os.path.lexists(os.path.join(parent, layout.META)):
                    raise errors.InvalidArgument(
                        f"connectionParameters.path {root} is inside the repository at "
                        f"{parent}; a repository cannot hold another", param="path")
                if parent == os.path.dirname(parent):
                    break
                parent = os.path.dirname(parent)

    @classmethod
    def open(cls, params: dict[str, Any], run_dir: str) -> LocalRepository:
        root = cls.location(params, run_dir)
        repo = cls(root, cls._read_meta(root)["uuid"])
        repo._start()
        return repo

    @classmethod
    def _read_meta(cls, root: str) -> dict[str, Any]:
        """repository.json of the repository at ``root``, checked to be one of this format's."""
        try:
            meta = fileio.read_json(os.path.join(root, layout.META))
        except FileNotFoundError:
            raise errors.RepositoryNotFormatted(f"{root} is not a formatted repository") from None
        except (OSError, ValueError) as e:
            raise errors.RepositoryNotFormatted(f"{root}/{layout.META} unreadable: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != cls.FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise errors.UnsupportedFormat(f"{root} has format {found!r}, not {cls.FORMAT}")
        missing = [sub for sub in layout.AREAS if not os.path.isdir(os.path.join(root, sub))]
        if not isinstance(meta.get("uuid"), str) or missing:
            raise errors.RepositoryNotFormatted(
                f"{root} is damaged: "
                + (f"missing {', '.join(missing)}" if missing else f"{layout.META} has no uuid")
            )
        return meta

    def _start(self) -> None:
        """Take what this host holds of the repository and measure its file system."""
        self._take_lock()
        self.direct_io = self._probe_direct_io()
        self.reflink = self._probe_reflink()

    def clone(self, src: str, dst: str) -> None:
        fileio.clone(src, dst)

    def _probe_reflink(self) -> bool:
        """Whether the file system clones files (XFS with reflink, btrfs): FICLONE on two
        scratch files. Performance-strategy disks are then clones, not copies."""
        base = os.path.join(self.root, layout.VOLUMES, f".reflink{fileio.TMP_MARK}probe")
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
        probe = os.path.join(self.root, layout.VOLUMES, f".direct-io{fileio.TMP_MARK}probe")
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        except OSError:
            return False
        os.close(fd)
        os.unlink(probe)
        return True

    def _lock_path(self) -> str:
        return os.path.join(self.root, "lock")

    def _take_lock(self) -> None:
        if self._lock_fd is None:  # a mounted format takes its lock before it mounts
            self._lock_fd = lock(self._lock_path(), self.root)

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

    def _check_write(self) -> None:
        self._check_open()
        contract.check_fence()

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
        return self._path(layout.VOLUMES, f"{_checked(vol_id)}.{model.VolumeFormat(fmt).value}")

    def volume_file(self, vol: model.Volume) -> str:
        """The path of a volume's data file, once it is known to be a regular file of this
        repository (a symlink, a FIFO, a directory there is never followed): what may be read,
        handed to qemu-img or to a consumer."""
        path = self.volume_path(vol.id, vol.format)
        problem = layout.file_problem(path)
        if problem is not None:
            raise errors.ImageBroken(f"the data file of volume {vol.id} ({path}) {problem}",
                                     file=path)
        return path

    def volume_partial_path(self, vol_id: str, fmt: model.VolumeFormat) -> str:
        return self.volume_path(vol_id, fmt) + layout.PARTIAL

    @staticmethod
    def backing_reference(vol_id: str, fmt: model.VolumeFormat) -> str:
        """How a qcow2 names its backing volume: a bare name, resolved from its own directory."""
        return f"{vol_id}.{fmt.value}"

    # -- records -----------------------------------------------------------------------------
    # Three kinds, one shape: ``<sub>/<id>.json`` holding a model record's dict.

    def clock(self) -> float:
        """The time of the storage's clock now. On shared storage file times come from the
        server, not from this host: a probe file tells it."""
        if not self.shared:
            return time.time()
        self._check_open()
        # In the repository's root, not beside the records: a file made in a directory of
        # records changes that directory, and the record cache trusts a directory that has
        # not changed.
        probe = os.path.join(self.root, f".clock{fileio.TMP_MARK}{uuid.uuid4().hex}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                return os.fstat(fd).st_mtime
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            self._failed(probe, e)
            raise

    def record_path(self, sub: str, rec_id: str) -> str:
        return self._record_path(sub, rec_id)

    def _record_path(self, sub: str, rec_id: str) -> str:
        return self._path(sub, f"{_checked(rec_id)}.json")

    def _read(self, sub: str, rec_id: str, parse: Callable[[dict[str, Any]], R],
              keep: bool = False) -> R | None:
        """The one reader of records (see the module's docstring); None when there is none.
        ``keep``: a scan's read, whose record goes to the record cache (read-only from then
        on: a single record read for a change is the caller's own)."""
        if not model.is_id(rec_id):
            return None  # no record can have that name
        # A shared file system (GlusterFS seen here, NFS alike) answers ESTALE to an open or
        # read that meets a rename-over of the record's name, by this host or another: the
        # record was replaced meanwhile, and reading the name again gives the new one. Only
        # an ESTALE that persists says the file system failed.
        for _ in range(ESTALE_RETRIES):
            try:
                return self._read_once(sub, rec_id, parse, keep)
            except errors.RepositoryUnavailable as e:
                if e.data.get("errno") != "ESTALE":
                    raise
                time.sleep(0.01)
        return self._read_once(sub, rec_id, parse, keep)

    def _read_once(self, sub: str, rec_id: str, parse: Callable[[dict[str, Any]], R],
                   keep: bool) -> R | None:
        path = self._record_path(sub, rec_id)
        read_ns = time.time_ns()

        def damaged(reason: str) -> _Damaged:
            return _Damaged(layout.Damage(path, reason, sub, rec_id))

        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise damaged("it is a symbolic link (never followed)") from None
            self._failed(path, e)  # EIO and the like: the repository fails, not the record
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise damaged("it is not a regular file")
            if st.st_size > MAX_RECORD:
                raise damaged(f"it is {st.st_size} bytes, larger than any record")
            # The size fstat gave, plus one byte to see it did not grow (a record is replaced
            # by a rename, never written in place): no buffer of MAX_RECORD per read.
            raw = b""
            while len(raw) <= st.st_size:
                chunk = os.read(fd, st.st_size + 1 - len(raw))
                if not chunk:
                    break
                raw += chunk
        except OSError as e:
            self._failed(path, e)
            raise
        finally:
            os.close(fd)
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise damaged(f"not JSON ({'empty file' if not raw else e})") from None
        try:
            rec = parse(d)
        except model.Damaged as e:
            raise damaged(str(e)) from None
        if getattr(rec, "id", None) != rec_id:
            raise damaged("its id does not match its file name")
        if keep:
            self._records.put(sub, rec_id, st, rec, read_ns)
        return rec

    def _get(self, sub: str, rec_id: str, parse: Callable[[dict[str, Any]], R]) -> R | None:
        self._check_open()
        try:
            return self._read(sub, rec_id, parse)
        except _Damaged as e:
            self._warn(e.damage)
            raise e.damage.error() from None

    def _revalidate(self, sub: str) -> None:
        """Look at every record file of a kind again (the record cache's background pass)."""
        if self.closed:
            return
        parse = {layout.IMAGES: model.Image.from_dict, layout.VOLUMES: model.Volume.from_dict,
                 layout.JOURNAL: model.Operation.from_dict}[sub]
        self._scan(sub, parse, revalidate=True)  # type: ignore[arg-type]

    def _scan(self, sub: str, parse: Callable[[dict[str, Any]], R], fresh: bool = False,
              revalidate: bool = False) -> tuple[list[R], list[layout.Damage]]:
        """Every readable record of a kind, and the damage found instead of the others. The
        records are shared with other scans (read-only); each is parsed again only when its
        file's identity changed (agent/repo/recordcache.py), every one with ``fresh``."""
        self._check_open()
        # One scan of a kind at a time: a second one at once (the first listing while the
        # connect's background read runs) would parse the same files beside the first, both
        # slower for sharing the interpreter, where after it each file is a cache hit.
        with self._scanning.setdefault(sub, threading.Lock()):
            return self._scan_one(sub, parse, fresh, revalidate)

    def _scan_one(self, sub: str, parse: Callable[[dict[str, Any]], R], fresh: bool,
                  revalidate: bool) -> tuple[list[R], list[layout.Damage]]:
        cache = self._records
        directory = os.path.join(self.root, sub)
        taken_ns = time.time_ns()
        try:
            dir_st = os.lstat(directory)
        except OSError as e:
            self._failed(directory, e)
            raise
        if not fresh and not revalidate:
            kept = cache.listing(sub, dir_st, taken_ns)
            if kept is not None:
                return kept
        out, damage, seen = [], [], set()
        for entry in self._entries(sub):
            name = entry.name
            if not name.endswith(".json") or name.startswith("."):
                continue
            stem = name[: -len(".json")]
            if not model.is_id(stem):
                damage.append(layout.Damage(entry.path, "its name is not <uuid>.json", sub, None))
                continue
            seen.add(stem)
            if not fresh:
                try:
                    kept = cache.get(sub, stem, os.lstat(entry.path))
                except FileNotFoundError:
                    continue  # removed since the directory was read: fine
                except OSError as e:
                    self._failed(entry.path, e)
                    raise
                if kept is not None:
                    out.append(kept)
                    continue
            try:
                rec = self._read(sub, stem, parse, keep=True)
            except _Damaged as e:
                cache.forget(sub, stem)
                damage.append(e.damage)
                continue
            if rec is not None:  # removed since the scan: fine
                out.append(rec)
        cache.keep_only(sub, seen)
        cache.remember(sub, dir_st, taken_ns, list(out), list(damage))
        for d in damage:
            self._warn(d)
        return out, damage

    def _all(self, sub: str, parse: Callable[[dict[str, Any]], R]) -> list[R]:
        return self._scan(sub, parse)[0]

    def _warn(self, d: layout.Damage) -> None:
        # Once per file and connection: a listing polled every second must not flood the log.
        if d.path not in self._warned:
            self._warned.add(d.path)
            log.warning("event=record_damaged repo=%s file=%s error=%r", self.uuid, d.path,
                        d.reason)

    def damage(self) -> list[layout.Damage]:
        """Every record of this repository that cannot be read."""
        return [d for sub, parse in ((layout.IMAGES, model.Image.from_dict),
                                     (layout.VOLUMES, model.Volume.from_dict),
                                     (layout.JOURNAL, model.Operation.from_dict))
                for d in self._scan(sub, parse)[1]]  # type: ignore[arg-type]

    def scan_images(self, fresh: bool = False
                    ) -> tuple[list[model.Image], list[layout.Damage]]:
        return self._scan(layout.IMAGES, model.Image.from_dict, fresh)

    def scan_volumes(self, fresh: bool = False
                    ) -> tuple[list[model.Volume], list[layout.Damage]]:
        return self._scan(layout.VOLUMES, model.Volume.from_dict, fresh)

    def scan_operations(self, fresh: bool = False
                    ) -> tuple[list[model.Operation], list[layout.Damage]]:
        return self._scan(layout.JOURNAL, model.Operation.from_dict, fresh)

    def _entries(self, sub: str) -> list[recordcache.Entry]:
        """The entries of one of the repository's directories (kept while it has not
        changed: agent/repo/recordcache.py)."""
        self._check_open()
        directory = os.path.join(self.root, sub)
        taken_ns = time.time_ns()
        try:
            dir_st = os.lstat(directory)
            kept = self._records.entries(directory, dir_st, taken_ns)
            if kept is not None:
                return kept
            with os.scandir(directory) as it:
                out = [recordcache.Entry(e.name, directory, e.is_file(follow_symlinks=False))
                       for e in it]
        except OSError as e:
            self._failed(directory, e)
            raise
        self._records.remember_entries(directory, dir_st, taken_ns, out)
        return out

    def get_image(self, image_id: str) -> model.Image | None:
        return self._get(layout.IMAGES, image_id, model.Image.from_dict)

    def put_image(self, image: model.Image) -> None:
        self.put_staged(self.stage_image(image))

    def stage_image(self, image: model.Image) -> fileio.Staged:
        self._check_write()
        return fileio.stage([self._image_record(image)])

    def put_staged(self, staged: fileio.Staged, count: int | None = None) -> None:
        self._check_write()
        staged.commit(still=self._check_write, count=count)

    def _image_record(self, image: model.Image) -> tuple[str, bytes]:
        image.generation += 1  # every write is a new generation: fixes made before are stale
        return self._record_path(layout.IMAGES, image.id), fileio.encode_json(image.to_dict())

    def put_intent(self, op: model.Operation, image: model.Image) -> None:
        """A new operation's journal and the image record naming it, both fsync'd at once and
        durable in that order: a journal without its image is a finished-nothing the checker
        cleans; an image naming a journal that is not there could never be resumed."""
        self.put_staged(self.stage_intent(op, image))

    def stage_intent(self, op: model.Operation, image: model.Image) -> fileio.Staged:
        self._check_write()
        journal = self._record_path(layout.JOURNAL, op.id)
        self._told_of(op)  # before the journal can land (see _told_of)
        return fileio.stage([(journal, fileio.encode_json(op.to_dict())),
                             self._image_record(image)])

    def delete_image(self, image_id: str) -> None:
        self._check_write()
        fileio.remove(self._record_path(layout.IMAGES, image_id))

    def images(self) -> list[model.Image]:
        return self._all(layout.IMAGES, model.Image.from_dict)

    def get_volume(self, vol_id: str) -> model.Volume | None:
        return self._get(layout.VOLUMES, vol_id, model.Volume.from_dict)

    def put_volume(self, vol: model.Volume, sync_dir: bool = True,
                   data: str | None = None) -> None:
        """``data``: the volume's new data file, made durable together with the record."""
        self._check_write()
        fileio.write_json(self._record_path(layout.VOLUMES, vol.id), vol.to_dict(), sync_dir,
                          () if data is None else (data,), self._check_write)

    def delete_volume_data(self, vol: model.Volume) -> None:
        """Data first, record last (``delete_volume_record``): a record whose data is gone
        is still found and finished by the next clean."""
        self._check_write()
        fileio.remove(self.volume_partial_path(vol.id, vol.format))
        fileio.remove(self.volume_path(vol.id, vol.format))

    def delete_volume_record(self, vol: model.Volume) -> None:
        self._check_write()
        fileio.remove(self._record_path(layout.VOLUMES, vol.id))

    def volumes(self) -> list[model.Volume]:
        return self._all(layout.VOLUMES, model.Volume.from_dict)

    def get_operation(self, op_id: str) -> model.Operation | None:
        return self._get(layout.JOURNAL, op_id, model.Operation.from_dict)

    def put_operation(self, op: model.Operation) -> None:
        self._check_write()
        self._told_of(op)
        fileio.write_json(self._record_path(layout.JOURNAL, op.id), op.to_dict(),
                          still=self._check_write)

    def delete_operation(self, op_id: str, durable: bool = True) -> None:
        """``durable=False`` for a finished operation: a journal that comes back after a crash
        names an image that no longer waits for it, and clean removes it."""
        self._check_write()
        fileio.remove(self._record_path(layout.JOURNAL, op_id), durable)
        if self.journal_index is not None:
            self.journal_index.deleted(op_id)

    def _told_of(self, op: model.Operation) -> None:
        """The index hears of a journal before it is written: a name too many if the write
        fails (dropped when read again), never one missing while it lands."""
        if self.journal_index is not None:
            self.journal_index.wrote(op)

    def operations(self) -> list[model.Operation]:
        return self._all(layout.JOURNAL, model.Operation.from_dict)

    def stray_files(self) -> list[str]:
        """Files that are neither records nor volume data: leftover temporary and partial files
        (regular files only: whatever else is planted there is left alone)."""
        out = []
        # The root too: the clock's probe file is made there.
        for sub in (layout.IMAGES, layout.VOLUMES, layout.JOURNAL, ""):
            for entry in self._entries(sub):
                if not entry.is_file:
                    continue
                if fileio.is_temporary(entry.name) or entry.name.endswith(layout.PARTIAL):
                    out.append(entry.path)
        return out

    def volume_files(self) -> dict[str, str]:
        """Volume data files by volume id, whether or not a record names them: regular files
        named ``<uuid>.qcow2`` or ``<uuid>.raw``, nothing else."""
        out = {}
        for entry in self._entries(layout.VOLUMES):
            stem, _, ext = entry.name.partition(".")
            if ext in ("qcow2", "raw") and model.is_id(stem) and entry.is_file:
                out[stem] = entry.path
        return out
