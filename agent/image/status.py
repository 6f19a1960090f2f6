"""What getImageStatus and listImages say about an image."""

from __future__ import annotations

from typing import Any

from agent.image import model


def describe(image: model.Image, op: model.Operation | None, active: bool) -> dict[str, Any]:
    """Status plus the last persisted progress of the image's operation (or its last one)."""
    if image.operation_id is None:
        progress = image.progress
        return {
            "imageId": image.id,
            "status": model.Status.OPTIMIZED.value,
            "hostID": progress.host_id,
            "stage": progress.stage,
            "percent_complete": progress.percent,
            "last_error": progress.last_error,
            "operation": None,
            "running": False,
        }
    if op is None:
        return {
            "imageId": image.id,
            "status": model.Status.BROKEN.value,
            "hostID": 0,
            "stage": "0/0",
            "percent_complete": -1,
            "last_error": f"the journal of operation {image.operation_id} is missing",
            "operation": None,
            "running": False,
        }
    return {
        "imageId": image.id,
        "status": model.Status.BROKEN.value,
        "hostID": op.progress.host_id,
        "stage": op.progress.stage,
        "percent_complete": op.progress.percent,
        "last_error": op.progress.last_error,
        "operation": op.kind.value,
        "running": active,
    }
