"""Which journals of a repository name an image: the index behind ``Claims.conflicts``.

Every prepareImage, createSnapshot, removeImage and create asks who uses an image, and every
operation asks again when it starts; reading every journal of the repository for that made each
of those calls cost in proportion to the operations pending (prepareImage: 1.4 ms idle, 80 ms
with 1,000 journals; a recovery of N operations, N² journal reads). The index maps image id
(and rewritten volume id) -> the ids of the journals that name it, so a caller reads only those.

It is a hint, never the truth: every journal it names is read again from the repository before
it counts (a journal finished meanwhile is dropped), so a name too many costs one read and
nothing else. A name too few could hide a user, so the index is kept only where this process
writes every journal: a local repository, kept to one agent by its lock, whose put_intent,
put_operation and delete_operation tell the index (``wrote``/``deleted``). It is built from a
scan of the journal at its first use. On a shared repository, other hosts write journals this
process never sees: ``usable`` is False there and callers scan the journal as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent import errors
from agent.image import model
from agent.repo import layout

if TYPE_CHECKING:
    from agent.repo import contract

Scan = Callable[[], "tuple[list[model.Operation], list[layout.Damage]]"]


def naming(repo: contract.Repository, image_id: str,
           volume_ids: set[str] | frozenset[str] = frozenset()) -> list[model.Operation]:
    """The journals of ``repo`` that may name ``image_id`` or rewrite one of ``volume_ids``,
    as the repository has them now: through its index where it has one (a handful of reads),
    else every journal (the caller keeps only those that name it either way)."""
    index = repo.journal_index
    if index is None:
        return repo.operations()
    return _read(repo, index.naming(repo.scan_operations, image_id, volume_ids))


def rewritten(repo: contract.Repository) -> set[str]:
    """Volumes an unfinished fix of ``repo`` rewrites in place."""
    index = repo.journal_index
    ops = repo.operations() if index is None \
        else _read(repo, index.rewriting(repo.scan_operations))
    return {op.params.rewrites for op in ops
            if op.kind.is_fix and op.params.rewrites is not None}


def _read(repo: contract.Repository, op_ids: list[str]) -> list[model.Operation]:
    out = []
    for op_id in op_ids:
        try:
            op = repo.get_operation(op_id)
        except errors.RecordDamaged:
            continue  # as a scan of the journal leaves it out
        # None: finished meanwhile, or told but not written yet (the index hears first):
        # either way not there for a scan either. It stays in the index until deleted.
        if op is not None:
            out.append(op)
    return out


def names(op: model.Operation) -> set[str]:
    """Every image id an operation's claim may name (a superset of claims.wanted_by's)."""
    p = op.params
    return {i for i in (op.image_id, p.disk_id, p.folded_image_id, p.absorbed_image_id,
                        p.source()) if i is not None}


class Index:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._built = False
        self._building = False
        # Changes told while the first scan runs: applied over its result.
        self._told: list[tuple[str, model.Operation | None]] = []
        self._keys: dict[str, set[str]] = {}  # op id -> the image ids it names
        self._rewrites: dict[str, str] = {}  # op id -> the volume it rewrites in place
        self._by_image: dict[str, set[str]] = {}  # image id -> op ids naming it

    # -- told by the repository's writers ------------------------------------------------------

    def wrote(self, op: model.Operation) -> None:
        with self._lock:
            if self._building:
                self._told.append((op.id, op))
            self._add(op)

    def deleted(self, op_id: str) -> None:
        with self._lock:
            if self._building:
                self._told.append((op_id, None))
            self._drop(op_id)

    # -- asked by the claims -------------------------------------------------------------------

    def naming(self, scan: Scan, image_id: str, volume_ids: set[str] | frozenset[str]
               = frozenset()) -> list[str]:
        """The journals that may name ``image_id``, or rewrite one of ``volume_ids``."""
        self._build(scan)
        with self._lock:
            out = set(self._by_image.get(image_id, ()))
            if volume_ids:
                out.update(o for o, v in self._rewrites.items() if v in volume_ids)
            return sorted(out)

    def rewriting(self, scan: Scan) -> list[str]:
        """The journals that rewrite a volume in place (fixes)."""
        self._build(scan)
        with self._lock:
            return sorted(self._rewrites)

    # -- inside --------------------------------------------------------------------------------

    def _add(self, op: model.Operation) -> None:
        self._drop(op.id)
        keys = names(op)
        self._keys[op.id] = keys
        for key in keys:
            self._by_image.setdefault(key, set()).add(op.id)
        if op.kind.is_fix and op.params.rewrites is not None:
            self._rewrites[op.id] = op.params.rewrites

    def _drop(self, op_id: str) -> None:
        for key in self._keys.pop(op_id, ()):
            ops = self._by_image.get(key)
            if ops is not None:
                ops.discard(op_id)
                if not ops:
                    del self._by_image[key]
        self._rewrites.pop(op_id, None)

    def _build(self, scan: Scan) -> None:
        if self._built:
            return
        with self._build_lock:  # one scan at a time; who waited finds it built
            if self._built:
                return
            with self._lock:
                self._building = True
            try:
                ops, _damage = scan()
            except BaseException:
                with self._lock:
                    self._building = False
                    self._told.clear()
                raise
            with self._lock:
                # Whatever was written or deleted while the scan ran wins over what it read
                # (a name too many is dropped when read again; none can be missing).
                told = {op_id for op_id, _ in self._told}
                for op in ops:
                    if op.id not in told:
                        self._add(op)
                for _op_id, told_op in self._told:
                    if told_op is not None:
                        self._add(told_op)
                self._told.clear()
                self._building = False
                self._built = True
