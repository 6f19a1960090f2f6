"""Walking an image's chain of volumes, top first, and what can be wrong with it.

The walk works on any record source (the repository, or an inventory of all its records loaded
once), so getImageStatus on one image and the checker on 10,000 use the same rules.
"""

from __future__ import annotations

from collections.abc import Callable

from agent import errors
from agent.image import model
from agent.repo import localfs

# qemu refuses chains deeper than this anyway; a longer walk means a loop in the records.
MAX_DEPTH = 1000

GetVolume = Callable[[str], "model.Volume | None"]
GetImage = Callable[[str], "model.Image | None"]


def walk(
    top_id: str, get_volume: GetVolume, get_image: GetImage | None = None
) -> tuple[list[model.Volume], str | None]:
    """The chain as far as it can be followed, and the fault that stopped it (None when sound)."""
    out: list[model.Volume] = []
    seen: set[str] = set()
    vol_id: str | None = top_id
    while vol_id is not None:
        if vol_id in seen or len(out) > MAX_DEPTH:
            return out, f"the chain loops at volume {vol_id}"
        seen.add(vol_id)
        vol = get_volume(vol_id)
        if vol is None:
            below = f" (below volume {out[-1].id})" if out else ""
            return out, f"volume {vol_id} of the chain has no record{below}: unknown parent"
        if get_image is not None and vol.parent_image_id is not None:
            parent = get_image(vol.parent_image_id)
            if parent is not None and parent.kind == model.Kind.DISK and not parent.removed:
                return out, (
                    f"volume {vol.id} is backed by a layer of disk {parent.id}; only "
                    "snapshots can be parents (a parent of the wrong kind)"
                )
        out.append(vol)
        vol_id = vol.parent_volume_id
    return out, None


class Lookup:
    """Volume records: this repository's first, then, when ``elsewhere`` is given, any other
    connected repository's (a chain may lean on a backing volume that lives elsewhere). It
    remembers which volumes came from elsewhere, and from where."""

    def __init__(self, local: GetVolume,
                 elsewhere: Callable[[str], tuple[localfs.LocalRepository, model.Volume] | None]
                 | None = None) -> None:
        self._local = local
        self._elsewhere = elsewhere
        self.foreign: dict[str, localfs.LocalRepository] = {}

    def __call__(self, vol_id: str) -> model.Volume | None:
        vol = self._local(vol_id)
        if vol is None and self._elsewhere is not None:
            found = self._elsewhere(vol_id)
            if found is not None:
                self.foreign[vol_id] = found[0]
                return found[1]
        return vol


def volumes(repo: localfs.LocalRepository, top_id: str) -> list[model.Volume]:
    vols, fault = walk(top_id, repo.get_volume)
    if fault is not None:
        raise errors.ImageBroken(fault)
    return vols


def image_ids(chain: list[model.Volume], top_image_id: str) -> list[str]:
    """The images along a chain: the top image, then each parent image, without repeats."""
    out = [top_image_id]
    for vol in chain:
        if vol.parent_image_id and vol.parent_image_id != out[-1]:
            out.append(vol.parent_image_id)
    return out
