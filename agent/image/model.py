"""Typed records stored on a repository: images, volumes and operations (the journal).

Records are plain dataclasses; ``to_dict``/``from_dict`` are the only place their on-disk shape
is spelled. Unknown keys are kept out on read so old agents can read newer records' known fields.
"""

from __future__ import annotations

import dataclasses
import enum
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


def _from(cls: type[T], d: dict[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class Progress:
    host_id: int = 0
    stage: str = "0/0"
    percent: int = -1
    last_error: str | None = None


@dataclasses.dataclass
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
        img = _from(cls, d)
        img.kind = Kind(img.kind)
        img.progress = _from(Progress, d.get("progress") or {})
        return img


@dataclasses.dataclass
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
        vol = _from(cls, d)
        vol.format = VolumeFormat(vol.format)
        return vol


@dataclasses.dataclass
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
        params = _from(cls, d)
        params.strategy = Strategy(params.strategy)
        return params


def need(value: T | None, what: str) -> T:
    """A field an operation of this kind always has; its absence means a damaged journal."""
    if value is None:
        raise errors.ImageBroken(f"the operation's journal lacks its {what}")
    return value


@dataclasses.dataclass
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
        op.kind = OpKind(op.kind)
        op.state = OpState(op.state)
        if "auto_fix" not in d:
            # A journal from before the field: an older agent never started anything by itself,
            # and its PENDING meant an AutoFix=false intent as often as a queued one. Only what
            # it was running is sure to have been meant to run.
            op.auto_fix = op.state == OpState.RUNNING
        op.auto_fix = bool(op.auto_fix)
        op.params = OpParams.from_dict(d.get("params") or {})
        op.progress = _from(Progress, d.get("progress") or {})
        return op


@dataclasses.dataclass
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
