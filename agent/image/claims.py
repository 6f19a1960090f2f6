"""Who may change an image now: the one place the engine asks.

Every change has exactly one owner at a time. An owner (a call while it checks and commits, an
operation while it runs, a fix while it is derived again and started) **claims** what it writes
and what must not change under it before its first write, re-reads the state under the claim,
and refuses if it moved. Whatever was checked before the claim is a hint, never permission.

Two kinds of claim answer ``conflicts()``:

- *held* claims, in the table of this process: taken by ``claim()`` and released when the owner
  is done. A call's claim lasts milliseconds, so a second call waits for it a little; an
  operation's claim lasts as long as it runs, so a call that meets it is refused at once.
- *durable* claims, read from the repositories themselves: every unfinished operation in the
  journal of any connected repository claims what its parameters name (``wanted_by``), and a
  consumer holds the image it prepared. They outlive this process: a crash keeps them.

On a shared repository a claim is also a sanlock lease per image (``agent/repo/leases.py``):
the table keeps the owners of this host apart, the leases keep the hosts apart. A claim takes
its table entries first (waiting for this host's calls), then the leases of every image (all
or none; ``LeaseHeld`` naming the host that holds one), and ``check()`` asks whether they are
still held before each write. The operations only see this interface.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.image import journals, model
from agent.repo import contract, leases

if TYPE_CHECKING:
    from agent import command, host

log = logging.getLogger(__name__)

# How long a claim waits for another call's claim (they last milliseconds) before ImageBusy.
CALL_WAIT = 10.0


class Mode(enum.StrEnum):
    READ = "read"  # must not change under the owner: a copy's source, a snapshot stood on
    WRITE = "write"  # the owner changes it (its record, its volume, what it points at)


def clash(a: Mode, b: Mode) -> bool:
    return Mode.WRITE in (a, b)


# (repository uuid, image id): what is claimed.
Key = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Holder:
    """Someone using an image: who, how, and whether waiting for them makes sense."""

    owner: str  # an operation id, a call's claim id, or "consumer:<host id>"
    what: str  # for people: "copyImage operation 1234...", "a prepareImage call", ...
    mode: Mode
    lasting: bool  # an operation or a consumer: it will not be gone in milliseconds

    def describe(self) -> str:
        return f"{self.what} ({self.mode.value})"


class Claim:
    """What one owner holds. ``check()`` before every journal or record write: a claim can be
    lost (its repository was disconnected by force; on shared storage, its lease expired)."""

    def __init__(self, table: Table, owner: str, what: str, keys: dict[Key, Mode],
                 lasting: bool) -> None:
        self._table = table
        self.owner = owner
        self.what = what
        self.keys = keys
        self.lasting = lasting
        self.revoked = False
        self.released = False
        # Set by an operation about to run its last step (a seal of milliseconds): a client
        # that saw it done may come at once, and should wait for the release, not be refused.
        self.finishing = False
        self._fence: contextvars.Token[Callable[[], None] | None] | None = None
        # Its sanlock leases, by repository uuid (shared repositories only).
        self.leases: dict[str, leases.Held] = {}

    def valid(self) -> bool:
        return not (self.revoked or self.released) and all(
            h.valid() for h in self.leases.values())

    def check(self) -> None:
        if self.revoked:
            raise errors.ClaimLost(
                f"{self.what} lost its claim (its repository was disconnected, or this host "
                "lost its lockspace); it stays resumable from the journal"
            )
        if self.released:
            raise errors.Error(f"{self.what} wrote after releasing its claim")
        for repo_uuid, held in self.leases.items():
            if not held.valid():
                raise errors.ClaimLost(
                    f"{self.what} no longer holds its lease in repository {repo_uuid} (this "
                    "host's lockspace renewals are late, or another host took it over); it "
                    "writes nothing more and stays resumable from the journal")

    def lease_version(self, repo_uuid: str, image_id: str) -> int:
        """The version of this claim's lease of an image (0 on a local repository): the
        fencing token an operation's journal records with its host id."""
        held = self.leases.get(repo_uuid)
        return 0 if held is None else held.versions().get(image_id, 0)

    def holds(self, key: Key) -> bool:
        return key in self.keys

    def release(self) -> None:
        self._table.release(self)

    def __enter__(self) -> Claim:
        # Every repository write on this thread checks this claim until it is released.
        self._fence = contract.fence.set(self.check)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fence is not None:
            contract.fence.reset(self._fence)
            self._fence = None
        self.release()


class Table:
    """The claims held in this process: many readers or one writer per image, all of an owner's
    images taken at once (so two owners never wait for each other in a cycle)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: dict[Key, dict[str, tuple[Mode, Claim]]] = {}

    def acquire(self, owner: str, what: str, keys: dict[Key, Mode], lasting: bool,
                wait: float = CALL_WAIT, cancel: command.Cancel | None = None) -> Claim:
        claim = Claim(self, owner, what, keys, lasting)
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                blocking = self._blocking(owner, keys)
                if not blocking:
                    break
                key, other = blocking[0]
                left = deadline - time.monotonic()
                lasting = other.lasting and not other.finishing
                if lasting or left <= 0 or (cancel is not None and cancel.requested):
                    if cancel is not None:
                        cancel.check()
                    raise errors.ImageBusy(
                        f"image {key[1]} is in use by {other.what}"
                        + ("" if lasting else f" (waited {wait:g} s)"),
                        imageId=key[1], holder=other.owner,
                    )
                # A call's claim is over in milliseconds; wake up on its release, and now and
                # then to see whether this owner was stopped meanwhile.
                self._cond.wait(min(left, 0.2))
            for key, mode in keys.items():
                self._held.setdefault(key, {})[owner] = (mode, claim)
        return claim

    def _blocking(self, owner: str, keys: dict[Key, Mode]) -> list[tuple[Key, Claim]]:
        out = []
        for key, mode in keys.items():
            for other_owner, (other_mode, other) in self._held.get(key, {}).items():
                if other_owner != owner and clash(mode, other_mode):
                    out.append((key, other))
        # A lasting holder first: meeting one means refusing at once.
        out.sort(key=lambda kc: not (kc[1].lasting and not kc[1].finishing))
        return out

    def release(self, claim: Claim) -> None:
        for held in claim.leases.values():
            held.release()
        with self._cond:
            if claim.released:
                return
            claim.released = True
            for key in claim.keys:
                holders = self._held.get(key)
                if holders is not None and holders.get(claim.owner, (None, None))[1] is claim:
                    del holders[claim.owner]
                    if not holders:
                        del self._held[key]
            self._cond.notify_all()

    def holders(self, key: Key) -> list[Holder]:
        with self._cond:
            return [Holder(o, c.what, m, c.lasting and not c.finishing)
                    for o, (m, c) in self._held.get(key, {}).items()]

    def in_repository(self, repo_uuid: str) -> list[Claim]:
        with self._cond:
            return self._in_repository(repo_uuid)

    def _in_repository(self, repo_uuid: str) -> list[Claim]:
        return list({id(c): c for key, holders in self._held.items() if key[0] == repo_uuid
                     for _, c in holders.values()}.values())

    def lasting_in(self, repo_uuid: str, wait: float = CALL_WAIT) -> list[Claim]:
        """The lasting claims on a repository, once those finishing are gone (an operation
        that just sealed, and so reads as done, still releases its claim: for milliseconds).
        A finishing claim still held after ``wait`` counts as lasting."""
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                held = [c for c in self._in_repository(repo_uuid) if c.lasting]
                left = deadline - time.monotonic()
                if left <= 0 or not any(c.finishing for c in held):
                    return held
                self._cond.wait(min(left, 0.2))

    def revoke(self, repo_uuid: str) -> list[Claim]:
        """Take back every claim on a repository that goes away (a forced disconnect); their
        owners see it at their next ``check()``."""
        gone = self.in_repository(repo_uuid)
        with self._cond:
            for c in gone:
                c.revoked = True
        for c in gone:
            self.release(c)
        return gone


@dataclasses.dataclass(frozen=True)
class Want:
    """One image an operation claims, as its journal names it."""

    image_id: str
    mode: Mode
    # True: the image in the operation's own repository. False: an image read by id from any
    # connected repository (a copy's source), never the operation's own image.
    local: bool = True


def wanted_by(op: model.Operation) -> list[Want]:
    """What an operation claims for as long as it is unfinished: the image it makes or improves,
    the disk a snapshot switches, the removed snapshot a merge folds, the image it reads."""
    p = op.params
    out = [Want(op.image_id, Mode.WRITE)]
    if op.kind == model.OpKind.CREATE_SNAPSHOT and p.disk_id is not None:
        out.append(Want(p.disk_id, Mode.WRITE))
    folded = p.folded_image_id or p.absorbed_image_id
    if op.kind.is_fix and folded is not None:
        out.append(Want(folded, Mode.WRITE))
    source = p.source()
    if source is not None:
        out.append(Want(source, Mode.READ, local=False))
    return out


_ids = itertools.count(1)


def _still(held: leases.Held, what: str) -> None:
    if not held.valid():
        raise errors.ClaimLost(f"{what} no longer holds its lease; it writes nothing")


def leases_of(keys: dict[Key, Mode], repo_uuid: str) -> dict[str, leases.Mode]:
    """The sanlock lease modes the claimed images of one repository need: a writer holds its
    image's lease exclusively, a reader shares it with the other readers."""
    return {image_id: leases.Mode.EXCLUSIVE if mode == Mode.WRITE else leases.Mode.SHARED
            for (uuid, image_id), mode in keys.items() if uuid == repo_uuid}


class Claims:
    """The claim model of one host: its table, and the durable claims of its repositories."""

    def __init__(self, host: host.Host) -> None:
        self.host = host
        self.table = Table()
        # The leases this host holds for its consumers (prepareImage until teardownImage).
        self._consumers: dict[Key, leases.Held] = {}
        self._consumer_lock = threading.Lock()

    # -- taking claims -------------------------------------------------------------------------

    def claim(self, what: str, writes: Iterable[tuple[contract.Repository, str]] = (),
              reads: Iterable[tuple[contract.Repository, str]] = (),
              owner: str | None = None, lasting: bool = False, wait: float = CALL_WAIT,
              cancel: command.Cancel | None = None,
              whole: contract.Repository | None = None) -> Claim:
        """Claim images (all at once, or none): ImageBusy when another owner of this host
        uses one, LeaseHeld when another host holds its lease, LockspaceNotJoined when this
        host cannot take leases in its repository now. ``whole``: a repository this owner
        works on as a whole (clean): on shared storage, its repository lease too, so no two
        hosts do that at once."""
        keys: dict[Key, Mode] = {}
        reads, writes = list(reads), list(writes)
        shared = {r.uuid: r for r, _ in [*reads, *writes] if r.membership is not None}
        if whole is not None and whole.membership is not None:
            shared[whole.uuid] = whole
        for r, image_id in reads:
            keys[(r.uuid, image_id)] = Mode.READ
        for r, image_id in writes:
            keys[(r.uuid, image_id)] = Mode.WRITE  # a write covers a read of the same image
        for r in shared.values():
            assert r.membership is not None
            r.membership.require_joined(what)  # at once, before waiting for anyone
        owner = owner or f"call-{next(_ids)}"
        claim = self.table.acquire(owner, what, keys, lasting, wait, cancel)
        try:
            for repo_uuid, r in shared.items():
                assert r.membership is not None
                wanted = leases_of(keys, repo_uuid)
                if whole is r:
                    wanted[leases.REPOSITORY_LEASE] = leases.Mode.EXCLUSIVE
                claim.leases[repo_uuid] = r.membership.space.acquire(wanted, what)
        except BaseException:
            claim.release()
            raise
        return claim

    def claim_operation(self, repo: contract.Repository, op: model.Operation,
                        cancel: command.Cancel | None = None) -> Claim:
        """An operation's claim while it runs here: everything its journal names."""
        writes: list[tuple[contract.Repository, str]] = []
        reads: list[tuple[contract.Repository, str]] = []
        for w in wanted_by(op):
            where = repo if w.local else self._holding(repo, op, w.image_id)
            if where is None:
                continue  # its source is not connected: the step that reads it says so
            (writes if w.mode == Mode.WRITE else reads).append((where, w.image_id))
        return self.claim(f"{op.kind.value} operation {op.id}", writes, reads, owner=op.id,
                          lasting=True, cancel=cancel)

    def _holding(self, repo: contract.Repository, op: model.Operation,
                 image_id: str) -> contract.Repository | None:
        for conn in self.host.connections():
            if conn.repo is repo and image_id == op.image_id:
                continue
            img = conn.repo.get_image(image_id)
            if img is not None and img.strong and not img.removed:
                return conn.repo
        return None

    @contextlib.contextmanager
    def record_change(self, repo: contract.Repository, image_id: str,
                      what: str) -> Iterator[None]:
        """A change of an image's record by a call that takes no claim (setImageUserData: it
        may change an image an operation or a consumer of this host is using). On a shared
        repository it still holds the image's lease meanwhile: otherwise a host could write
        the record back over another host's seal, undoing it (LeaseHeld while another host
        works on the image, LockspaceNotJoined before joining)."""
        if repo.membership is None:
            yield
            return
        repo.membership.require_joined(what)
        held = repo.membership.space.acquire_for_record(image_id, what)
        try:
            fence = contract.fence.set(lambda: _still(held, what))
            try:
                yield
            finally:
                contract.fence.reset(fence)
        finally:
            held.release()

    def hold_for_consumer(self, repo: contract.Repository,
                          image_id: str) -> dict[str, Any] | None:
        """On a shared repository, hold an image's lease for its consumer until teardown (a
        shared lease: another host's writer, merge or removal is refused, while a VM moving
        between hosts may have it prepared on both for a moment). Call under a claim of the
        image. Returns what the consumer's own lease manager needs; None on a local one."""
        if repo.membership is None:
            return None
        key = (repo.uuid, image_id)
        with self._consumer_lock:
            if key not in self._consumers:
                self._consumers[key] = repo.membership.space.acquire(
                    {image_id: leases.Mode.SHARED}, f"the consumer of {image_id}")
        return {"lockspace": repo.uuid, "resource": image_id, "mode": "shared",
                "path": leases.area_path(repo.root, image_id), "offset": 0}

    def let_consumer_go(self, repo: contract.Repository, image_id: str) -> None:
        with self._consumer_lock:
            held = self._consumers.pop((repo.uuid, image_id), None)
        if held is not None:
            held.release()

    # -- who uses an image ---------------------------------------------------------------------

    @staticmethod
    def working_elsewhere(repo: contract.Repository, image_id: str) -> leases.Owner | None:
        """The other live host holding an image's lease (shared repositories): the one really
        working on it, or holding it for its consumer. None: nobody, or a dead host (its
        operations wait for a mend)."""
        if repo.membership is None:
            return None
        try:
            owners = repo.membership.space.owners(image_id)
        except errors.RepositoryUnavailable:
            return None
        for owner in owners:
            if owner.host_id != repo.membership.space.host_id and owner.alive:
                return owner
        return None

    def conflicts(self, repo: contract.Repository, image: model.Image, mode: Mode,
                  ignore: Iterable[str | None] = (),
                  chain: Iterable[str] = ()) -> list[Holder]:
        """Everyone whose use of ``image`` clashes with using it in ``mode``: held claims, the
        unfinished operations of every connected repository, and its consumers. ``chain``: the
        image's volumes, when a fix that rewrites one of them counts too (a consumer would
        read a layer in the middle of being rewritten). ``ignore``: the caller's own owners."""
        skip = {o for o in ignore if o is not None}
        out = [h for h in self.table.holders((repo.uuid, image.id))
               if h.owner not in skip and clash(mode, h.mode)]
        seen = {h.owner for h in out} | skip
        for h in self._durable(repo, image, set(chain)):
            if h.owner not in seen and clash(mode, h.mode):
                out.append(h)
                seen.add(h.owner)
        return out

    def _durable(self, repo: contract.Repository, image: model.Image,
                 chain: set[str]) -> Iterator[Holder]:
        for host_id in image.prepared_by:
            consumer = Mode.WRITE if image.kind == model.Kind.DISK else Mode.READ
            yield Holder(f"consumer:{host_id}", f"a consumer on host {host_id} (prepared)",
                         consumer, True)
        for conn in self.host.connections():
            try:
                ops = journals.naming(conn.repo, image.id, chain)
            except errors.RepositoryUnavailable as e:
                # Its own calls fail; it must not fail every other repository's too. What it
                # journaled about this image (a copy reading it) is told once it answers
                # again; its running operations are in the table above.
                log.warning("event=claims_unreadable repo=%s error=%r", conn.repo_id, e.message)
                continue
            for op in ops:
                if op.state == model.OpState.ABORTED:
                    continue
                for mode in _modes(conn.repo is repo, op, image.id, chain):
                    if self._unfinished(conn.repo, op):
                        yield Holder(op.id, f"{op.kind.value} operation {op.id} of image "
                                     f"{op.image_id} in repository "
                                     f"{self.host.repo_id_of(conn.repo)!r}", mode, True)
                    break

    @staticmethod
    def _unfinished(repo: contract.Repository, op: model.Operation) -> bool:
        """An operation whose image still waits for it (a journal left by a crash after its
        seal, or written before its image, claims nothing)."""
        img = repo.get_image(op.image_id)
        if img is None:
            return False
        return img.fix_id == op.id if op.kind.is_fix else (img.operation_id == op.id
                                                             and not img.removed)


def _modes(same_repo: bool, op: model.Operation, image_id: str,
           chain: set[str]) -> Iterator[Mode]:
    for w in wanted_by(op):
        if w.image_id != image_id:
            continue
        # A local want names an image of the operation's own repository; a source is read by
        # id from any repository, never the operation's own image (a snapshot's copy has its
        # source's id).
        mine = same_repo if w.local else not (same_repo and image_id == op.image_id)
        if mine:
            yield w.mode
    if same_repo and op.kind.is_fix and op.params.rewrites in chain:
        yield Mode.WRITE
