"""What getImageStatus and listImages say about an image."""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.image import model


@dataclasses.dataclass
class Facts:
    """What the status of one image depends on, gathered by the caller."""

    image: model.Image
    op: model.Operation | None = None  # the operation making it (operation_id)
    fix: model.Operation | None = None  # the fix improving it (fix_id)
    running: bool = False  # op or fix runs in this process now
    fault: str | None = None  # a chain fault: broken
    depth: int = 1
    max_depth: int = 10
    foreign: bool = False  # a backing volume lives in another repository
    journal_error: str | None = None  # why the operation's journal cannot be read
    # On a shared repository, the other host holding the image's lease while its operation
    # runs there: {"hostId", "state", "alive"}.
    running_on: dict[str, Any] | None = None


def describe(f: Facts) -> dict[str, Any]:
    """Status plus the last persisted progress of the image's operation (or its last one)."""
    img = f.image
    if img.operation_id is not None:
        if f.op is None:
            return _out(img.id, model.Status.BROKEN, model.Progress(
                last_error=f.journal_error
                or f"the journal of operation {img.operation_id} is missing"), None, False)
        return _out(img.id, model.Status.BROKEN, f.op.progress, f.op.kind.value, f.running,
                    f.running_on)
    if f.fault is not None:
        return _out(img.id, model.Status.BROKEN, model.Progress(
            img.progress.host_id, img.progress.stage, -1, f.fault), None, False)
    if f.fix is not None:
        return _out(img.id, model.Status.DEGRADED, f.fix.progress, f.fix.kind.value, f.running,
                    f.running_on)
    degraded = f.depth > f.max_depth or f.foreign
    status = model.Status.DEGRADED if degraded else model.Status.OPTIMIZED
    return _out(img.id, status, img.progress, None, False)


def making(image_id: str, op: model.Operation) -> dict[str, Any]:
    """What describe says of an image whose operation runs in this process (Runner.making),
    told from that operation alone: its records are the operation's to change until it ends."""
    return _out(image_id, model.Status.BROKEN, op.progress, op.kind.value, True)


def _out(image_id: str, status: model.Status, progress: model.Progress,
         operation: str | None, running: bool,
         running_on: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "imageId": image_id,
        "status": status.value,
        "hostID": progress.host_id,
        "stage": progress.stage,
        "percent_complete": progress.percent,
        "last_error": progress.last_error,
        "operation": operation,
        "running": running,
    }
    if running_on is not None:
        out["runningOn"] = running_on
    return out
