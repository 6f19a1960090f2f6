"""The contract between the engine and a repository format: the one thing the engine knows.

A format (a *driver*) is a subclass of ``Repository`` registered in ``agent.repo.FORMATS`` under
its ``FORMAT`` name. The engine (``agent/image``, ``agent/fix``, ``agent/api.py``,
``agent/host.py``) names ``Repository``, ``Capability`` and ``agent.repo.layout`` only, never a
concrete driver (tests/test_contract.py greps for it). Every driver performs the same few
primitives, listed here with the methods that make them:

- **read** a record: ``get_image``, ``get_volume``, ``get_operation`` (None when there is none;
  ``RecordDamaged`` naming the file when it cannot be read; ``RepositoryUnavailable`` when the
  storage fails).
- **write** a record, durably before returning: ``put_image`` (bumps its generation),
  ``put_volume`` (with the data file it describes, made durable together), ``put_operation``,
  ``put_intent`` (a new journal and the image naming it, durable in that order); their halves
  ``stage_image``/``stage_intent`` and ``put_staged``, to fsync the new files outside a lock.
- **list**: ``images``, ``volumes``, ``operations``, and ``scan_*`` with the ``layout.Damage``
  found instead of the unreadable records; ``stray_files`` and ``volume_files`` for the checker.
- **copy to**: the paths qemu-img reads and writes (``volume_file``: an existing volume's data,
  never through a symlink; ``volume_path``/``volume_partial_path``: where a volume's data goes
  and where it is produced first; ``backing_reference``: how a qcow2 names its backing volume,
  relative, so every host that mounts the repository reads the same chain).
- **clone**: ``clone``, a copy that shares blocks (reflink), where ``Capability.REFLINK`` is;
  it raises ``OSError`` when this file cannot be cloned and the caller copies instead.
- **delink**: the non-destructive delete. An image is removed by writing its record weak and
  removed (``put_image``): its bytes stay for the images leaning on them, and its record stays
  until clean proves nothing needs it. ``delete_image``, ``delete_operation`` and
  ``delete_volume_record`` forget a record once nothing names it.
- **destroy**: ``delete_volume_data``, the only primitive that deletes data (clean's, once no
  record needs it), always before the volume's record.

Claims and leases: ``shared`` says whether other hosts mount the same repository; the engine's
claims (agent/image/claims.py) are then backed by that repository's leases, and
``lockspace_state`` says whether this host has joined its lockspace (``{"state": "local"}`` for a
local format, which needs none).

Lifecycle: ``check_parameters`` validates ``connectionParameters`` against ``PARAMETERS`` (a JSON
schema, published per format in rpc/openrpc.json) before anything is mounted or written;
``location`` names where the repository is served on this host (two connections may not share
one); ``format`` makes an empty repository; ``open`` connects one; ``close`` lets it go.
"""

from __future__ import annotations

import abc
import contextvars
import enum
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import jsonschema

from agent import errors, fileio
from agent.image import model
from agent.repo import layout

if TYPE_CHECKING:
    from agent.image import journals
    from agent.repo import lockspace


# The check of whoever writes on this thread now (an operation's or a call's claim): every
# record write and data rename of a repository asks it first, so an owner that lost its claim
# (its lease taken over while this host was frozen, its lockspace lost) writes nothing more,
# wherever in a step it was when it lost it.
fence: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "fence", default=None)


def check_fence() -> None:
    check = fence.get()
    if check is not None:
        check()


class Capability(enum.Enum):
    """What a format can do. Each format declares the ones it always has (``CAPABILITIES``);
    ``REFLINK`` and ``DIRECT_IO`` depend on the file system and are measured when it is opened.
    The values are the strings getStorageRepositoryInfo reports."""

    THIN = "thin"  # thin qcow2 layers over a snapshot
    SNAPSHOT = "snapshot"  # createSnapshot
    COPY = "copy"  # copyImage, full and with a base
    MERGE = "merge"  # the merge fix folds a removed snapshot away
    REFLINK = "reflink"  # clone: performance disks share blocks with their snapshot
    DIRECT_IO = "direct-io"  # O_DIRECT: copies bypass the page cache
    SHARED = "shared"  # several hosts mount the same repository at once
    LEASES = "leases"  # sanlock leases back the claims across hosts


class Repository(abc.ABC):
    """One connected repository (see the module's docstring for the primitives)."""

    FORMAT: ClassVar[str]
    VERSION: ClassVar[int] = 1
    # JSON schema of connectionParameters; rpc/openrpc.json publishes the same (tested).
    PARAMETERS: ClassVar[dict[str, Any]]
    CAPABILITIES: ClassVar[tuple[Capability, ...]]
    # Whether a status poll may run on the RPC event loop itself (see Api.runs_inline): only
    # where reads of a few small records cannot hang (a local file system's page cache).
    INLINE_READS: ClassVar[bool] = False
    # Whether other hosts may mount this repository at the same time.
    shared: ClassVar[bool] = False

    root: str  # where the layout starts (localfs: the directory; a mounted format: the mount)
    uuid: str
    # Held for each read-modify-write of records by this process.
    meta_lock: threading.RLock
    direct_io: bool
    reflink: bool
    closed: bool
    # Volume id -> what the last deep check found wrong with it (until one finds it sound).
    findings: dict[str, str]
    # sanlock's io_timeout (seconds; 0 where there are no leases), recorded at format.
    io_timeout: int
    # This host in the repository's lockspace (shared formats, once connected): the claims
    # take the images' leases through it. None on a local repository.
    membership: lockspace.Membership | None
    # Which journals name which image, where this process writes every journal (a local
    # repository): agent/image/journals.py. None: callers read the whole journal.
    journal_index: journals.Index | None

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def check_parameters(cls, params: dict[str, Any]) -> None:
        """Refuse parameters that do not fit ``PARAMETERS``, naming the key; touches nothing."""
        check_schema(cls.PARAMETERS, params, "connectionParameters")

    @classmethod
    @abc.abstractmethod
    def location(cls, params: dict[str, Any], run_dir: str) -> str:
        """Where this repository is served on this host (checked parameters): no two
        connections may share one."""

    @classmethod
    @abc.abstractmethod
    def format(cls, params: dict[str, Any], options: dict[str, Any], run_dir: str,
               connected: tuple[str, ...] = ()) -> str:
        """Make an empty repository and return its uuid. ``options``: the call's options
        (``ioTimeout`` for a shared format); ``connected``: the locations of the connected
        repositories."""

    @classmethod
    @abc.abstractmethod
    def open(cls, params: dict[str, Any], run_dir: str) -> Repository:
        """Connect: mount where the format mounts, check, and take what this host holds."""

    @abc.abstractmethod
    def close(self) -> None:
        """Let go (and unmount what ``open`` mounted); calls still in flight find it closed."""

    def capabilities(self) -> list[str]:
        """The declared capabilities and the measured ones, as getStorageRepositoryInfo
        reports them."""
        measured = [c for c, has in ((Capability.REFLINK, self.reflink),
                                     (Capability.DIRECT_IO, self.direct_io)) if has]
        return [c.value for c in (*self.CAPABILITIES, *measured)]

    def recover(self) -> None:
        """Make the storage usable again after this host lost the repository's lockspace (a
        mounted format mounts a dead mount again); a local repository has nothing to do."""
        return None

    def lockspace_state(self) -> dict[str, Any]:
        """Whether this host may write to the repository as far as leases go: ``local``, or
        the lockspace's ``joining``/``joined``/``failed`` (with the reason)."""
        if self.membership is None:
            return {"state": "local"}
        return self.membership.state()

    @abc.abstractmethod
    def clock(self) -> float:
        """Now, by the clock that stamps the repository's files (the storage server's)."""

    @abc.abstractmethod
    def record_path(self, kind: str, rec_id: str) -> str:
        """Where the record of ``kind`` (layout.IMAGES, VOLUMES, JOURNAL) and id is kept
        (its age tells a clean on shared storage whether another host may be making it)."""

    @abc.abstractmethod
    def capacity(self) -> tuple[int, int]:
        """Total and free bytes."""

    # -- copy to, clone, destroy -------------------------------------------------------------

    @abc.abstractmethod
    def volume_path(self, vol_id: str, fmt: model.VolumeFormat) -> str: ...

    @abc.abstractmethod
    def volume_file(self, vol: model.Volume) -> str: ...

    @abc.abstractmethod
    def volume_partial_path(self, vol_id: str, fmt: model.VolumeFormat) -> str: ...

    @staticmethod
    @abc.abstractmethod
    def backing_reference(vol_id: str, fmt: model.VolumeFormat) -> str: ...

    @abc.abstractmethod
    def clone(self, src: str, dst: str) -> None: ...

    @abc.abstractmethod
    def delete_volume_data(self, vol: model.Volume) -> None: ...

    # -- records: read, write, list, forget --------------------------------------------------

    @abc.abstractmethod
    def get_image(self, image_id: str) -> model.Image | None: ...

    @abc.abstractmethod
    def put_image(self, image: model.Image) -> None: ...

    @abc.abstractmethod
    def put_intent(self, op: model.Operation, image: model.Image) -> None: ...

    # The halves of put_image and put_intent, for a caller that renames under a lock but
    # must not hold it across the fsyncs of the new files: ``stage_*`` writes and fsyncs them
    # (bumping the image's generation, as put_image does), ``put_staged`` renames them into
    # place, in order, durably (or, in a ``fileio.deferred`` block, durably when it ends):
    # the next ``count`` records of it (all by default), each durable before the next.
    @abc.abstractmethod
    def stage_image(self, image: model.Image) -> fileio.Staged: ...

    @abc.abstractmethod
    def stage_intent(self, op: model.Operation, image: model.Image) -> fileio.Staged: ...

    @abc.abstractmethod
    def put_staged(self, staged: fileio.Staged, count: int | None = None) -> None: ...

    @abc.abstractmethod
    def delete_image(self, image_id: str) -> None: ...

    @abc.abstractmethod
    def images(self) -> list[model.Image]: ...

    # The scans: every readable record of a kind and the damage found instead of the others.
    # Their records may be shared with other scans (a driver keeps what it parsed while the
    # files stay the same): read-only. ``fresh``: every record read from storage now, for a
    # decision that destroys something.
    @abc.abstractmethod
    def scan_images(self, fresh: bool = False
                    ) -> tuple[list[model.Image], list[layout.Damage]]: ...

    @abc.abstractmethod
    def get_volume(self, vol_id: str) -> model.Volume | None: ...

    @abc.abstractmethod
    def put_volume(self, vol: model.Volume, sync_dir: bool = True,
                   data: str | None = None) -> None: ...

    @abc.abstractmethod
    def delete_volume_record(self, vol: model.Volume) -> None: ...

    @abc.abstractmethod
    def volumes(self) -> list[model.Volume]: ...

    @abc.abstractmethod
    def scan_volumes(self, fresh: bool = False
                    ) -> tuple[list[model.Volume], list[layout.Damage]]: ...

    @abc.abstractmethod
    def get_operation(self, op_id: str) -> model.Operation | None: ...

    @abc.abstractmethod
    def put_operation(self, op: model.Operation) -> None: ...

    @abc.abstractmethod
    def delete_operation(self, op_id: str, durable: bool = True) -> None: ...

    @abc.abstractmethod
    def operations(self) -> list[model.Operation]: ...

    @abc.abstractmethod
    def scan_operations(self, fresh: bool = False
                    ) -> tuple[list[model.Operation], list[layout.Damage]]: ...

    @abc.abstractmethod
    def damage(self) -> list[layout.Damage]: ...

    @abc.abstractmethod
    def stray_files(self) -> list[str]: ...

    @abc.abstractmethod
    def volume_files(self) -> dict[str, str]: ...


def check_schema(schema: dict[str, Any], value: Any, name: str) -> None:
    """``value`` fits ``schema``, or InvalidArgument naming the key that does not
    (``connectionParameters.server``), an unknown key included."""
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return
    where = ".".join([name, *(str(p) for p in error.absolute_path)])
    message = error.message
    if error.validator == "additionalProperties" and isinstance(value, dict):
        known = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in known)
        if extra:
            where = f"{where}.{extra[0]}"
            message = (f"unknown key; this format takes "
                       f"{', '.join(sorted(known)) or 'no keys'}")
    elif error.validator == "required":
        missing = str(error.message).split("'")[1] if "'" in error.message else ""
        where = f"{where}.{missing}" if missing else where
        message = "is required"
    hint = error.schema.get("description") if isinstance(error.schema, dict) else None
    raise errors.InvalidArgument(
        f"{where}: {message}"
        + (f" ({hint})" if hint and error.validator not in ("required", "additionalProperties")
           else ""),
        param=where)
