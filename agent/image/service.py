"""The image calls of the API, on top of the connected repositories.

Every data-changing call first **claims** the images it changes and those that must not change
under it (``claims``), then reads them again under the claim and decides from that state alone:
what it read before the claim was only a hint for what to claim. It then commits its intent (a
journal entry and a weak image, fsync'd) and returns; the runner does the data work. The image
record is renamed into place under the repository's metadata lock; the fsyncs are not under it
(``fileio.stage`` before it, ``fileio.deferred`` after it), so concurrent calls share them. A
refused call changes nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

from agent import errors, fileio, host
from agent.image import (
    chain,
    claims,
    inventory,
    listing,
    model,
    operations,
    runner,
    status,
)
from agent.repo import contract, layout

log = logging.getLogger(__name__)

# Largest virtual size accepted: 64 TiB, what a qcow2 with 64 KiB clusters handles comfortably.
MAX_SIZE = 64 << 40
SECTOR = 512
WRITE, READ = claims.Mode.WRITE, claims.Mode.READ


def new_id() -> str:
    return str(uuid.uuid4())


def check_size(size: int) -> None:
    if size <= 0 or size % SECTOR or size > MAX_SIZE:
        raise errors.InvalidArgument(
            f"size must be a positive multiple of {SECTOR} bytes up to {MAX_SIZE}, got {size}",
            param="size",
        )


class ImageService:
    def __init__(self, host: host.Host, runner: runner.Runner, max_depth: int = 10) -> None:
        self.host = host
        self.runner = runner
        self.max_depth = max_depth
        self.claims = host.claims

    # -- helpers -------------------------------------------------------------------------------

    def _repo(self, repo_id: str) -> contract.Repository:
        return self.host.connection(repo_id).repo

    @staticmethod
    def _image(repo: contract.Repository, image_id: str, repo_id: str) -> model.Image:
        img = repo.get_image(image_id)
        if img is None or img.removed:
            raise errors.ImageNotFound(
                f"image {image_id} is not in repository {repo_id!r}", imageId=image_id
            )
        return img

    @staticmethod
    def _usable(img: model.Image) -> None:
        if img.operation_id is not None or not img.strong:
            raise errors.ImageBroken(
                f"image {img.id} is not usable: an operation on it has not finished",
                imageId=img.id,
            )

    def _in_the_way(self, repo: contract.Repository, img: model.Image, mode: claims.Mode,
                    claim: claims.Claim, ignore: Iterable[str | None] = (),
                    chain_ids: Iterable[str] = (), give_way: bool = False,
                    advice: str = "") -> None:
        """Refuse (ImageBusy) while anyone else uses ``img`` in a way that clashes with
        ``mode``: one conflicts query over every claim, held or journaled. ``give_way``: a
        consumer or a new snapshot comes before a fix that only started: a fix idle in its
        first step is dropped (that step keeps every byte whole, and the checker proposes the
        fix again)."""
        for h in self.claims.conflicts(repo, img, mode, [claim.owner, *ignore], chain_ids):
            op = repo.get_operation(h.owner) if h.lasting else None
            if op is not None and op.kind.is_fix:
                running = self.runner.is_active(op.id)
                if give_way and not running and op.step == 0:
                    operations.release_fix(repo, op, None)
                    continue
                why = ("wait for it (getImageStatus shows its progress)" if running
                       else "run its mend fix (only metadata is left to write)" if op.step > 0
                       else "run its mend fix, or wait for it")
                raise errors.ImageBusy(
                    f"image {img.id} is being improved by fix operation {op.id} "
                    f"({op.kind.value}); {why}",
                    imageId=img.id, holder=h.owner,
                )
            raise errors.ImageBusy(
                f"image {img.id} is in use by {h.describe()}{advice}",
                imageId=img.id, holder=h.owner,
            )

    def _commit(
        self,
        repo: contract.Repository,
        op: model.Operation,
        image: model.Image,
        options: model.Options,
        staged: fileio.Staged | None = None,
    ) -> str:
        """Under the metadata lock, in a ``fileio.deferred`` block around it: the renames are
        under the lock, the wait for the directory fsync that makes them durable is not (it
        is shared with the other calls committing meanwhile). ``staged``: the intent already
        written and fsync'd, before the lock (``stage_intent``)."""
        op.auto_fix = options.auto_fix
        if staged is not None:
            repo.put_staged(staged)
        else:
            repo.put_intent(op, image)
        log.info("event=intent op=%s kind=%s image=%s auto_fix=%s", op.id, op.kind, image.id,
                 options.auto_fix)
        if options.auto_fix:
            # Under the call's claim: the operation's own claim waits the milliseconds until
            # the call lets go, and nothing can slip in between.
            self.runner.submit(repo, op)
        return image.id

    # -- create --------------------------------------------------------------------------------

    def create_virtual_disk(
        self,
        target_repo_id: str,
        size: int,
        base_snapshot_id: str | None,
        user_data: dict[str, Any],
        options: model.Options,
        *,
        new_image_id: str | None = None,
    ) -> str:
        """``new_image_id``: the id to give the disk (a retried request reuses its reserved
        id); a fresh one by default."""
        check_size(size)
        repo = self._repo(target_repo_id)
        params = model.OpParams(size=size, strategy=options.strategy, volume_id=new_id())
        image = model.Image(
            id=new_image_id or new_id(), kind=model.Kind.DISK, size=size,
            volume_id=model.need(params.volume_id, "volume"),
            user_data=user_data,
        )
        base: host.Found | None = None
        if base_snapshot_id is not None:
            # Snapshots are copied with their ids: prefer the copy in the target repository,
            # the one a thin disk can stand on, unless options pin it elsewhere.
            local = repo.get_image(base_snapshot_id)
            if local is not None and not local.removed and not options.hints \
                    and not options.participating:
                base = host.Found(target_repo_id, repo, local)
            else:
                base = self.host.find_image(base_snapshot_id, options)
        reads = [(base.repo, base.image.id)] if base is not None else []
        with self.claims.claim("a createVirtualDisk call", [(repo, image.id)], reads) as claim:
            if base is not None:
                snap = self._image(base.repo, base.image.id, base.repo_id)  # under the claim
                self._check_base(snap, size, base.repo is repo, base.repo_id, target_repo_id,
                                 options)
                self._in_the_way(base.repo, snap, READ, claim)
                params.base_image_id = snap.id
                params.base_volume_id = snap.volume_id
            op = model.Operation(new_id(), model.OpKind.CREATE_DISK, image.id, params)
            image.operation_id = op.id
            op.auto_fix = options.auto_fix
            # A new journal and a new image, made of nothing the metadata lock guards: their
            # files are written and fsync'd before the lock, and the journal is renamed into
            # place and made durable before it too (shared with the other calls' fsyncs), as
            # an operation already active, which no check cleans away; the lock is held for
            # the image record's rename alone.
            staged = repo.stage_intent(op, image)
            try:
                with self.runner.committing(op.id):
                    repo.put_staged(staged, count=1)
                    with fileio.deferred(), repo.meta_lock:
                        return self._commit(repo, op, image, options, staged)
            finally:
                staged.discard()  # nothing left once committed

    def _check_base(self, snap: model.Image, size: int, same_repo: bool, base_repo_id: str,
                    target_repo_id: str, options: model.Options) -> None:
        if snap.kind != model.Kind.SNAPSHOT:
            raise errors.WrongImageKind(
                f"baseSnapshotId {snap.id} is a {snap.kind.value}, not a snapshot; take a "
                "snapshot of it first",
                param="baseSnapshotId",
            )
        self._usable(snap)
        if size < snap.size:
            raise errors.InvalidArgument(
                f"size {size} is smaller than the snapshot's {snap.size}", param="size"
            )
        if not same_repo and options.strategy == model.Strategy.SPACE:
            raise errors.InvalidArgument(
                f"snapshot {snap.id} is in repository {base_repo_id!r}; a thin disk needs it "
                f"in {target_repo_id!r}: copy it there first, or use strategy=performance",
                param="baseSnapshotId",
            )

    def create_snapshot(
        self,
        target_repo_id: str,
        disk_id: str,
        user_data: dict[str, Any],
        options: model.Options,
        *,
        new_image_id: str | None = None,
    ) -> str:
        """``new_image_id``: the id to give the snapshot; a fresh one by default."""
        repo = self._repo(target_repo_id)
        snap_id = new_image_id or new_id()
        with self.claims.claim("a createSnapshot call", [(repo, disk_id), (repo, snap_id)]) \
                as claim, fileio.deferred(), repo.meta_lock:
            disk = repo.get_image(disk_id)
            if disk is None or disk.removed:
                where = ""
                try:
                    found = self.host.find_image(disk_id, options)
                    where = f"; it is in repository {found.repo_id!r}"
                except errors.ImageNotFound:
                    pass
                raise errors.ImageNotFound(
                    f"disk {disk_id} is not in repository {target_repo_id!r}{where}",
                    imageId=disk_id,
                )
            if disk.kind != model.Kind.DISK:
                raise errors.WrongImageKind(
                    f"{disk_id} is a snapshot; snapshots are immutable, snapshot a disk instead",
                    param="baseVirtualDiskId",
                )
            self._usable(disk)
            if disk.prepared_by:
                raise errors.ImageBusy(
                    f"disk {disk_id} is prepared on host(s) {disk.prepared_by}; tear it down "
                    "before taking a snapshot",
                    imageId=disk_id,
                )
            vols = chain.volumes(repo, disk.volume_id)
            self._in_the_way(repo, disk, WRITE, claim, chain_ids=[v.id for v in vols],
                             give_way=True)
            disk = self._image(repo, disk_id, target_repo_id)  # a fix given way wrote it
            params = model.OpParams(size=disk.size, disk_id=disk.id,
                                    old_volume_id=disk.volume_id, new_volume_id=new_id())
            snap = model.Image(
                id=snap_id, kind=model.Kind.SNAPSHOT, size=disk.size, volume_id=disk.volume_id,
                user_data=user_data,
            )
            op = model.Operation(new_id(), model.OpKind.CREATE_SNAPSHOT, snap.id, params)
            snap.operation_id = op.id
            return self._commit(repo, op, snap, options)

    def copy_image(
        self,
        target_repo_id: str,
        image_id: str,
        base_image_id: str | None,
        user_data: dict[str, Any],
        options: model.Options,
        *,
        new_image_id: str | None = None,
    ) -> str:
        """``new_image_id``: the id to give a disk's copy; a fresh one by default (a snapshot's
        copy keeps the snapshot's id)."""
        repo = self._repo(target_repo_id)
        hint = self.host.find_image(image_id, options)
        keep_id = hint.image.kind == model.Kind.SNAPSHOT
        target_id = image_id if keep_id else new_image_id or new_id()
        reads = [(hint.repo, image_id)]
        if base_image_id is not None:
            if base_image_id == image_id:
                raise errors.InvalidArgument(
                    "baseImageId must differ from imageId", param="baseImageId"
                )
            reads.append((repo, base_image_id))
        with self.claims.claim("a copyImage call", [(repo, target_id)], reads) as claim:
            src = self._image(hint.repo, image_id, hint.repo_id)  # under the claim
            self._usable(src)
            self._sound(hint.repo, src, strict=False)
            if src.kind == model.Kind.DISK and src.prepared_by:
                raise errors.ImageBusy(
                    f"disk {image_id} is in use (prepared); copy a snapshot of it instead",
                    imageId=image_id,
                )
            if not (keep_id and hint.repo is repo):
                self._in_the_way(hint.repo, src, READ, claim)
            volume_id = new_id()
            params = model.OpParams(size=src.size, strategy=options.strategy,
                                    volume_id=volume_id, source_id=image_id)
            with fileio.deferred(), repo.meta_lock:
                if keep_id:
                    existing = repo.get_image(image_id)
                    if existing is not None and not existing.removed:
                        log.info("event=copy_noop image=%s repo=%s", image_id, target_repo_id)
                        return image_id  # same id, same bits: already there (or on its way)
                    if existing is not None:
                        return self._revive(repo, existing, target_repo_id, claim)
                if base_image_id is not None:
                    base = self._copy_base(repo, base_image_id, src, target_repo_id, claim)
                    params.base_image_id = base.id
                    params.base_volume_id = base.volume_id
                image = model.Image(
                    id=target_id,
                    kind=src.kind,
                    size=src.size,
                    volume_id=volume_id,
                    user_data={**src.user_data, **user_data},
                )
                op = model.Operation(new_id(), model.OpKind.COPY, image.id, params)
                image.operation_id = op.id
                return self._commit(repo, op, image, options)

    def _copy_base(self, repo: contract.Repository, base_id: str, src: model.Image,
                   repo_id: str, claim: claims.Claim) -> model.Image:
        base = repo.get_image(base_id)
        if base is None or base.removed:
            raise errors.ImageNotFound(
                f"baseImageId {base_id} must exist in the target repository {repo_id!r}; "
                "copy it there first",
                imageId=base_id,
            )
        if base.kind != model.Kind.SNAPSHOT:
            raise errors.WrongImageKind(
                f"baseImageId {base_id} is a disk; only a snapshot can be a base",
                param="baseImageId",
            )
        self._usable(base)
        self._sound(repo, base, strict=False)
        if base.size > src.size:
            raise errors.InvalidArgument(
                f"base {base_id} is larger than image {src.id}", param="baseImageId",
            )
        self._in_the_way(repo, base, READ, claim)
        return base

    def _revive(self, repo: contract.Repository, snap: model.Image, repo_id: str,
                claim: claims.Claim) -> str:
        """Copying a removed snapshot back: its record and bytes are still here (a disk needs
        them), and the same id means the same bits, so it is made strong again in place."""
        vols, fault = chain.walk(snap.volume_id, repo.get_volume, repo.get_image)
        busy = self.claims.conflicts(repo, snap, WRITE, [claim.owner],
                                     [v.id for v in vols])
        whole = fault is None and snap.operation_id is None and not busy \
            and not snap.absorbing \
            and all(layout.file_problem(repo.volume_path(v.id, v.format)) is None for v in vols)
        if not whole:
            raise errors.ImageBusy(
                f"a removed copy of {snap.id} in {repo_id!r} is being reclaimed or merged"
                + (f" (by {busy[0].describe()})" if busy else "")
                + "; run the clean fix, then copy again",
                imageId=snap.id,
            )
        snap.removed = False
        snap.strong = True
        repo.put_image(snap)
        log.info("event=revived image=%s repo=%s", snap.id, repo_id)
        return snap.id

    # -- remove, stop --------------------------------------------------------------------------

    def remove_image(self, repo_id: str, image_id: str) -> None:
        repo = self._repo(repo_id)
        img = self._image(repo, image_id, repo_id)
        # Removing an image aborts its operation (a broken image being made) or its fix (a
        # merge or optimize: every step of those keeps the bytes whole, so stopping is safe).
        # Stopping waits for the worker, which claims the image: so before the claim, and
        # every check is made again under it, where nothing can slip in between.
        if not img.prepared_by:
            for op_id in (img.operation_id, img.fix_id):
                if op_id is not None:
                    self.runner.stop(op_id)
        with self.claims.claim("a removeImage call", [(repo, image_id)]) as claim, \
                repo.meta_lock:
            img = self._image(repo, image_id, repo_id)
            self._removable(repo, img, claim)
            fix = repo.get_operation(img.fix_id) if img.fix_id is not None else None
            if fix is not None:
                # Before the image lets go of its fix: a layer others may read through, and
                # once the link is gone, nothing would undo a cut rebase any more.
                operations.restore_backing(repo, fix)
            img.removed = True
            img.strong = False
            op_id, img.operation_id = img.operation_id, None
            fix_id, img.fix_id = img.fix_id, None
            repo.put_image(img)
            for gone in (op_id, fix_id):
                if gone is not None:
                    repo.delete_operation(gone)
        log.info("event=removed image=%s repo=%s aborted_op=%s aborted_fix=%s", image_id,
                 repo_id, op_id, fix_id)

    def _removable(self, repo: contract.Repository, img: model.Image,
                   claim: claims.Claim) -> None:
        if img.prepared_by:
            raise errors.ImageBusy(
                f"image {img.id} is prepared on host(s) {img.prepared_by}; tear it down first",
                imageId=img.id,
            )
        fix = repo.get_operation(img.fix_id) if img.fix_id else None
        if fix is not None and fix.step > 0:
            # Past its data step a fix has rewritten a layer's backing reference: only its
            # remaining metadata steps make the records agree again, so it finishes first.
            raise errors.ImageBusy(
                f"image {img.id} has a fix ({fix.kind.value}) with only metadata left; wait "
                "for it, or run its mend fix, then remove the image",
                imageId=img.id,
            )
        for op_id in (img.operation_id, img.fix_id):
            if op_id is not None and self.runner.is_active(op_id):
                raise errors.ImageBusy(f"operation {op_id} of image {img.id} started again "
                                       "meanwhile; remove it again", imageId=img.id)
        # Its own operation and fix end with it; anyone else (a snapshot of this disk being
        # taken, a copy or an independent disk reading it by id in any repository) comes first.
        self._in_the_way(repo, img, WRITE, claim, [img.operation_id, img.fix_id],
                         advice="; let it finish (or remove that image) first")

    def stop_operation(self, repo_id: str, image_id: str) -> None:
        repo = self._repo(repo_id)
        for _ in range(3):
            img = self._image(repo, image_id, repo_id)
            op_id = img.operation_id or img.fix_id
            if op_id is None:
                raise errors.NoOperation(f"image {image_id} has no operation to stop")
            if self.runner.stop(op_id):
                return
            with self.claims.claim("a stopOperation call", [(repo, image_id)]), repo.meta_lock:
                img = self._image(repo, image_id, repo_id)
                if (img.operation_id or img.fix_id) != op_id or self.runner.is_active(op_id):
                    continue  # started (by a mend) or finished meanwhile: look again
                op = repo.get_operation(op_id)
                if op is None:
                    raise errors.NoOperation(f"image {image_id} has no operation to stop")
                op.state = model.OpState.STOPPED
                op.progress.last_error = "stopped by client"
                repo.put_operation(op)
                return
        raise errors.ImageBusy(f"the operation of image {image_id} keeps being restarted; "
                               "stop it again", imageId=image_id)


    # -- read ----------------------------------------------------------------------------------

    def _op(self, repo: contract.Repository, op_id: str | None,
            journal: dict[str, model.Operation] | None = None) -> model.Operation | None:
        """An operation's freshest state: live in this process, else from the journal."""
        if op_id is None:
            return None
        live = self.runner.live(op_id)
        if live is not None:
            return live
        if journal is not None:
            return journal.get(op_id)
        return repo.get_operation(op_id)

    def _walk(self, repo: contract.Repository, img: model.Image
              ) -> tuple[list[model.Volume], str | None, dict[str, contract.Repository]]:
        """The image's chain, following backing volumes into other connected repositories;
        which volumes live elsewhere, and where. A fault of the records, else of the files
        (chain.files_fault), but for layers a fix is rewriting."""
        lookup = chain.Lookup(repo.get_volume, self.host.find_volume)
        vols, fault = chain.walk(img.volume_id, lookup, repo.get_image)
        if fault is None and img.operation_id is None:
            fault = chain.files_fault(repo, vols, lookup.foreign)
            if fault is not None and chain.rewritten(repo):
                fault = chain.files_fault(repo, vols, lookup.foreign, chain.rewritten(repo))
        return vols, fault, lookup.foreign

    def _settled_walk(self, repo: contract.Repository, img: model.Image
                      ) -> tuple[model.Image, list[model.Volume], str | None,
                                 dict[str, contract.Repository]]:
        """_walk for a reader that takes no claim (status, info): the records of a chain are
        read one by one while a fix may be finishing on it, so a fault seen may be torn (the
        layer's record read before its relink, the fix's journal after its seal: on GlusterFS
        those reads are slow enough to fall either side). Every finish writes the image record,
        so a fault is believed only when the image record did not change meanwhile."""
        for _ in range(5):
            vols, fault, elsewhere = self._walk(repo, img)
            if fault is None:
                break
            fresh = repo.get_image(img.id)
            if fresh is None or fresh.generation == img.generation:
                break
            img = fresh
        return img, vols, fault, elsewhere

    def _sound(self, repo: contract.Repository, img: model.Image, strict: bool) -> None:
        """Refuse a broken image (ImageBroken): a fault of its records or of its files.
        ``strict``: even a layer a fix rewrites (after _give_way, none may be left)."""
        lookup = chain.Lookup(repo.get_volume, self.host.find_volume)
        vols, fault = chain.walk(img.volume_id, lookup, repo.get_image)
        if fault is not None:
            raise errors.ImageBroken(f"image {img.id} cannot be used: {fault}", imageId=img.id)
        chain.check_files(repo, img.id, vols, lookup.foreign,
                          frozenset() if strict else chain.rewritten(repo))

    def _facts(self, repo: contract.Repository, img: model.Image,
               vols: list[model.Volume], fault: str | None,
               journal: dict[str, model.Operation] | None = None,
               foreign: bool = False) -> status.Facts:
        journal_error = None
        try:
            op = self._op(repo, img.operation_id, journal)
        except errors.RecordDamaged as e:  # the image is broken; its status says why
            op, journal_error = None, e.message
        try:
            fix = self._op(repo, img.fix_id, journal)
        except errors.RecordDamaged as e:
            fix, fault = None, fault or e.message
        if journal_error is None and (
                (img.operation_id is not None and op is None)
                or (img.fix_id is not None and fix is None)):
            # The operation finished between reading the image and reading its journal (the
            # seal writes the image, then deletes the journal): read the image again.
            fresh = repo.get_image(img.id)
            if fresh is not None and (fresh.operation_id, fresh.fix_id) != (img.operation_id,
                                                                           img.fix_id):
                vols, fault, elsewhere = self._walk(repo, fresh)
                return self._facts(repo, fresh, vols, fault, foreign=bool(elsewhere))
        running = any(o is not None and self.runner.is_active(o.id) for o in (op, fix))
        running_on = None
        if not running and (op is not None or fix is not None):
            holder = self.claims.working_elsewhere(repo, img.id)
            if holder is not None:
                running, running_on = True, holder.to_dict()
        if img.operation_id is not None:
            fault = None  # an image being made has no chain yet: its operation says it all
        return status.Facts(img, op, fix, running, fault, len(vols), self.max_depth, foreign,
                            journal_error, running_on)

    def image_status(self, repo_id: str, image_id: str) -> dict[str, Any]:
        repo = self._repo(repo_id)
        op = self.runner.making(repo, image_id)
        if op is not None:
            return status.making(image_id, op)
        img, vols, fault, elsewhere = self._settled_walk(repo, self._image(repo, image_id,
                                                                           repo_id))
        return status.describe(self._facts(repo, img, vols, fault, foreign=bool(elsewhere)))

    def wait(self, repo_id: str, image_ids: list[str], timeout: float
             ) -> list[dict[str, Any] | None]:
        """Wait until no operation of this host runs on these images, at most ``timeout``
        seconds; then their statuses, in order (None for an image that is not there: a
        removed snapshot a merge folded away)."""
        repo = self._repo(repo_id)
        op_ids: list[str] = []
        for image_id in image_ids:
            making = self.runner.making(repo, image_id)
            if making is not None:
                op_ids.append(making.id)
                continue
            try:
                img = repo.get_image(image_id)
            except errors.RecordDamaged:
                continue  # its status says so
            if img is not None:
                op_ids += [o for o in (img.operation_id, img.fix_id) if o is not None]
        self.runner.wait(op_ids, timeout)
        out: list[dict[str, Any] | None] = []
        for image_id in image_ids:
            try:
                out.append(self.image_status(repo_id, image_id))
            except errors.ImageNotFound:
                out.append(None)
        return out

    def _summary(self, repo: contract.Repository, img: model.Image,
                 vols: list[model.Volume], fault: str | None,
                 journal: dict[str, model.Operation] | None = None,
                 foreign: bool = False) -> dict[str, Any]:
        st = status.describe(self._facts(repo, img, vols, fault, journal, foreign))
        return {
            "imageId": img.id,
            "kind": img.kind.value,
            "size": img.size,
            "status": st["status"],
            "userData": img.user_data,
            "parentId": vols[0].parent_image_id if vols else None,
            "created": img.created,
            "prepared": bool(img.prepared_by),
        }

    def list_images(self, repo_id: str, options: dict[str, Any]
                    ) -> list[dict[str, Any]] | dict[str, Any]:
        """The images (agent.image.listing: filters, order, pages); with ``withWarnings``, the
        warnings naming each record that cannot be read (skipped, and logged, either way)."""
        query = listing.parse(options)
        repo = self._repo(repo_id)
        inv = inventory.Inventory(repo, set(), self.host.find_volume)
        files: dict[str, chain.FileFault | None] = {}  # layers shared by the images listed
        ordered, known = self._rows(repo, inv)

        def summarize(img: model.Image) -> dict[str, Any]:
            kept = known.get(img.id)
            return dict(kept) if kept is not None else self._describe(repo, inv, img, files)[0]

        # Filters, order and pages on the records (agent/image/listing.py); a summary only for
        # the images a page considers, and most from memory.
        rows, next_cursor = listing.page(ordered, query, summarize)
        return listing.answer(query, rows, next_cursor,
                              lambda: [d.to_dict() for d in inv.damage])

    def _rows(self, repo: contract.Repository, inv: inventory.Inventory
              ) -> tuple[list[model.Image], dict[str, dict[str, Any] | None]]:
        """Every image that is not removed, in listing order (created, then id), and by id
        its summary when that follows from its records alone: a settled, sound image's,
        kept while its records stay the same (agent/image/memo.py). What runs, or is wrong,
        is described afresh by each listing (None here)."""
        now_ns = time.monotonic_ns()
        m = inv.memo
        if m is None:
            return self._derive_rows(repo, inv, now_ns)
        kept = m.listing(inv.scanned, repo.findings, now_ns)
        if kept is not None:
            return kept
        # One derivation at a time: a listing that comes while another derives the same rows
        # (the connect's warm-up) waits for them rather than doing the work beside it.
        with m.deriving:
            kept = m.listing(inv.scanned, repo.findings, now_ns)
            return kept if kept is not None else self._derive_rows(repo, inv, now_ns)

    def _derive_rows(self, repo: contract.Repository, inv: inventory.Inventory, now_ns: int
                     ) -> tuple[list[model.Image], dict[str, dict[str, Any] | None]]:
        m = inv.memo
        ordered = sorted((i for i in inv.images.values() if not i.removed),
                         key=listing.key)
        known: dict[str, dict[str, Any] | None] = {}
        files: dict[str, chain.FileFault | None] = {}
        for img in ordered:
            summary, static = self._describe(repo, inv, img, files, now_ns)
            known[img.id] = summary if static else None
        if m is not None:
            m.keep_listing(inv.scanned, repo.findings, now_ns, (ordered, known))
        return ordered, known

    def _describe(self, repo: contract.Repository, inv: inventory.Inventory,
                  img: model.Image, files: dict[str, chain.FileFault | None],
                  now_ns: int | None = None) -> tuple[dict[str, Any], bool]:
        """An image's summary in a listing, and whether it follows from its records alone
        (settled and sound: then kept per image, see ``_rows``)."""
        vols, fault = inv.chain(img)
        if fault is None and img.operation_id is None:
            fault = inv.files_fault(img.id, vols, files)
        foreign = bool(inv.foreign_of(img.id))
        static = (fault is None and not foreign and img.operation_id is None
                  and img.fix_id is None and not any(v.id in repo.findings for v in vols))
        m = inv.memo
        key = (img, vols)
        if static and m is not None and now_ns is not None:
            kept = m.summary(img.id, key, now_ns)
            if kept is not None:
                return kept, True
        summary = self._summary(repo, img, vols, fault, inv.ops, foreign)
        if static and m is not None and now_ns is not None:
            m.keep_summary(img.id, key, summary, now_ns)
        return summary, static

    def image_info(self, repo_id: str, image_id: str) -> dict[str, Any]:
        repo = self._repo(repo_id)
        img, vols, fault, elsewhere = self._settled_walk(repo, self._image(repo, image_id,
                                                                           repo_id))
        info = self._summary(repo, img, vols, fault, foreign=bool(elsewhere))
        info["chain"] = chain.image_ids(vols, img.id) if vols else [img.id]
        info["depth"] = len(vols)
        # The bytes this image holds itself: its top volume (lower layers are shared).
        info["allocated"] = (
            fileio.allocated_bytes(repo.volume_path(vols[0].id, vols[0].format)) if vols else 0
        )
        if fault is not None:
            info["chainError"] = fault
        info["generation"] = img.generation
        info["strong"] = img.strong
        return info

    def set_user_data(self, repo_id: str, image_id: str, user_data: dict[str, Any]) -> None:
        repo = self._repo(repo_id)
        self._image(repo, image_id, repo_id)  # no lease area is made for an unknown image
        with self.claims.record_change(repo, image_id, "a setImageUserData call"), \
                repo.meta_lock:
            img = self._image(repo, image_id, repo_id)
            img.user_data = user_data
            repo.put_image(img)

    # -- prepare -------------------------------------------------------------------------------

    def prepare(self, repo_id: str, image_id: str) -> dict[str, Any]:
        repo = self._repo(repo_id)
        hint = self._image(repo, image_id, repo_id)
        # A consumer writes a disk, and only reads a snapshot.
        mode = WRITE if hint.kind == model.Kind.DISK else READ
        with self.claims.claim("a prepareImage call", [(repo, image_id)] if mode == WRITE
                               else [], [(repo, image_id)] if mode == READ else []) as claim, \
                repo.meta_lock:
            img = self._image(repo, image_id, repo_id)
            self._usable(img)
            vols, fault, elsewhere = self._walk(repo, img)
            if fault is not None:
                raise errors.ImageBroken(f"image {image_id} cannot be used: {fault}",
                                         imageId=image_id)
            # Other consumers are not in the way here: a VM moving between hosts has the
            # image prepared on both for a moment.
            consumers = [f"consumer:{h}" for h in img.prepared_by]
            self._in_the_way(repo, img, mode, claim, consumers, [v.id for v in vols],
                             give_way=True)
            img = self._image(repo, image_id, repo_id)  # a fix given way may have written it
            # Only regular files of their repositories whose headers name what the records
            # say are handed to a consumer (a planted file is never followed).
            chain.check_files(repo, image_id, vols, elsewhere)
            lease = self.claims.hold_for_consumer(repo, image_id)
            if self.host.host_id not in img.prepared_by:
                img.prepared_by.append(self.host.host_id)
                repo.put_image(img)
        links = [
            {"path": elsewhere.get(v.id, repo).volume_path(v.id, v.format),
             "format": v.format.value}
            for v in vols
        ]
        return {
            "imageId": img.id,
            "path": links[0]["path"],
            "format": links[0]["format"],
            "readonly": img.kind == model.Kind.SNAPSHOT,
            "chain": links,
            # A local repository needs no lease; on a shared one, the sanlock resource this
            # host holds for the consumer until teardownImage.
            "lease": lease,
        }

    def teardown(self, repo_id: str, image_id: str) -> bool:
        """Return False when the image was not prepared here (an explicit "no change")."""
        repo = self._repo(repo_id)
        hint = self._image(repo, image_id, repo_id)
        mine = [(repo, image_id)]
        with self.claims.claim("a teardownImage call", mine if hint.kind == model.Kind.DISK
                               else [], [] if hint.kind == model.Kind.DISK else mine), \
                repo.meta_lock:
            img = self._image(repo, image_id, repo_id)
            if self.host.host_id not in img.prepared_by:
                return False
            img.prepared_by.remove(self.host.host_id)
            repo.put_image(img)
            self.claims.let_consumer_go(repo, image_id)
            return True
