"""checkStorageRepository: read the repository's own state and say what is left to do.

It takes no long lock: every record it reads is replaced atomically, and every fix it proposes is
derived again when a client asks to run it (see ``apply``): under the claim of every image the fix
changes, from the then-current state, and only for those images. A fix runs only if that gives
back exactly the fix the client sent (type, imageIds, description, data: the data is a digest of
the facts it was derived from, generations included), so a stale, repeated or forged fix never
runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import uuid
from collections.abc import Callable
from typing import Any

from agent import errors, host, qemuimg
from agent.fix import clean, fixes
from agent.image import claims, inventory, model, operations, runner
from agent.repo import contract, layout, leases

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Checker:
    host: host.Host
    runner: runner.Runner
    repo: contract.Repository
    max_depth: int = 10
    _focus: set[str] | None = dataclasses.field(default=None, init=False)

    def _skip(self, image_id: str) -> bool:
        return self._focus is not None and image_id not in self._focus

    def check(self, types: set[fixes.FixType] | None = None, deep: bool = False,
              focus: set[str] | None = None, fresh: bool = False) -> list[fixes.Fix]:
        """What is left to do; ``focus``: only the fixes of these images (what applying one
        fix derives again), so a deep check looks at their volumes alone; ``fresh``: from
        records read now, none kept from before (a fix derived again under its claim)."""
        wanted = types or set(fixes.FixType)
        self._focus = focus
        ops = self._op_ids()
        active = {op_id for op_id in ops if self.runner.is_active(op_id)}
        # On a shared repository, what another live host runs is as good as running here:
        # never a mend, never cleaned away; the check shows it running there.
        elsewhere = self._elsewhere([o for o in ops if o not in active])
        active |= set(elsewhere)
        inv = inventory.Inventory(
            self.repo, active, self.host.find_volume,
            lambda: [c.repo for c in self.host.connections() if c.repo is not self.repo],
            focus, fresh,
        )
        out: list[fixes.Fix] = []
        # The deep pass first: what it finds (corruption, a volume it cannot read) makes those
        # images broken (repo.findings), which every other pass then sees.
        leaks = self._leaks(inv) if deep and fixes.FixType.OPTIMIZE in wanted else []
        if fixes.FixType.MEND in wanted:
            out += self._running_elsewhere(inv, elsewhere)
            out += self._damaged(inv)
            out += self._mends(inv)
            out += self._faults(inv)
        elif deep:
            out += [_manual(inv.images[i], f.message) for i, f in inv.faults.items()
                    if f.volume_id in self.repo.findings]
        if fixes.FixType.OPTIMIZE in wanted:
            out += self._localize(inv)
            out += self._flattens(inv)
            out += leaks
        if fixes.FixType.MERGE in wanted:
            out += self._merges(inv)
        if fixes.FixType.CLEAN in wanted:
            out += self._clean(inv)
        return out

    def _op_ids(self) -> list[str]:
        return [op.id for op in self.repo.operations()]

    def _elsewhere(self, op_ids: list[str]) -> dict[str, leases.Owner]:
        """Operation id -> the other live host that holds its image's lease."""
        if self.repo.membership is None:
            return {}
        out = {}
        for op_id in op_ids:
            op = self.repo.get_operation(op_id)
            if op is None:
                continue
            holder = self.host.claims.working_elsewhere(self.repo, op.image_id)
            if holder is not None:
                out[op_id] = holder
        return out

    def _running_elsewhere(self, inv: inventory.Inventory,
                           elsewhere: dict[str, leases.Owner]) -> list[fixes.Fix]:
        """Operations another live host runs: shown, never offered (they are not this host's
        to resume; once that host is dead they are mend fixes here)."""
        out = []
        for op in inv.live_ops:
            holder = elsewhere.get(op.id)
            if holder is None or self._skip(op.image_id):
                continue
            out.append(fixes.Fix(
                fixes.FixType.RUNNING, [op.image_id],
                f"{op.kind.value} of image {op.image_id} is running on host {holder.host_id} "
                f"({holder.state}); nothing to do here",
                {"op": op.id, "hostId": holder.host_id}, manual=True,
                extra={"runningOn": holder.to_dict()}))
        return out

    # -- mend ----------------------------------------------------------------------------------

    def _mends(self, inv: inventory.Inventory) -> list[fixes.Fix]:
        out = []
        for op in inv.live_ops:
            if op.id in inv.active or self._skip(op.image_id):
                continue
            out.append(self._resume_fix(op, inv.images[op.image_id]))
        return out

    def _resume_fix(self, op: model.Operation, img: model.Image) -> fixes.Fix:
        return fixes.Fix(
            fixes.FixType.MEND,
            [op.image_id],
            f"resume {op.kind.value} of {img.kind.value} {img.id} at step "
            f"{op.step + 1}/{len(_steps(op))} ({self._why(op)})",
            {"op": op.id, "step": op.step, "state": op.state.value,
             "generation": img.generation},
            functools.partial(_resume, self.runner, self.repo, op.id),
        )

    def _resumes(self, image_ids: set[str]) -> tuple[list[fixes.Fix], bool]:
        """The resume mends of these images alone, from their records and the journals they
        name (what _mends gives for them, without an inventory of the repository: applying
        one of 1,000 mends read every record of the repository twice). And whether that is
        all a check could give them: true when each image is being made (it has no chain
        fault to mend then) and every record read."""
        out = []
        whole = True
        for image_id in sorted(image_ids):
            try:
                img = self.repo.get_image(image_id)
            except errors.RecordDamaged:
                whole = False  # a finding: the check says so
                continue
            if img is None:
                continue
            if img.operation_id is None:
                whole = False  # a chain fault is the check's to find
            for op_id in dict.fromkeys(o for o in (img.operation_id, img.fix_id) if o):
                try:
                    op = self.repo.get_operation(op_id)
                except errors.RecordDamaged:
                    whole = False
                    continue
                # Inventory.live_ops, for one image.
                if op is None or op.image_id != img.id or op.state == model.OpState.ABORTED:
                    continue
                if not (img.fix_id == op.id if op.kind.is_fix
                        else img.operation_id == op.id and not img.removed):
                    continue
                if self.runner.is_active(op.id) or self._elsewhere([op.id]):
                    continue
                out.append(self._resume_fix(op, img))
        return out, whole

    def _why(self, op: model.Operation) -> str:
        source = op.params.source()
        if source is not None and operations.find_source(self.host, self.repo, op) is None:
            return (f"its source image {source} is not in any connected repository: "
                    "connect the repository that holds it, or remove this image")
        if op.progress.last_error:
            return f"last error: {op.progress.last_error}"
        if op.state == model.OpState.PENDING:
            return "committed, waiting to be started"
        return f"interrupted on host {op.progress.host_id}"

    def _damaged(self, inv: inventory.Inventory) -> list[fixes.Fix]:
        """Records that cannot be read: a person must repair or remove each (it names its
        file); meanwhile nothing they might need is cleaned."""
        out = []
        for d in inv.damage:
            ids = [d.rec_id] if d.kind == layout.IMAGES and d.rec_id is not None else []
            out.append(fixes.Fix(
                fixes.FixType.MEND, ids,
                f"{d.message}; a person must repair or remove it (until then clean keeps "
                "whatever it might name)",
                {"manual": d.message, "file": d.path}, manual=True))
        return out

    def _faults(self, inv: inventory.Inventory) -> list[fixes.Fix]:
        """Chain faults of usable images: a mend where it is safe, else a manual finding."""
        out = []
        for image_id, found in inv.faults.items():
            img = inv.images[image_id]
            if self._skip(img.id):
                continue
            if found.volume_id is None:
                out.append(_manual(img, found.message))
                continue
            if found.relink_to is None or found.volume_id in inv.in_use \
                    or found.volume_id not in inv.volumes:
                out.append(_manual(img, found.message))
                continue
            vol = inv.volumes[found.volume_id or ""]
            out.append(fixes.Fix(
                fixes.FixType.MEND,
                [img.id],
                f"{found.message}: re-point it (qemu-img rebase -u)",
                {"relink": vol.id, "to": found.relink_to, "generation": img.generation},
                functools.partial(_relink_backing, self.repo, vol, found.relink_to),
            ))
        return out

    # -- optimize ------------------------------------------------------------------------------

    def _quiet(self, inv: inventory.Inventory, img: model.Image, *vol_ids: str) -> bool:
        """Nothing else is happening to the image and no consumer reads the volumes."""
        return (img.operation_id is None and img.fix_id is None and not img.removed
                and not any(v in inv.in_use or v in inv.rewritten for v in vol_ids))

    def _flattens(self, inv: inventory.Inventory) -> list[fixes.Fix]:
        out = []
        for img in inv.images.values():
            if img.removed or self._skip(img.id):
                continue
            vols, fault = inv.chains[img.id]
            if fault is not None or img.id in inv.faults or len(vols) <= self.max_depth \
                    or img.id in inv.foreign:
                continue  # (a chain leaning on another repository is brought home first)
            top, bottom = vols[0], vols[-1]
            if not self._quiet(inv, img, top.id):
                continue
            params = model.OpParams(rewrites=top.id, new_parent_volume_id=bottom.id,
                                    new_parent_image_id=_owner(inv, bottom.id))
            out.append(fixes.Fix(
                fixes.FixType.OPTIMIZE,
                [img.id],
                f"{img.kind.value} {img.id} has a chain of {len(vols)} layers (more than "
                f"{self.max_depth}): fold the {len(vols) - 2} intermediate layers into its top"
                + _last_error(img),
                {"flatten": top.id, "generation": img.generation, "depth": len(vols)},
                self._starter(model.OpKind.FLATTEN, img.id, params),
            ))
        return out

    def _localize(self, inv: inventory.Inventory) -> list[fixes.Fix]:
        """Chains that lean on a backing volume in another repository: copy it here (with all
        below it, as one volume) and rebase the layer above onto the copy."""
        out = []
        seen: set[str] = set()
        for img in inv.images.values():
            elsewhere = inv.foreign.get(img.id)
            if img.removed or self._skip(img.id) or not elsewhere \
                    or inv.chains[img.id][1] is not None or img.id in inv.faults:
                continue
            vols = inv.chains[img.id][0]
            k = next(i for i, v in enumerate(vols) if v.id in elsewhere)
            if k == 0:
                continue  # the image's own volume is elsewhere: not this repository's image
            upper, foreign = vols[k - 1], vols[k]
            if upper.id in seen or not self._quiet(inv, img, upper.id):
                continue
            seen.add(upper.id)
            params = model.OpParams(size=foreign.size, rewrites=upper.id,
                                    new_parent_volume_id=str(uuid.uuid4()),
                                    new_parent_image_id=upper.parent_image_id,
                                    foreign_volume_id=foreign.id)
            where = elsewhere[foreign.id].root
            out.append(fixes.Fix(
                fixes.FixType.OPTIMIZE,
                [img.id],
                f"{img.kind.value} {img.id} is backed by volume {foreign.id} in another "
                f"repository ({where}): copy it here and re-point the chain"
                + _last_error(img),
                {"localize": upper.id, "foreign": foreign.id, "generation": img.generation},
                self._starter(model.OpKind.LOCALIZE, img.id, params),
            ))
        return out

    def _leaks(self, inv: inventory.Inventory) -> list[fixes.Fix]:
        """qemu-img check of each image's top volume. A corrupt volume, or one qemu-img cannot
        read, becomes a finding (repo.findings: its images are broken until a deep check finds
        it sound again) and the check goes on with the next."""
        out = []
        checked: dict[str, Any] = {}
        for img in inv.images.values():
            if img.removed or img.operation_id is not None or self._skip(img.id):
                continue
            vol = inv.volumes.get(img.volume_id)
            if vol is None or vol.format != model.VolumeFormat.QCOW2:
                continue
            if vol.id not in checked:
                self.repo.findings.pop(vol.id, None)
                if inv.header_fault(img, [vol]) is not None:
                    checked[vol.id] = None  # never handed to qemu-img: a finding already
                    continue
                try:
                    checked[vol.id] = qemuimg.check(self.repo.volume_file(vol))
                except errors.Error as e:
                    log.warning("event=deep_check_failed volume=%s error=%r", vol.id, str(e))
                    self.repo.findings[vol.id] = (
                        f"qemu-img check cannot read volume {vol.id}: {e}; a person must decide")
                    checked[vol.id] = None
                    continue
                report = checked[vol.id]
                if isinstance(report, dict) and report.get("corruptions", 0):
                    self.repo.findings[vol.id] = (
                        f"qemu-img check finds {report['corruptions']} corruption(s) in volume "
                        f"{vol.id}; repairing them may lose data, a person must decide")
            report = checked[vol.id]
            if not isinstance(report, dict) or vol.id in self.repo.findings:
                continue
            if report.get("leaks", 0) and self._quiet(inv, img, vol.id) \
                    and img.id not in inv.faults:
                out.append(fixes.Fix(
                    fixes.FixType.OPTIMIZE,
                    [img.id],
                    f"volume of {img.kind.value} {img.id} leaks {report['leaks']} cluster(s): "
                    "free them (qemu-img check -r leaks)" + _last_error(img),
                    {"repair": vol.id, "generation": img.generation, "leaks": report["leaks"]},
                    self._starter(model.OpKind.REPAIR, img.id,
                                  model.OpParams(rewrites=vol.id)),
                ))
        return out

    # -- merge ---------------------------------------------------------------------------------

    def _merges(self, inv: inventory.Inventory) -> list[fixes.Fix]:
        out = []
        for removed in inv.images.values():
            lower_id = removed.volume_id
            if not removed.removed or self._skip(removed.id) or lower_id not in inv.needed:
                continue
            if lower_id in inv.needed_elsewhere or lower_id in inv.pending_volumes:
                continue  # another repository's chain, or an unfinished operation, reads it
            if lower_id in inv.damaged_volumes:
                continue
            if any(not i.removed for i in inv.tops.get(lower_id, [])):
                continue  # another image still has this volume as its own
            deps = inv.dependants.get(lower_id, [])
            if len(deps) != 1:
                continue  # several layers need it: it must stay
            upper_id = deps[0]
            if inv.header_dependants.get(lower_id, set()) - {upper_id}:
                continue  # a file the records do not know reads through it: it must stay
            owners = [i for i in inv.tops.get(upper_id, []) if not i.removed]
            if len(owners) != 1 or not self._quiet(inv, owners[0], lower_id, upper_id) \
                    or owners[0].id in inv.faults:
                continue
            target = owners[0]
            lower, upper = inv.volumes[lower_id], inv.volumes[upper_id]
            commit_writes, rebase_writes = inv.allocated(upper_id), inv.allocated(lower_id)
            by_commit = (not inv.dependants.get(upper_id) and removed.size == target.size
                         and commit_writes <= rebase_writes)
            if by_commit:
                kind = model.OpKind.MERGE_COMMIT
                params = model.OpParams(lower_volume_id=lower_id, upper_volume_id=upper_id,
                                        rewrites=lower_id, absorbed_image_id=removed.id,
                                        folded_image_id=removed.id)
                how = f"qemu-img commit, about {commit_writes} bytes to write"
            else:
                kind = model.OpKind.MERGE_REBASE
                params = model.OpParams(lower_volume_id=lower_id, upper_volume_id=upper_id,
                                        rewrites=upper_id,
                                        new_parent_volume_id=lower.parent_volume_id,
                                        new_parent_image_id=lower.parent_image_id,
                                        folded_image_id=removed.id)
                how = f"qemu-img rebase, about {rebase_writes} bytes to write"
            out.append(fixes.Fix(
                fixes.FixType.MERGE,
                [removed.id, target.id],
                f"fold removed {removed.kind.value} {removed.id} into {target.kind.value} "
                f"{target.id}, its only dependant ({how}); clean then reclaims it"
                + _last_error(target),
                {"lower": lower.id, "upper": upper.id, "kind": kind.value,
                 "generations": [removed.generation, target.generation]},
                self._starter(kind, target.id, params),
            ))
        return out

    # -- clean ---------------------------------------------------------------------------------

    def _clean(self, inv: inventory.Inventory) -> list[fixes.Fix]:
        p = clean.plan(inv)
        if p.empty():
            return []
        return [fixes.Fix(
            fixes.FixType.CLEAN,
            sorted(p.images),
            f"reclaim {p.bytes} bytes: {len(p.volumes) + len(p.orphan_files)} volume(s) "
            f"nothing needs, {len(p.images)} removed image record(s), "
            f"{len(p.journals)} finished journal(s), {len(p.strays)} leftover file(s)"
            + (f", {len(p.leases)} lease area(s) of images gone" if p.leases else ""),
            p.facts(),
            lambda _claim: clean.execute(self.repo, p),
        )]

    # -- running fixes -------------------------------------------------------------------------

    def _starter(self, kind: model.OpKind, image_id: str,
                 params: model.OpParams) -> Callable[[claims.Claim], None]:
        def start(claim: claims.Claim) -> None:
            # Under the claim of every image of the fix, derived again from the current state:
            # nothing here was checked before the claim only.
            with self.repo.meta_lock:
                img = self.repo.get_image(image_id)
                if img is None or img.fix_id is not None or img.operation_id is not None:
                    raise errors.StaleFix(f"image {image_id} changed meanwhile")
                folded = params.folded_image_id
                for other_id in dict.fromkeys(i for i in (image_id, folded) if i is not None):
                    other = self.repo.get_image(other_id)
                    if other is None:
                        raise errors.StaleFix(f"image {other_id} is gone; check again")
                    busy = self.host.claims.conflicts(self.repo, other, claims.Mode.WRITE,
                                                      [claim.owner])
                    if busy:
                        raise errors.ImageBusy(
                            f"image {other_id} is in use by {busy[0].describe()}; run the fix "
                            "once that is over", imageId=other_id)
                op = model.Operation(str(uuid.uuid4()), kind, image_id, params)
                img.fix_id = op.id
                self.repo.put_intent(op, img)
                if params.absorbed_image_id is not None:
                    absorbed = self.repo.get_image(params.absorbed_image_id)
                    if absorbed is not None:
                        absorbed.absorbing = True  # from now on its volume is not its own
                        self.repo.put_image(absorbed)
                log.info("event=fix_started kind=%s image=%s op=%s", kind.value, image_id,
                         op.id)
                # Under the claim: the operation's own claim follows it without a gap.
                self.runner.submit(self.repo, op)

        return start

    def apply(self, sent: dict[str, Any]) -> fixes.Fix:
        """Run a fix a client sends back, only if the checker proposes exactly it right now.

        What the fix names is only a hint of what to claim: the fix is derived again under the
        claim, for its own images only (never a check of the whole repository, nor a deep one
        of every image), and must come out the same, or it is stale."""
        try:
            wanted = fixes.FixType(str(sent.get("type")))
        except ValueError:
            raise errors.InvalidArgument(f"unknown fix type {sent.get('type')!r}",
                                         param="fix") from None
        # Clean is about the whole repository: it is derived from all of it.
        focus = None if wanted == fixes.FixType.CLEAN else set(sent.get("imageIds") or [])
        deep = wanted == fixes.FixType.OPTIMIZE

        def current(fresh: bool) -> fixes.Fix:
            if wanted == fixes.FixType.MEND and focus:
                # Resuming an operation costs the reads of its image and journal, whatever
                # else the repository holds; the whole check only for other mends.
                found, whole = self._resumes(focus)
                for candidate in found:
                    if candidate.matches(sent):
                        return candidate
                if whole:
                    raise _stale()
            for candidate in self.check({wanted}, deep=deep, focus=focus, fresh=fresh):
                if candidate.matches(sent):
                    return candidate
            raise _stale()

        hint = current(False)
        if hint.manual:
            raise errors.ImageBroken(
                f"this finding needs a person, not a fix: {hint.description}")
        what = f"a {wanted.value} fix"
        # Clean deletes: its plan is derived again and run under the metadata lock too, so
        # nothing can start to need what it deletes in between (whatever would, claims an
        # image that is not removed, or writes its intent under that lock).
        locked = self.repo.meta_lock if wanted == fixes.FixType.CLEAN \
            else contextlib.nullcontext()
        whole = self.repo if wanted == fixes.FixType.CLEAN else None
        with self.host.claims.claim(what, [(self.repo, i) for i in hint.image_ids],
                                    whole=whole) as claim, locked:
            fix = current(True)  # what it destroys is decided on the records, not memory
            log.info("event=fix type=%s images=%s", fix.type, fix.image_ids)
            fix.run(claim)
        return fix


def _stale() -> errors.StaleFix:
    return errors.StaleFix(
        "this fix does not match the repository's current state (it is stale, already done, "
        "running, or was not proposed by the checker); run checkStorageRepository again")


def _steps(op: model.Operation) -> list[Any]:
    return operations.STEPS[op.kind]


def _owner(inv: inventory.Inventory, vol_id: str) -> str | None:
    vol = inv.volumes.get(vol_id)
    tops = inv.tops.get(vol_id, [])
    if tops:
        return tops[0].id
    return vol.parent_image_id if vol else None


def _last_error(img: model.Image) -> str:
    error = img.progress.last_error
    return f" (the last attempt failed: {error})" if error else ""


def _manual(img: model.Image, message: str) -> fixes.Fix:
    return fixes.Fix(fixes.FixType.MEND, [img.id],
                     f"{img.kind.value} {img.id} is broken: {message}",
                     {"manual": message, "generation": img.generation}, manual=True)


def _resume(runner: runner.Runner, repo: contract.Repository, op_id: str,
            claim: claims.Claim) -> None:
    with repo.meta_lock:
        op = repo.get_operation(op_id)
        if op is None:
            raise errors.StaleFix(f"operation {op_id} finished meanwhile")
        op.state = model.OpState.PENDING
        op.auto_fix = True  # asked for now: a restart before it runs takes it up again
        op.progress.last_error = None
        claim.check()
        repo.put_operation(op)
        runner.submit(repo, op)


def _relink_backing(repo: contract.Repository, vol: model.Volume, ref: str,
                    claim: claims.Claim) -> None:
    parent = repo.get_volume(vol.parent_volume_id or "")
    fmt = parent.format.value if parent else "qcow2"
    with repo.meta_lock:
        claim.check()
        qemuimg.rebase(repo.volume_file(vol), ref, fmt, safe=False)
