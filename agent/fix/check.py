"""checkStorageRepository: read the repository's own state and say what is left to do.

It takes no long lock: every record it reads is replaced atomically, and every fix it proposes is
derived again from the then-current state when a client asks to run it (see ``apply``).
"""

from __future__ import annotations

import functools
import logging

from agent import errors
from agent.fix import clean
from agent.fix.fixes import Fix, FixType
from agent.host import Host
from agent.image import model
from agent.image.runner import Runner
from agent.repo import localfs

log = logging.getLogger(__name__)


def check(
    host: Host,
    runner: Runner,
    repo: localfs.LocalRepository,
    types: set[FixType] | None = None,
) -> list[Fix]:
    wanted = types or set(FixType)
    out: list[Fix] = []
    if FixType.MEND in wanted:
        out += _mends(host, runner, repo)
    if FixType.CLEAN in wanted:
        active = {op.id for op in repo.operations() if runner.is_active(op.id)}
        p = clean.plan(repo, active)
        if not p.empty():
            out.append(
                Fix(
                    FixType.CLEAN,
                    sorted(p.images),
                    f"reclaim {p.bytes} bytes: {len(p.volumes) + len(p.orphan_files)} volume(s) "
                    f"nothing needs, {len(p.images)} removed image record(s), "
                    f"{len(p.journals)} finished journal(s), {len(p.strays)} leftover file(s)",
                    p.facts(),
                    functools.partial(clean.execute, repo, p),
                )
            )
    return out


def _mends(host: Host, runner: Runner, repo: localfs.LocalRepository) -> list[Fix]:
    images = {i.id: i for i in repo.images()}
    out = []
    for op in clean.live_operations(images, repo.operations(), set()):
        if runner.is_active(op.id):
            continue
        img = images[op.image_id]
        why = _why(host, repo, op)
        out.append(
            Fix(
                FixType.MEND,
                [op.image_id],
                f"resume {op.kind.value} of {img.kind.value} {img.id} at step "
                f"{op.step + 1} ({why})",
                {"op": op.id, "step": op.step, "state": op.state.value,
                 "generation": img.generation},
                functools.partial(_resume, runner, repo, op.id),
            )
        )
    return out


def _why(host: Host, repo: localfs.LocalRepository, op: model.Operation) -> str:
    if op.kind == model.OpKind.COPY:
        source = op.params["source_id"]
        found = any(
            (img := c.repo.get_image(source)) is not None and img.strong and not img.removed
            and not (c.repo is repo and source == op.image_id)
            for c in host.connections()
        )
        if not found:
            return (f"its source image {source} is not in any connected repository: connect "
                    "the repository that holds it, or remove this image")
    if op.progress.last_error:
        return f"last error: {op.progress.last_error}"
    if op.state == model.OpState.PENDING:
        return "committed, waiting to be started"
    return f"interrupted on host {op.progress.host_id}"


def _resume(runner: Runner, repo: localfs.LocalRepository, op_id: str) -> None:
    with repo.meta_lock:
        op = repo.get_operation(op_id)
        if op is None:
            raise errors.StaleFix(f"operation {op_id} finished meanwhile")
        op.state = model.OpState.PENDING
        op.progress.last_error = None
        repo.put_operation(op)
    runner.submit(repo, op_id)


def apply(
    host: Host, runner: Runner, repo: localfs.LocalRepository, fix_type: str, data: str
) -> Fix:
    """Run a fix a client sends back, only if the checker proposes exactly it right now."""
    try:
        wanted = FixType(fix_type)
    except ValueError:
        raise errors.InvalidArgument(f"unknown fix type {fix_type!r}", param="fix") from None
    for candidate in check(host, runner, repo, {wanted}):
        if candidate.data == data:
            log.info("event=fix type=%s images=%s", candidate.type, candidate.image_ids)
            candidate.run()
            return candidate
    raise errors.StaleFix(
        "this fix does not match the repository's current state (it is stale, already done, "
        "or was not proposed by the checker); run checkStorageRepository again"
    )
