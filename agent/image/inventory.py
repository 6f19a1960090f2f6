"""All records of a repository, read once, and what follows from them.

The checker, clean and listImages all need the same picture: every image's chain, which volumes
are still needed, which volume depends on which. Reading each record once keeps a check of 10,000
images to a few file reads per image.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

from agent import fileio, qcow2
from agent.image import chain, model
from agent.repo import localfs

# Finds a volume in another connected repository: (that repository, the volume record).
Elsewhere = Callable[[str], "tuple[localfs.LocalRepository, model.Volume] | None"]


@dataclasses.dataclass
class Fault:
    """Something wrong with an image's chain, and whether the agent may repair it alone."""

    image_id: str
    volume_id: str | None
    message: str
    # The backing reference to write when re-pointing it is safe; None: a person must decide.
    relink_to: str | None = None


class Inventory:
    def __init__(self, repo: localfs.LocalRepository, active: set[str],
                 elsewhere: Elsewhere | None = None,
                 others: Callable[[], list[localfs.LocalRepository]] | None = None) -> None:
        self.repo = repo
        self.images = {i.id: i for i in repo.images()}
        self.volumes = {v.id: v for v in repo.volumes()}
        self.ops = {op.id: op for op in repo.operations()}
        self.active = active
        self._elsewhere = elsewhere
        self._others = others  # the other connected repositories, for needed_elsewhere
        self._foreign: dict[str, dict[str, localfs.LocalRepository]] = {}

    # -- operations ----------------------------------------------------------------------------

    @functools.cached_property
    def live_ops(self) -> list[model.Operation]:
        """Operations that still have work to do for an image that still wants it. One that
        runs here but whose image no longer names it is sealed and only has its journal left
        to delete: it needs nothing any more, as getImageStatus already says."""
        out = []
        for op in self.ops.values():
            img = self.images.get(op.image_id)
            wanted = img is not None and (
                img.fix_id == op.id if op.kind.is_fix
                else img.operation_id == op.id and not img.removed
            )
            if op.state != model.OpState.ABORTED and wanted:
                out.append(op)
        return out

    @functools.cached_property
    def pending_volumes(self) -> set[str]:
        """Volumes that unfinished operations name: made, stood on, or rewritten."""
        return {v for op in self.live_ops for v in op.params.volumes()}

    @functools.cached_property
    def rewritten(self) -> set[str]:
        """Volumes an unfinished fix rewrites in place: images on them cannot be prepared."""
        return {op.params.rewrites for op in self.live_ops if op.params.rewrites is not None}

    # -- chains --------------------------------------------------------------------------------

    def chain(self, image: model.Image) -> tuple[list[model.Volume], str | None]:
        lookup = chain.Lookup(self.volumes.get, self._elsewhere)
        walked = chain.walk(image.volume_id, lookup, self.images.get)
        if lookup.foreign:
            self._foreign[image.id] = lookup.foreign
        return walked

    @property
    def foreign(self) -> dict[str, dict[str, localfs.LocalRepository]]:
        """Image id -> the volumes of its chain that live in other repositories, and where."""
        self.chains  # noqa: B018 - walking every chain is what fills it
        return self._foreign

    @functools.cached_property
    def chains(self) -> dict[str, tuple[list[model.Volume], str | None]]:
        return {i.id: self.chain(i) for i in self.images.values() if not i.removed}

    @functools.cached_property
    def needed(self) -> set[str]:
        """Volumes some image that is not removed, or some unfinished operation, still needs."""
        needed: set[str] = set()

        def walk(vol_id: str | None) -> None:
            while vol_id is not None and vol_id not in needed:
                needed.add(vol_id)
                vol = self.volumes.get(vol_id)
                vol_id = vol.parent_volume_id if vol else None

        for img in self.images.values():
            # A prepared image's chain is needed even if it were removed: a consumer reads it.
            if not img.removed or img.prepared_by:
                walk(img.volume_id)
        for vol_id in self.needed_elsewhere:
            walk(vol_id)
        for op in self.live_ops:
            for vol_id in op.params.volumes():
                walk(vol_id)
        return needed

    @functools.cached_property
    def needed_elsewhere(self) -> set[str]:
        """Volumes of this repository that a chain in another connected repository leans on."""
        if self._others is None:
            return set()
        return {v.parent_volume_id for other in self._others() for v in other.volumes()
                if v.parent_volume_id in self.volumes}

    @functools.cached_property
    def dependants(self) -> dict[str, list[str]]:
        """Needed volume id -> the needed volumes directly backed by it."""
        out: dict[str, list[str]] = {}
        for vol_id in self.needed:
            vol = self.volumes.get(vol_id)
            if vol is not None and vol.parent_volume_id is not None:
                out.setdefault(vol.parent_volume_id, []).append(vol_id)
        return out

    @functools.cached_property
    def tops(self) -> dict[str, list[model.Image]]:
        """Volume id -> the images (removed or not) whose top volume it is."""
        out: dict[str, list[model.Image]] = {}
        for img in self.images.values():
            out.setdefault(img.volume_id, []).append(img)
        return out

    @functools.cached_property
    def in_use(self) -> set[str]:
        """Volumes in the chain of a prepared image: never rewritten while a consumer has them."""
        out: set[str] = set()
        for img in self.images.values():
            if img.prepared_by and img.id in self.chains:
                out.update(v.id for v in self.chains[img.id][0])
        return out

    # -- on-disk checks ------------------------------------------------------------------------

    def header_fault(self, image: model.Image, vols: list[model.Volume]) -> Fault | None:
        """Compare each volume file with its record: exists, format, backing reference."""
        for vol in vols:
            path = self.repo.volume_path(vol.id, vol.format)
            try:
                header = qcow2.read_header(path)
            except FileNotFoundError:
                return Fault(image.id, vol.id, f"the data file of volume {vol.id} is missing")
            if vol.format == model.VolumeFormat.RAW:
                continue  # raw content is guest data: never probed
            if header is None:
                return Fault(image.id, vol.id,
                             f"volume {vol.id} is recorded as qcow2 but its file is not qcow2; "
                             "a person must decide which is right")
            parent = self.volumes.get(vol.parent_volume_id) if vol.parent_volume_id else None
            expected = (self.repo.backing_reference(parent.id, parent.format)
                        if parent is not None else None)
            if parent is None and vol.parent_volume_id and self._elsewhere is not None:
                found = self._elsewhere(vol.parent_volume_id)
                if found is not None:  # a backing volume in another repository, by its path
                    expected = found[0].volume_path(found[1].id, found[1].format)
            if header.backing == expected:
                continue
            if (expected is not None and header.backing is not None
                    and os.path.basename(header.backing) == expected):
                # Same volume, named another way (an absolute path from another mount): safe.
                return Fault(image.id, vol.id,
                             f"volume {vol.id} names its backing file {header.backing!r} instead "
                             f"of {expected!r}", relink_to=expected)
            return Fault(image.id, vol.id,
                         f"volume {vol.id}'s backing file is {header.backing!r} but the records "
                         f"say {expected!r}; a person must decide which chain is right")
        return None

    def allocated(self, vol_id: str) -> int:
        vol = self.volumes.get(vol_id)
        if vol is None:
            return 0
        return fileio.allocated_bytes(self.repo.volume_path(vol.id, vol.format))
