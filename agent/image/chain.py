"""Walking an image's chain of volumes, top first."""

from __future__ import annotations

from agent import errors
from agent.image import model
from agent.repo import localfs

# qemu refuses chains deeper than this anyway; a longer walk means a loop in the records.
MAX_DEPTH = 1000


def volumes(repo: localfs.LocalRepository, top_id: str) -> list[model.Volume]:
    out: list[model.Volume] = []
    seen: set[str] = set()
    vol_id: str | None = top_id
    while vol_id is not None:
        if vol_id in seen or len(out) > MAX_DEPTH:
            raise errors.ImageBroken(f"volume chain loops at volume {vol_id}")
        seen.add(vol_id)
        vol = repo.get_volume(vol_id)
        if vol is None:
            raise errors.ImageBroken(f"volume {vol_id} of the chain is missing")
        out.append(vol)
        vol_id = vol.parent_volume_id
    return out


def image_ids(chain: list[model.Volume], top_image_id: str) -> list[str]:
    """The images along a chain: the top image, then each parent image, without repeats."""
    out = [top_image_id]
    for vol in chain:
        if vol.parent_image_id and vol.parent_image_id != out[-1]:
            out.append(vol.parent_image_id)
    return out
