"""Typed records stored on a repository: images, volumes and operations (the journal).

Records are plain dataclasses; ``to_dict``/``from_dict`` are the only place their on-disk shape
is spelled. Unknown keys are kept out on read so old agents can read newer records' known fields.

What is read from disk is untrusted: ``from_dict`` checks every known field against its declared
type, and every id (``id``, ``*_id``, ``rewrites``) is a bare lower-case UUID before anything can
make a path of it; anything else raises ``Damaged``, which the repository turns into a finding
naming the file.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
import sys
import time
from typing import Any, TypeVar

from agent import errors

T = TypeVar("T")


class Kind(enum.StrEnum):
    DISK = "disk"
    SNAPSHOT = "snapshot"


class Status(enum.StrEnum):
    BROKEN = "broken"
    DEGRADED = "degraded"
    OPTIMIZED = "optimized"


class VolumeFormat(enum.StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


class OpKind(enum.StrEnum):
    CREATE_DISK = "createVirtualDisk"
    CREATE_SNAPSHOT = "createSnapshot"
    COPY = "copyImage"
    # Fixes that change data, journaled like the calls above. The image they improve stays
    # usable by its record (fix_id, not operation_id), but cannot be prepared meanwhile.
    MERGE_COMMIT = "mergeCommit"  # fold the upper layer down into a removed snapshot's volume
    MERGE_REBASE = "mergeRebase"  # fold a removed snapshot's layer up into its one dependant
    FLATTEN = "optimizeChain"  # fold a deep chain's intermediate layers into the top volume
    REPAIR = "repairLeaks"  # qemu-img check -r leaks
    LOCALIZE = "optimizeBacking"  # copy a backing volume from another repository into this one

    @property
    def is_fix(self) -> bool:
        return self in (OpKind.MERGE_COMMIT, OpKind.MERGE_REBASE, OpKind.FLATTEN, OpKind.REPAIR,
                        OpKind.LOCALIZE)


class OpState(enum.StrEnum):
    PENDING = "pending"  # committed, not yet picked up (AutoFix false, or queued: auto_fix says)
    RUNNING = "running"
    STOPPED = "stopped"  # a client stopped it, or it failed; last_error says which
    ABORTED = "aborted"  # its image was removed; the journal only waits for clean


class Strategy(enum.StrEnum):
    SPACE = "space"
    PERFORMANCE = "performance"


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Damaged(ValueError):
    """A record whose content no record of its kind can hold (the repository names the file)."""


def is_id(value: object) -> bool:
    """A bare canonical UUID, as the agent makes them: the only ids that may become paths."""
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


def _is_id_field(name: str) -> bool:
    return name == "id" or name.endswith("_id") or name == "rewrites"


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_PLAIN: dict[str, Any] = {
    "str": lambda v: isinstance(v, str),
    "int": _int,
    "float": lambda v: (_int(v) or isinstance(v, float)) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "dict[str, Any]": lambda v: isinstance(v, dict),
    "list[int]": lambda v: isinstance(v, list) and all(_int(i) for i in v),
}


# Integer fields that cannot be negative (percent may be -1: unknown).
_COUNTS = frozenset({"size", "generation", "step", "host_id"})


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How one field of a record kind is checked, worked out once per kind (records are read
    by the thousand: a status poll reads several)."""

    name: str
    where: str
    nullable: bool
    base: str
    is_id: bool
    required: bool


@functools.cache
def _specs(cls: type[Any]) -> tuple[_Spec, ...]:
    out = []
    for f in dataclasses.fields(cls):
        declared = str(f.type)
        base = declared.removesuffix(" | None")
        out.append(_Spec(
            f.name, f"{cls.__name__}.{f.name}", declared.endswith(" | None"), base,
            _is_id_field(f.name) and base == "str",
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        ))
    return tuple(out)


def _value(spec: _Spec, v: object) -> object:
    if v is None:
        if spec.nullable:
            return None
        raise Damaged(f"{spec.where} is null")
    if spec.is_id:
        if not is_id(v):
            raise Damaged(f"{spec.where} is {v!r}, not a bare UUID")
        # One string per id, however many records name it (a volume's parent, an image's top
        # volume): the record cache holds 100,000s of them.
        return sys.intern(str(v))
    base = spec.base
    nested = _NESTED.get(base)
    if nested is not None:
        return nested(v)
    kind = _ENUMS.get(base)
    if kind is not None:
        if not isinstance(v, str):
            raise Damaged(f"{spec.where} is {v!r}, not one of {[k.value for k in kind]}")
        try:
            return kind(v)
        except ValueError:
            raise Damaged(f"{spec.where} is {v!r}, not one of {[k.value for k in kind]}") \
                from None
    if not _PLAIN[base](v) or (spec.name in _COUNTS and v < 0):  # type: ignore[operator]
        raise Damaged(f"{spec.where} is {v!r}, not a valid {base}")
    return v


def _from(cls: type[T], d: object) -> T:
    """A record from its dict, every known field checked (see the module's docstring)."""
    if not isinstance(d, dict):
        raise Damaged(f"a {cls.__name__} record must be a JSON object, not {type(d).__name__}")
    kw: dict[str, Any] = {}
    for spec in _specs(cls):  # type: ignore[arg-type]
        if spec.name in d:
            kw[spec.name] = _value(spec, d[spec.name])
        elif spec.required:
            raise Damaged(f"{spec.where} is missing")
    return cls(**kw)


@dataclasses.dataclass(slots=True)  # by the 100,000 in a record cache
class Progress:
    host_id: int = 0
    stage: str = "0/0"
    percent: int = -1
    last_error: str | None = None
    # The version of the image's lease when host_id took it (shared repositories; 0 on local
    # ones): with the host id, who owns the operation; a runner whose lease moved on writes
    # nothing more.
    lease_version: int = 0


@dataclasses.dataclass(slots=True)  # by the 100,000 in a record cache
class Image:
    id: str
    kind: Kind
    size: int
    volume_id: str
    strong: bool = False
    removed: bool = False
    generation: int = 0
    operation_id: str | None = None
    # The fix operation improving this image (merge, optimize), if any.
    fix_id: str | None = None
    # A removed snapshot whose volume a merge by commit has started to write into: its bytes
    # are no longer its own, so it can never be revived (copied back) under its id.
    absorbing: bool = False
    user_data: dict[str, Any] = dataclasses.field(default_factory=dict)
    prepared_by: list[int] = dataclasses.field(default_factory=list)
    created: float = dataclasses.field(default_factory=time.time)
    # Progress of the last operation, persisted when it ended.
    progress: Progress = dataclasses.field(default_factory=Progress)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Image:
        return _from(cls, d)


@dataclasses.dataclass(slots=True)  # by the 100,000 in a record cache
class Volume:
    id: str
    format: VolumeFormat
    # The volume this one is backed by (None for a base layer) and the image that volume belongs to.
    parent_volume_id: str | None = None
    parent_image_id: str | None = None
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Volume:
        return _from(cls, d)


@dataclasses.dataclass(slots=True)  # by the 100,000 in a record cache
class OpParams:
    """What an operation needs to run on any host, fixed when its intent is committed."""

    size: int = 0
    strategy: Strategy = Strategy.SPACE
    volume_id: str | None = None  # the volume a create or a copy makes
    base_image_id: str | None = None  # the snapshot a disk stands on, or a copy's base
    base_volume_id: str | None = None
    source_id: str | None = None  # copy: the image copied, found by id in any repository
    disk_id: str | None = None  # snapshot: the disk switched to a new top
    old_volume_id: str | None = None
    new_volume_id: str | None = None
    lower_volume_id: str | None = None  # merge: the removed snapshot's volume
    upper_volume_id: str | None = None  # merge: its one dependant
    rewrites: str | None = None  # fixes: the volume rewritten in place
    new_parent_volume_id: str | None = None  # rebase/flatten: the new backing (None: none)
    new_parent_image_id: str | None = None
    absorbed_image_id: str | None = None  # merge by commit: the record forgotten at the end
    folded_image_id: str | None = None  # merges: the removed snapshot folded (claimed by it)
    foreign_volume_id: str | None = None  # optimizeBacking: the volume in another repository

    def volumes(self) -> list[str]:
        """Every volume this operation names: what clean must keep while it is unfinished."""
        ids = (self.volume_id, self.base_volume_id, self.old_volume_id, self.new_volume_id,
               self.lower_volume_id, self.upper_volume_id, self.rewrites,
               self.new_parent_volume_id)
        return [i for i in ids if i is not None]

    def source(self) -> str | None:
        """The image this operation reads by id (from any repository), if any."""
        if self.source_id is not None:
            return self.source_id
        if self.strategy == Strategy.PERFORMANCE:
            return self.base_image_id  # an independent disk is a copy of its snapshot
        return None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpParams:
        return _from(cls, d)


def need(value: T | None, what: str) -> T:
    """A field an operation of this kind always has; its absence means a damaged journal."""
    if value is None:
        raise errors.ImageBroken(f"the operation's journal lacks its {what}")
    return value


@dataclasses.dataclass(slots=True)  # by the 100,000 in a record cache
class Operation:
    """A journal entry: the intent of one multi-step change, enough to resume it anywhere."""

    id: str
    kind: OpKind
    image_id: str
    params: OpParams
    state: OpState = OpState.PENDING
    step: int = 0  # index of the next step to run; all steps before it are done
    progress: Progress = dataclasses.field(default_factory=Progress)
    created: float = dataclasses.field(default_factory=time.time)
    # Whether the work may start without a fix call: false for an intent committed with
    # AutoFix=false until a mend starts it. A PENDING operation is either such an intent or one
    # queued to run; only this field tells them apart when the agent starts again.
    auto_fix: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def resumes_on_start(self) -> bool:
        """Whether a starting agent takes this operation up again by itself: it was running (a
        crash, a kill, a shutdown interrupted it) or queued to run. Not what a client stopped,
        what failed (both STOPPED, last_error says which), nor an AutoFix=false intent."""
        if self.state == OpState.RUNNING:
            return True
        return self.state == OpState.PENDING and self.auto_fix

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Operation:
        op = _from(cls, d)
        if "auto_fix" not in d:
            # A journal from before the field: an older agent never started anything by itself,
            # and its PENDING meant an AutoFix=false intent as often as a queued one. Only what
            # it was running is sure to have been meant to run.
            op.auto_fix = op.state == OpState.RUNNING
        return op


_ENUMS: dict[str, type[enum.StrEnum]] = {
    "Kind": Kind, "VolumeFormat": VolumeFormat, "OpKind": OpKind, "OpState": OpState,
    "Strategy": Strategy,
}
_NESTED: dict[str, Any] = {
    "Progress": lambda v: _from(Progress, v),
    "OpParams": lambda v: _from(OpParams, v),
}


@dataclasses.dataclass(slots=True)  # by the 100,000 in a record cache
class Options:
    """The ``options`` argument every call takes, parsed once at the edge."""

    auto_fix: bool = True
    strategy: Strategy = Strategy.SPACE
    participating: list[str] | None = None
    hints: dict[str, str] = dataclasses.field(default_factory=dict)
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, d: dict[str, Any] | None) -> Options:
        d = d or {}
        return cls(
            auto_fix=bool(d.get("AutoFix", True)),
            strategy=Strategy(d.get("strategy", Strategy.SPACE.value)),
            participating=d.get("participatingRepositories"),
            hints=dict(d.get("imageHints") or {}),
            raw=d,
        )
