"""All records of a repository, read once, and what follows from them.

The checker, clean and listImages all need the same picture: every image's chain, which volumes
are still needed, which volume depends on which. Reading each record once keeps a check of 10,000
images to a few file reads per image.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable

from agent import fileio, qcow2
from agent.image import chain, memo, model
from agent.repo import contract, layout

# (the class's own ``chain`` method hides the module's name in its annotations)
FileFault = chain.FileFault

# Finds a volume in another connected repository: (that repository, the volume record).
Elsewhere = Callable[[str], "tuple[contract.Repository, model.Volume] | None"]


@dataclasses.dataclass
class Fault:
    """Something wrong with an image's chain, and whether the agent may repair it alone."""

    image_id: str
    volume_id: str | None
    message: str
    # The backing reference to write when re-pointing it is safe; None: a person must decide.
    relink_to: str | None = None


class Inventory:
    def __init__(self, repo: contract.Repository, active: set[str],
                 elsewhere: Elsewhere | None = None,
                 others: Callable[[], list[contract.Repository]] | None = None,
                 focus: set[str] | None = None, fresh: bool = False) -> None:
        self.repo = repo
        # Only these images' files are looked at (what one applied fix derives again); None:
        # every image's.
        self.focus = focus
        # The repository's clock before any read: on shared storage, whatever changed after
        # it may belong to another host's work this scan saw only half of (clean leaves it).
        # Journals first, then images, then volumes: the order in which an operation writes
        # them, so an image or volume seen here has its journal seen too, unless it is newer.
        self.started = repo.clock()
        # ``fresh``: every record read now (a decision under a claim, never from memory).
        ops, bad_ops = repo.scan_operations(fresh)
        images, bad_images = repo.scan_images(fresh)
        volumes, bad_volumes = repo.scan_volumes(fresh)
        # The scans as they came (agent/image/memo.py compares them with the last ones).
        self.scanned = (ops, images, volumes)
        self.images = {i.id: i for i in images}
        self.volumes = {v.id: v for v in volumes}
        self.ops = {op.id: op for op in ops}
        # Records that cannot be read: findings, and reasons for clean to hold back.
        self.damage: list[layout.Damage] = bad_images + bad_volumes + bad_ops
        self.damaged_volumes = {d.rec_id: d for d in bad_volumes if d.rec_id is not None}
        self.damaged_images = {d.rec_id: d for d in bad_images if d.rec_id is not None}
        self.active = active
        self._elsewhere = elsewhere
        self._others = others  # the other connected repositories, for needed_elsewhere
        self._foreign: dict[str, dict[str, contract.Repository]] = {}
        # What earlier scans derived from the same records; never for a fresh inventory.
        self.memo = None if fresh else memo.of(repo)
        if self.memo is not None and self.memo.listing(self.scanned, repo.findings,
                                                       time.monotonic_ns()) is None:
            self.memo.keep_only(set(self.images), set(self.volumes))

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

    def _volume(self, vol_id: str) -> model.Volume | None:
        damaged = self.damaged_volumes.get(vol_id)
        if damaged is not None:
            raise damaged.error()
        return self.volumes.get(vol_id)

    def _image(self, image_id: str) -> model.Image | None:
        damaged = self.damaged_images.get(image_id)
        if damaged is not None:
            raise damaged.error()
        return self.images.get(image_id)

    def chain(self, image: model.Image) -> tuple[list[model.Volume], str | None]:
        if self.memo is not None:
            kept = self.memo.chain(image, self.volumes, self.images)
            if kept is not None:
                return kept, None
        lookup = chain.Lookup(self._volume, self._elsewhere)
        walked = chain.walk(image.volume_id, lookup, self._image)
        if lookup.foreign:
            self._foreign[image.id] = lookup.foreign
        elif walked[1] is None and self.memo is not None:
            # Only a sound chain of this repository's own records: what another repository
            # holds is not this scan's to vouch for.
            self.memo.keep_chain(image, walked[0], self.images)
        return walked

    def foreign_of(self, image_id: str) -> dict[str, contract.Repository]:
        """The volumes of an image's chain in other repositories, once ``chain`` walked it
        (without walking every other chain, as ``foreign`` does)."""
        return self._foreign.get(image_id, {})

    @property
    def foreign(self) -> dict[str, dict[str, contract.Repository]]:
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

    @functools.cached_property
    def faults(self) -> dict[str, Fault]:
        """Image id -> what is wrong with its chain (records first, then files), for images
        that are not removed nor being made; layers a fix rewrites are that fix's business,
        layers in another repository that repository's."""
        out: dict[str, Fault] = {}
        cache: dict[str, Fault | None] = {}
        for img in self.images.values():
            if img.removed or img.operation_id is not None:
                continue  # images being made are the mends' business
            if self.focus is not None and img.id not in self.focus:
                continue
            vols, fault = self.chains[img.id]
            if fault is not None:
                out[img.id] = Fault(img.id, None, fault)
                continue
            elsewhere = self.foreign.get(img.id, {})
            for vol in vols:
                if vol.id in elsewhere:
                    break
                if vol.id in self.rewritten:
                    continue
                if vol.id not in cache:
                    cache[vol.id] = self.header_fault(img, [vol])
                found = cache[vol.id]
                if found is not None:
                    out[img.id] = dataclasses.replace(found, image_id=img.id)
                    break
        return out

    @functools.cached_property
    def backing_names(self) -> dict[str, str]:
        """Volume file id -> the volume its readable qcow2 header names as backing file, for
        every volume file of the repository, whatever the records say (or whether there are
        any): what a consumer really reads through. Named by the file's basename, wherever
        the reference points: keeping too much is always safe."""
        out: dict[str, str] = {}
        now_ns = time.monotonic_ns()
        for vol_id, path in self.repo.volume_files().items():
            vol = self.volumes.get(vol_id)
            if self.memo is not None and vol is not None:
                known, stem = self.memo.backing(vol, now_ns)
                if known:
                    if stem is not None:
                        out[vol_id] = stem
                    continue
            try:
                header = qcow2.read_header(path)
            except OSError:
                continue
            stem = None
            if header is not None and header.backing:
                stem = os.path.basename(header.backing).partition(".")[0]
                stem = None if stem == vol_id else stem
            if self.memo is not None and vol is not None:
                self.memo.keep_backing(vol, stem, now_ns)
            if stem is not None:
                out[vol_id] = stem
        return out

    @functools.cached_property
    def header_dependants(self) -> dict[str, set[str]]:
        """Volume id -> the volume files whose header names it as backing file."""
        out: dict[str, set[str]] = {}
        for vol_id, backing in self.backing_names.items():
            out.setdefault(backing, set()).add(vol_id)
        return out

    def kept_by_headers(self, keep: set[str]) -> set[str]:
        """``keep`` and every volume the headers of kept volumes name, all the way down."""
        out = set(keep)
        todo = list(keep)
        while todo:
            backing = self.backing_names.get(todo.pop())
            if backing is not None and backing not in out:
                out.add(backing)
                todo.append(backing)
        return out

    # -- on-disk checks ------------------------------------------------------------------------

    def header_fault(self, image: model.Image, vols: list[model.Volume]) -> Fault | None:
        """Compare each volume file with its record: a regular file, its format, its backing
        reference (chain.file_fault)."""
        for vol in vols:
            parent, parent_repo = None, None
            if vol.parent_volume_id is not None:
                parent = self.volumes.get(vol.parent_volume_id)
                if parent is None and self._elsewhere is not None:
                    found = self._elsewhere(vol.parent_volume_id)
                    if found is not None:  # a backing volume in another repository
                        parent_repo, parent = found
            fault = self.file_fault(vol, parent, parent_repo)
            if fault is not None:
                return Fault(image.id, vol.id, fault[0], relink_to=fault[1])
        return None

    def file_fault(self, vol: model.Volume, parent: model.Volume | None,
                   parent_repo: contract.Repository | None = None) -> FileFault | None:
        """chain.file_fault, skipped for a volume found sound lately with the same records
        (agent/image/memo.py); a finding of a deep check always counts."""
        own = parent_repo is None or parent_repo is self.repo
        if self.memo is not None and own and vol.id not in self.repo.findings \
                and self.memo.is_sound(vol, parent):
            return None
        fault = chain.file_fault(self.repo, vol, parent, parent_repo)
        if fault is None and own and self.memo is not None:
            self.memo.keep_sound(vol, parent)
        return fault

    def files_fault(self, image_id: str, vols: list[model.Volume],
                    cache: dict[str, FileFault | None]) -> str | None:
        """chain.files_fault of an image's walked chain, through file_fault above for the
        volumes of this repository."""
        return chain.files_fault(self.repo, vols, self.foreign_of(image_id), self.rewritten,
                                 cache, self._file_check)

    def _file_check(self, repo: contract.Repository, vol: model.Volume,
                    parent: model.Volume | None, parent_repo: contract.Repository | None
                    ) -> FileFault | None:
        if repo is not self.repo:
            return chain.file_fault(repo, vol, parent, parent_repo)
        return self.file_fault(vol, parent, parent_repo)

    def allocated(self, vol_id: str) -> int:
        vol = self.volumes.get(vol_id)
        if vol is None:
            return 0
        return fileio.allocated_bytes(self.repo.volume_path(vol.id, vol.format))
