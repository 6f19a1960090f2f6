"""What a clean fix reclaims, and reclaiming it.

Everything not needed by a live image or an unfinished operation goes: volumes of removed images
that nothing depends on any more, orphan volumes, journals of finished or aborted operations,
leftover temporary and partial files. A volume is needed while any image that is not removed has it
in its chain, or an unfinished operation names it.

Clean never deletes what a damaged or missing record might still need: every volume a kept
volume's readable qcow2 header names is kept too, whatever the records say (one lost volume record
must not cost the layer below it); while an image or volume record cannot be read, no volume data
goes at all (the record could name any of it); while a journal cannot be read, no partial file
goes; a journal whose image record cannot be read stays.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from agent import crashpoint, errors, fileio
from agent.image import inventory, model, operations
from agent.repo import contract, layout, leases

log = logging.getLogger(__name__)

# A temporary file younger than this may belong to a metadata write in flight; leave it alone.
TEMP_GRACE = 10.0
# An image's lease area is written just before its first acquire, which may come before its
# image record (a create); sanlock writes the area at every acquire and release. One that no
# record or journal names and that nobody used for this long (by the storage's clock) is
# reclaimed: 1 MiB per image ever made, on the shared storage, otherwise.
LEASE_GRACE = 600.0
# On a shared repository another host may be making something while this one scans: its
# intent, volumes and partial data appear between the scan's reads, with no lock of this host
# in between (the repository lease is for whole-repository work only, never on the path of
# ordinary calls). What the scan cannot explain -- a volume no image names, a journal whose
# image it did not see, a partial or orphan data file -- is left alone when it changed after
# the scan began (by the storage's own clock: Inventory.started), for the next clean.


@dataclasses.dataclass
class Plan:
    volumes: list[model.Volume] = dataclasses.field(default_factory=list)
    orphan_files: list[str] = dataclasses.field(default_factory=list)
    images: list[str] = dataclasses.field(default_factory=list)
    journals: list[str] = dataclasses.field(default_factory=list)
    strays: list[str] = dataclasses.field(default_factory=list)
    leases: list[str] = dataclasses.field(default_factory=list)  # image ids of lease areas
    bytes: int = 0

    def empty(self) -> bool:
        return not (self.volumes or self.orphan_files or self.images or self.journals
                    or self.strays or self.leases)

    def facts(self) -> dict[str, list[str]]:
        return {
            "volumes": sorted(v.id for v in self.volumes),
            "files": sorted(self.orphan_files + self.strays),
            "images": sorted(self.images),
            "journals": sorted(self.journals),
            "leases": sorted(self.leases),
        }


def plan(inv: inventory.Inventory, now: float | None = None) -> Plan:
    now = time.time() if now is None else now
    repo = inv.repo
    needed = inv.needed
    keep = inv.kept_by_headers(needed | set(inv.damaged_volumes))
    hold = any(d.kind in (layout.IMAGES, layout.VOLUMES) for d in inv.damage)
    hold_partials = any(d.kind == layout.JOURNAL for d in inv.damage)
    p = Plan()

    def young(path: str) -> bool:
        return repo.shared and _mtime(path) >= inv.started

    explained = _of_removed_images(inv)
    if not hold:
        p.volumes = [v for v in inv.volumes.values() if v.id not in keep
                     and (v.id in explained or not (
                         young(repo.volume_path(v.id, v.format))
                         or young(repo.volume_partial_path(v.id, v.format))
                         or young(repo.record_path(layout.VOLUMES, v.id))))]
    # A removed image's record goes with its volume, or when a live image owns that volume
    # outright (a removed snapshot absorbed by a merge, or removed before its switch).
    live_tops = {i.volume_id for i in inv.images.values() if not i.removed}
    p.images = [i.id for i in inv.images.values()
                if i.removed and ((not hold and i.volume_id not in keep)
                                  or i.volume_id in live_tops)]
    live_ids = {op.id for op in inv.live_ops}
    # A journal whose operation still runs here is one being sealed: its runner deletes it
    # in a moment (proposing it would only make a fix that is stale by the time it is sent).
    p.journals = [op_id for op_id, op in inv.ops.items()
                  if op_id not in live_ids and op_id not in inv.active
                  and op.image_id not in inv.damaged_images
                  and (op.image_id in inv.images
                       or not young(repo.record_path(layout.JOURNAL, op_id)))]
    for vol_id, path in repo.volume_files().items():
        if not hold and vol_id not in keep and vol_id not in inv.volumes and not young(path):
            p.orphan_files.append(path)
    for path in repo.stray_files():
        name = os.path.basename(path)
        if name.endswith(layout.PARTIAL):
            if hold_partials or name.split(".", 1)[0] in keep or young(path):
                continue  # an unfinished operation's data in the making
        elif now - _mtime(path) < TEMP_GRACE:
            continue
        p.strays.append(path)
    if not hold:
        p.leases = _idle_leases(inv)
    p.bytes = sum(inv.allocated(v.id) for v in p.volumes)
    p.bytes += sum(fileio.allocated_bytes(f) for f in p.orphan_files + p.strays)
    p.bytes += leases.AREA * len(p.leases)
    return p


def _idle_leases(inv: inventory.Inventory) -> list[str]:
    """The lease areas no image record or journal names, unused for LEASE_GRACE and held by
    nobody now (while an image record cannot be read, none: plan's ``hold``)."""
    if inv.repo.membership is None:
        return []
    space = inv.repo.membership.space
    named = set(inv.images) | set(inv.damaged_images) | {op.image_id for op in inv.ops.values()}
    out = []
    for image_id, path in space.image_areas().items():
        if image_id not in named and inv.started - _mtime(path) >= LEASE_GRACE \
                and not space.in_use(image_id):
            out.append(image_id)
    return out


def execute(repo: contract.Repository, p: Plan) -> int:
    """Reclaim what the plan lists; every removal is idempotent, so a crash here is harmless."""
    with repo.meta_lock:
        crashpoint.hit("clean", "volumes")
        for vol in p.volumes:
            repo.delete_volume_data(vol)
            crashpoint.hit("clean", "volume-record")
            repo.delete_volume_record(vol)
        crashpoint.hit("clean", "files")
        for path in p.orphan_files + p.strays:
            fileio.remove(path)
        crashpoint.hit("clean", "journals")
        for op_id in p.journals:
            op = repo.get_operation(op_id)
            if op is not None:
                # A rebase fix dropped without its layer put back (an agent before that was
                # done on every path): last chance, the journal is what names the layer.
                try:
                    operations.restore_backing(repo, op)
                except errors.Error as e:
                    log.warning("event=journal_kept op=%s error=%r", op_id, e.message)
                    continue  # kept, and proposed again: the rest of the clean goes on
            repo.delete_operation(op_id)
        crashpoint.hit("clean", "images")
        for image_id in p.images:
            repo.delete_image(image_id)
        if repo.membership is not None:
            for image_id in p.leases:
                contract.check_fence()
                if not repo.membership.space.reclaim(image_id, "clean"):
                    log.info("event=lease_kept image=%s reason=held", image_id)
    log.info("event=cleaned repo=%s volumes=%d files=%d images=%d journals=%d leases=%d "
             "bytes=%d", repo.uuid, len(p.volumes), len(p.orphan_files) + len(p.strays),
             len(p.images), len(p.journals), len(p.leases), p.bytes)
    return p.bytes


def _of_removed_images(inv: inventory.Inventory) -> set[str]:
    """The volumes in the chains of removed images: what a clean reclaims on purpose."""
    out: set[str] = set()
    for img in inv.images.values():
        if not img.removed:
            continue
        vol_id: str | None = img.volume_id
        while vol_id is not None and vol_id not in out:
            out.add(vol_id)
            vol = inv.volumes.get(vol_id)
            vol_id = vol.parent_volume_id if vol is not None else None
    return out


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0
