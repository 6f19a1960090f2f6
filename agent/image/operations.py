"""The steps of every journaled operation.

Each step is idempotent and decides what is left to do from the repository alone, so any host can
run it again after a crash at any point. A step that makes a volume writes its data to
``<volume>.partial``, fsyncs it and renames it into place before it writes the volume record:
a final name always means complete data.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable

from agent import command, errors, fileio, host, qcow2, qemuimg
from agent.image import chain, claims, model
from agent.repo import contract

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Context:
    host: host.Host
    repo: contract.Repository  # the repository holding the journal and the target image
    op: model.Operation
    cancel: command.Cancel
    report: command.ProgressCallback  # percent of the running step
    persist: Callable[[], None]  # write the journal now: a quick step found it has data to move
    claim: claims.Claim  # what the operation owns while it runs: checked before each record write

    @property
    def direct(self) -> bool:
        # Reads may come from another repository; O_DIRECT needs both ends to support it.
        return self.repo.direct_io and all(c.repo.direct_io for c in self.host.connections())


Step = Callable[[Context], None]


def materialize(
    repo: contract.Repository, vol: model.Volume, produce: Callable[[str], None]
) -> None:
    """Make volume ``vol`` exist with complete data, producing it into a partial file if needed."""
    final = repo.volume_path(vol.id, vol.format)
    if not os.path.exists(final):
        partial = repo.volume_partial_path(vol.id, vol.format)
        fileio.remove(partial)  # an earlier attempt's leftovers: start the data over
        # Record and data are renamed into place in one directory, made durable by one fsync
        # of it. A crash may keep either rename alone: a record without data makes the data
        # again (the final name is missing), data without a record gets its record below.
        try:
            produce(partial)
            repo.put_volume(vol, sync_dir=False, data=partial)  # record and data fsync'd at once
        except BaseException:
            # Out of space or stopped: give the space back; the data is made again next time.
            fileio.remove(partial)
            raise
        contract.check_fence()  # the data's rename is a write like the record's
        os.rename(partial, final)
        fileio.fsync_dir(os.path.dirname(final))
    elif repo.get_volume(vol.id) != vol:
        repo.put_volume(vol)


def _clone(src: str, dst: str, src_fmt: model.VolumeFormat, ctx: Context) -> None:
    """An independent copy of a single-volume image, always a qcow2 (what its record says): a
    reflink where the file system can and the source is a qcow2 too."""
    if ctx.repo.reflink and src_fmt == model.VolumeFormat.QCOW2:
        try:
            ctx.repo.clone(src, dst)  # one ioctl: a `cp --reflink` process costs more than it
            log.info("event=reflink dst=%s", dst)
            return  # no progress to report: a report would cost a journal write
        except OSError as e:
            # The source is on another file system (EXDEV), or this one cannot (EINVAL on a
            # btrfs NOCOW file): copy, and say in the journal first that data is moving.
            log.info("event=reflink_refused dst=%s error=%r", dst, e.strerror)
            fileio.remove(dst)
            ctx.persist()
    qemuimg.convert(src, dst, "qcow2", src_fmt=src_fmt.value, progress=ctx.report,
                    cancel=ctx.cancel, direct=ctx.direct)


def _full_copy(top_repo: contract.Repository, vols: list[model.Volume], dst: str,
               ctx: Context) -> None:
    top = vols[0]
    src = top_repo.volume_file(top)
    if len(vols) == 1:
        _clone(src, dst, top.format, ctx)
    else:
        qemuimg.convert(src, dst, "qcow2", src_fmt=top.format.value, progress=ctx.report,
                        cancel=ctx.cancel, direct=ctx.direct)


# -- createVirtualDisk ---------------------------------------------------------------------------


def quick(repo: contract.Repository, op: model.Operation) -> bool:
    """Whether an operation is over in milliseconds: it writes an empty qcow2 (a snapshot, a
    thin or empty disk) or, where the file system clones, a performance disk from a one-volume
    snapshot of the same repository (a reflink)."""
    if op.kind == model.OpKind.CREATE_SNAPSHOT:
        return True
    if op.kind != model.OpKind.CREATE_DISK:
        return False
    p = op.params
    if p.strategy == model.Strategy.SPACE or p.base_volume_id is None:
        return True
    if not repo.reflink or p.base_image_id is None:
        return False
    snap, base = repo.get_image(p.base_image_id), repo.get_volume(p.base_volume_id)
    return (snap is not None and snap.volume_id == p.base_volume_id
            and base is not None and base.parent_volume_id is None)


def create_volume(ctx: Context) -> None:
    p = ctx.op.params
    independent = p.strategy == model.Strategy.PERFORMANCE
    base_vol_id = p.base_volume_id
    vol = model.Volume(
        id=model.need(p.volume_id, "volume"),
        format=model.VolumeFormat.QCOW2,
        parent_volume_id=None if independent else base_vol_id,
        parent_image_id=None if independent else p.base_image_id,
        size=p.size,
    )

    def produce(partial: str) -> None:
        if base_vol_id is None:
            qcow2.create(partial, p.size)
        elif not independent:
            base = _volume(ctx.repo, base_vol_id)
            qcow2.create(partial, p.size, ctx.repo.backing_reference(base.id, base.format),
                         base.format.value)
        else:
            base_repo, base_chain = _source_chain(ctx, model.need(p.base_image_id, "base"))
            _full_copy(base_repo, base_chain, partial, ctx)
            header = qcow2.read_header(partial)
            if header is not None and header.size < p.size:
                qemuimg.resize(partial, p.size, "qcow2")  # a disk may be larger than its snapshot

    materialize(ctx.repo, vol, produce)


# -- createSnapshot ------------------------------------------------------------------------------


def create_overlay(ctx: Context) -> None:
    p = ctx.op.params
    old = _volume(ctx.repo, model.need(p.old_volume_id, "old volume"))
    vol = model.Volume(
        id=model.need(p.new_volume_id, "new volume"),
        format=model.VolumeFormat.QCOW2,
        parent_volume_id=old.id,
        parent_image_id=ctx.op.image_id,
        size=p.size,
    )
    materialize(
        ctx.repo,
        vol,
        lambda partial: qcow2.create(
            partial, p.size, ctx.repo.backing_reference(old.id, old.format), old.format.value
        ),
    )


def switch(ctx: Context) -> None:
    """Re-point the disk at its new top volume: the one write that takes the snapshot."""
    p = ctx.op.params
    disk_id, new = model.need(p.disk_id, "disk"), model.need(p.new_volume_id, "new volume")
    with ctx.repo.meta_lock:
        disk = ctx.repo.get_image(disk_id)
        if disk is None:
            raise errors.ImageNotFound(f"disk {disk_id} of this snapshot is gone")
        if disk.volume_id == new:
            return  # done before a crash
        if disk.volume_id != p.old_volume_id:
            raise errors.ImageBroken(
                f"disk {disk.id} moved to volume {disk.volume_id} during the snapshot"
            )
        disk.volume_id = new
        ctx.claim.check()
        ctx.repo.put_image(disk)


# -- copyImage -----------------------------------------------------------------------------------


def copy_data(ctx: Context) -> None:
    p = ctx.op.params
    src_repo, src_chain = _source_chain(ctx, model.need(p.source_id, "source"))
    base_vol_id = p.base_volume_id
    vol = model.Volume(
        id=model.need(p.volume_id, "volume"),
        format=model.VolumeFormat.QCOW2,
        parent_volume_id=base_vol_id,
        parent_image_id=p.base_image_id,
        size=p.size,
    )
    top = src_chain[0]
    top_path = src_repo.volume_file(top)

    def produce(partial: str) -> None:
        if base_vol_id is None:
            _full_copy(src_repo, src_chain, partial, ctx)
            return
        base = _volume(ctx.repo, base_vol_id)
        base_ref = ctx.repo.backing_reference(base.id, base.format)
        if len(src_chain) > 1 and top.parent_image_id == p.base_image_id:
            # The source sits directly on (its copy of) the base snapshot, which has the same
            # id and so the same bits: copy only the top volume's clusters.
            qemuimg.convert(
                top_path, partial, "qcow2", src_fmt=top.format.value, backing=base_ref,
                backing_fmt=base.format.value,
                progress=ctx.report, cancel=ctx.cancel, direct=ctx.direct,
            )
        else:
            # General case: an empty overlay on the source, then a safe rebase onto the base,
            # which writes exactly the clusters whose content differs from the base.
            qcow2.create(partial, p.size, top_path, top.format.value)
            qemuimg.rebase(partial, base_ref, base.format.value,
                           progress=ctx.report, cancel=ctx.cancel, direct=ctx.direct)

    materialize(ctx.repo, vol, produce)


# -- fixes: merge, optimize -------------------------------------------------------------------
# Each rewrites one volume in place, in a way that keeps every image reading through it on the
# same bytes at every moment: commit copies clusters the upper layer already overrides; a safe
# rebase copies into a layer exactly what its old backing chain gave it. A crash at any point
# leaves every image intact, and running the step again finishes it.


def commit_down(ctx: Context) -> None:
    """Merge by commit: the upper layer's clusters into the removed snapshot's volume."""
    p = ctx.op.params
    upper = _volume(ctx.repo, model.need(p.upper_volume_id, "upper volume"))
    lower = _volume(ctx.repo, model.need(p.lower_volume_id, "lower volume"))
    ctx.repo.volume_file(lower)  # commit writes into what upper's header names: that, only
    qemuimg.commit(_layer(ctx, upper), progress=ctx.report, cancel=ctx.cancel,
                   direct=ctx.direct)


def switch_down(ctx: Context) -> None:
    """Merge by commit: the image now reads from the lower volume, which holds its bytes."""
    p = ctx.op.params
    lower = model.need(p.lower_volume_id, "lower volume")
    with ctx.repo.meta_lock:
        img = ctx.repo.get_image(ctx.op.image_id)
        if img is None:
            raise errors.ImageNotFound(f"image {ctx.op.image_id} is gone")
        if img.volume_id == lower:
            return
        if img.volume_id != p.upper_volume_id:
            raise errors.ImageBroken(f"image {img.id} moved to volume {img.volume_id}")
        img.volume_id = lower
        ctx.claim.check()
        ctx.repo.put_image(img)


# Fixes whose rebase gives the layer a backing that reads differently (a merge by rebase folds
# the removed snapshot in, a flatten the layers between). optimizeBacking's new backing is a
# complete copy of the old one: a header that names it reads the same bytes either way.
_MOVES_BACKING = frozenset({model.OpKind.MERGE_REBASE, model.OpKind.FLATTEN})


def rebase_in_place(ctx: Context) -> None:
    """Merge by rebase, or flatten: the layer takes in what its old backing gave it."""
    p = ctx.op.params
    vol = _volume(ctx.repo, model.need(p.rewrites, "volume to rewrite"))
    path = ctx.repo.volume_file(vol)
    ref, fmt = _backing_of(ctx.repo, p.new_parent_volume_id)
    if ctx.op.kind in _MOVES_BACKING:
        # A header that already names the new backing does not prove the rebase done (see
        # restore_backing): start again from where the record says the layer stands.
        restore_backing(ctx.repo, ctx.op, ctx.cancel)
        _layer(ctx, vol)  # the old chain it reads through is the one the records say
    else:
        header = qcow2.read_header(path)
        if header is not None and (header.backing or "") == ref:
            return  # done before a crash, or cut after its header: the same bytes either way
    qemuimg.rebase(path, ref, fmt, progress=ctx.report, cancel=ctx.cancel, direct=ctx.direct)


def restore_backing(repo: contract.Repository, op: model.Operation,
                    cancel: command.Cancel | None = None) -> None:
    """Point the layer a rebase fix rewrites back at the backing its record names (header
    only), if a cut rebase moved it.

    qemu-img rebase writes the new backing into the header before it flushes the L2 tables and
    refcounts of the clusters it copied (qemu 7.2, seen with strace): cut in between (kill -9,
    a stop, a crash), the header names the new backing over a layer that lost those clusters'
    mappings. Until the fix's relink step, the record still names the old backing, which holds
    those bytes, and the fix keeps it from being cleaned: read through it again, the layer reads
    as before (what it did map is the same either way). So a fix resumed in its first step
    starts from there, and a fix dropped in its first step leaves the layer so."""
    if op.kind not in _MOVES_BACKING or op.params.rewrites is None:
        return
    vol = repo.get_volume(op.params.rewrites)
    if vol is None:
        return
    path = repo.volume_path(vol.id, vol.format)
    if not os.path.lexists(path):
        return
    path = repo.volume_file(vol)  # a planted symlink or FIFO is never followed
    try:
        header = qcow2.read_header(path)
    except FileNotFoundError:
        return
    if header is None:
        raise errors.ImageBroken(f"volume {vol.id} is not a qcow2 file any more")
    ref, fmt = _backing_of(repo, vol.parent_volume_id)
    if os.path.basename(header.backing or "") == ref:
        return  # where the record says (possibly by another spelling, which a mend relinks)
    log.warning("event=rebase_undone volume=%s header=%r record=%r", vol.id, header.backing, ref)
    # Header only: no cluster is read, so only this file's O_DIRECT matters.
    qemuimg.rebase(path, ref, fmt, safe=False, cancel=cancel, direct=repo.direct_io)
    _repair_leaks(path)  # the clusters the cut rebase copied are allocated but unmapped


def _backing_of(repo: contract.Repository, vol_id: str | None) -> tuple[str, str]:
    """How a layer's header names volume ``vol_id`` as its backing file, and its format
    (``""`` for none: the layer stands alone)."""
    if vol_id is None:
        return "", ""
    parent = _volume(repo, vol_id)
    return repo.backing_reference(parent.id, parent.format), parent.format.value


def relink(ctx: Context) -> None:
    """The volume's record follows its new backing."""
    p = ctx.op.params
    with ctx.repo.meta_lock:
        vol = _volume(ctx.repo, model.need(p.rewrites, "volume to rewrite"))
        parent_image = p.new_parent_image_id
        if (vol.parent_volume_id, vol.parent_image_id) != (p.new_parent_volume_id,
                                                            parent_image):
            vol.parent_volume_id = p.new_parent_volume_id
            vol.parent_image_id = parent_image
            ctx.claim.check()
            ctx.repo.put_volume(vol)


def copy_backing(ctx: Context) -> None:
    """optimizeBacking: a local, standalone copy of a backing volume that lives in another
    repository (with everything below it), which the layer above is then rebased onto."""
    p = ctx.op.params
    foreign_id = model.need(p.foreign_volume_id, "foreign volume")
    vol = model.Volume(id=model.need(p.new_parent_volume_id, "new volume"),
                       format=model.VolumeFormat.QCOW2, size=p.size)

    def produce(partial: str) -> None:
        found = ctx.host.find_volume(foreign_id)
        if found is None or found[0] is ctx.repo:
            raise errors.ImageBroken(
                f"backing volume {foreign_id} is not in any other connected repository; "
                "connect the repository that holds it"
            )
        other, foreign = found
        below = chain.volumes(other, foreign.id)
        chain.check_files(other, ctx.op.image_id, below, skip=chain.rewritten(other))
        qemuimg.convert(other.volume_file(foreign), partial, "qcow2",
                        src_fmt=foreign.format.value, progress=ctx.report, cancel=ctx.cancel,
                        direct=ctx.direct)

    materialize(ctx.repo, vol, produce)


def repair_leaks(ctx: Context) -> None:
    p = ctx.op.params
    vol = _volume(ctx.repo, model.need(p.rewrites, "volume to rewrite"))
    _repair_leaks(_layer(ctx, vol))
    ctx.report(100.0)


def _repair_leaks(path: str) -> None:
    report = qemuimg.check(path, repair="leaks")
    if report.get("corruptions", 0) > 0:
        raise errors.ImageBroken(f"qemu-img check finds {path} corrupt; a person must decide "
                                 f"how to repair it: {report}")
    if report.get("leaks", 0) - report.get("leaks-fixed", 0) > 0:
        raise errors.CommandFailed(f"qemu-img check could not repair every leak: {report}")


def seal_fix(ctx: Context) -> None:
    """The image's fix is done; a merge by commit also forgets the snapshot it absorbed.

    The absorbed record goes first: once the image shows no fix, nothing of the fix is left
    for a concurrent check to see but the journal, which a running operation keeps.
    """
    with ctx.repo.meta_lock:
        ctx.claim.check()
        absorbed = ctx.op.params.absorbed_image_id
        if absorbed is not None:
            gone = ctx.repo.get_image(absorbed)
            if gone is not None and gone.removed:
                ctx.repo.delete_image(absorbed)
        img = ctx.repo.get_image(ctx.op.image_id)
        if img is not None and img.fix_id == ctx.op.id:
            img.fix_id = None
            n = len(STEPS[ctx.op.kind])
            img.progress = model.Progress(ctx.host.host_id, f"{n}/{n}", 100, None)
            ctx.repo.put_image(img)
        # Not durably: a journal back from a crash names an image no longer waiting for it.
        ctx.repo.delete_operation(ctx.op.id, durable=False)


def release_fix(repo: contract.Repository, op: model.Operation,
                last_error: str | None) -> None:
    """Drop a fix that has not passed its first step: that step keeps every byte whole (a cut
    rebase is undone first: restore_backing), so the repository is as before, and the checker
    proposes the fix again (with last_error)."""
    restore_backing(repo, op)
    with repo.meta_lock:
        img = repo.get_image(op.image_id)
        if img is not None and img.fix_id == op.id:
            img.fix_id = None
            img.progress = model.Progress(op.progress.host_id, op.progress.stage,
                                          op.progress.percent, last_error)
            repo.put_image(img)
        repo.delete_operation(op.id, durable=False)
    log.info("event=fix_released kind=%s image=%s error=%r", op.kind.value, op.image_id,
             last_error)


# -- shared --------------------------------------------------------------------------------------


def seal(ctx: Context) -> None:
    """Weak to strong in one write, then forget the journal: the operation is done.

    The sealed record is written and fsync'd before the metadata lock, from the record as
    read then; under the lock it is renamed into place if the record is still that (else made
    again there), and its directory fsync is waited for after the lock (fileio.deferred): the
    lock is held for a read and a rename, not across fsyncs (16 creates at once queued on it).
    The journal goes once the seal is durable."""
    repo = ctx.repo

    def sealed(img: model.Image | None) -> model.Image | None:
        if img is None or img.removed or img.operation_id != ctx.op.id:
            return None
        img = copy.deepcopy(img)
        img.strong = True
        img.operation_id = None
        n = len(STEPS[ctx.op.kind])
        img.progress = model.Progress(ctx.host.host_id, f"{n}/{n}", 100, None)
        return img

    before = repo.get_image(ctx.op.image_id)
    ahead = sealed(before)
    staged = repo.stage_image(ahead) if ahead is not None else None
    try:
        with fileio.deferred(), repo.meta_lock:
            ctx.claim.check()
            img = repo.get_image(ctx.op.image_id)
            now = sealed(img)
            if now is not None:
                if staged is None or img != before:  # changed since: seal it as it is now
                    if staged is not None:
                        staged.discard()
                    staged = repo.stage_image(now)
                repo.put_staged(staged)
    finally:
        if staged is not None:
            staged.discard()  # nothing left once committed
    # Not durably: a journal back from a crash names an image no longer waiting for it.
    repo.delete_operation(ctx.op.id, durable=False)


def _layer(ctx: Context, vol: model.Volume) -> str:
    """The path of a layer a fix hands to qemu-img, once its file is a regular file whose
    header names the backing its record says (ImageBroken otherwise)."""
    parent: model.Volume | None = None
    parent_repo: contract.Repository | None = None
    if vol.parent_volume_id is not None:
        parent = ctx.repo.get_volume(vol.parent_volume_id)
        if parent is None:
            found = ctx.host.find_volume(vol.parent_volume_id)
            if found is None:
                raise errors.ImageBroken(f"backing volume {vol.parent_volume_id} of volume "
                                         f"{vol.id} has no record")
            parent_repo, parent = found
    fault = chain.file_fault(ctx.repo, vol, parent, parent_repo)
    if fault is not None:
        raise errors.ImageBroken(fault[0])
    return ctx.repo.volume_path(vol.id, vol.format)


def _volume(repo: contract.Repository, vol_id: str) -> model.Volume:
    vol = repo.get_volume(vol_id)
    if vol is None:
        raise errors.ImageBroken(f"volume {vol_id} is missing from the repository")
    return vol


def find_source(
    host: host.Host, repo: contract.Repository, op: model.Operation
) -> tuple[contract.Repository, model.Image] | None:
    """The usable image an operation reads by id, in any connected repository, never the
    image the operation makes (a snapshot's copy has its source's id)."""
    source_id = op.params.source()
    if source_id is None:
        return None
    for conn in host.connections():
        if conn.repo is repo and source_id == op.image_id:
            continue
        img = conn.repo.get_image(source_id)
        if img is not None and img.strong and not img.removed:
            return conn.repo, img
    return None


def _source_chain(
    ctx: Context, source_id: str
) -> tuple[contract.Repository, list[model.Volume]]:
    found = find_source(ctx.host, ctx.repo, ctx.op)
    if found is not None:
        src_repo, img = found
        if img.kind == model.Kind.DISK and img.prepared_by:
            raise errors.ImageBusy(
                f"source disk {source_id} is in use (prepared) and would be copied torn; "
                "tear it down, or copy a snapshot of it",
                imageId=source_id,
            )
        vols = chain.volumes(src_repo, img.volume_id)
        # What qemu-img reads through: only regular files of the repository whose headers
        # name what the records say (never a planted file outside it).
        chain.check_files(src_repo, img.id, vols, skip=chain.rewritten(src_repo))
        return src_repo, vols
    raise errors.ImageNotFound(
        f"source image {source_id} is not in any connected repository; "
        "the operation resumes when it is connected again",
        imageId=source_id,
    )


STEPS: dict[model.OpKind, list[tuple[str, Step]]] = {
    model.OpKind.CREATE_DISK: [("create-volume", create_volume), ("seal", seal)],
    model.OpKind.CREATE_SNAPSHOT: [
        ("create-overlay", create_overlay),
        ("switch", switch),
        ("seal", seal),
    ],
    model.OpKind.COPY: [("copy-data", copy_data), ("seal", seal)],
    model.OpKind.MERGE_COMMIT: [
        ("commit", commit_down),
        ("switch", switch_down),
        ("seal", seal_fix),
    ],
    model.OpKind.MERGE_REBASE: [
        ("rebase", rebase_in_place),
        ("relink", relink),
        ("seal", seal_fix),
    ],
    model.OpKind.FLATTEN: [
        ("rebase", rebase_in_place),
        ("relink", relink),
        ("seal", seal_fix),
    ],
    model.OpKind.REPAIR: [("repair", repair_leaks), ("seal", seal_fix)],
    model.OpKind.LOCALIZE: [
        ("copy-backing", copy_backing),
        ("rebase", rebase_in_place),
        ("relink", relink),
        ("seal", seal_fix),
    ],
}
