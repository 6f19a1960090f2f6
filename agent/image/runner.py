"""Runs journaled operations on a pool of real worker threads.

The journal on the repository is the truth; this module only keeps which operations this process
is running right now (so the checker does not offer to mend them) and their cancellation tokens.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator

from agent import command, crashpoint, errors, host, logctx
from agent.image import claims, model, operations
from agent.repo import contract

log = logging.getLogger(__name__)

# Progress is persisted at most this often (seconds) while a step runs: a repository write per
# qemu-img progress line would cost more than the copy.
PROGRESS_INTERVAL = 1.0
# How long an operation waits at its start for a lease another host's call holds, or for a
# repository still joining its lockspace (2·ioTimeout+1 s: 21 s at the default 10).
CLAIM_WAIT = 30.0
# The lanes of a repository's operations: data moves in one, quick operations run in the other.
DATA = "data"
QUICK = "quick"
QUICK_WORKERS = 8


class Runner:
    def __init__(self, host: host.Host, workers: int, quick_workers: int = QUICK_WORKERS) -> None:
        self.host = host
        # Two lanes per repository, each its own pool: operations stuck in a failed file
        # system (frozen, a lost server) hold only their own repository's workers, never
        # another's; and an operation over in milliseconds (operations.quick: an empty qcow2,
        # a reflink) never queues behind copies (a thin create waited 5-14 s behind 4-8 of
        # them when both shared one queue).
        self._workers = {DATA: workers, QUICK: quick_workers}
        self._pools: dict[tuple[str, str], concurrent.futures.ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        self._active: dict[str, tuple[command.Cancel, concurrent.futures.Future[None]]] = {}
        # The live record of each running operation: fresher than the journal, whose progress
        # is written at most every PROGRESS_INTERVAL.
        self._live: dict[str, model.Operation] = {}
        # Of those, each that makes an image (not a fix), by (repository uuid, image id), until
        # its last step: it holds the image's claim, so nothing else writes the image's
        # records meanwhile and its status is this record's (getImageStatus answers from here
        # without a read of the repository, which on shared storage costs a round trip per
        # record and competed with the copy it was asked about).
        self._making: dict[tuple[str, str], model.Operation] = {}
        # Operations that failed and could not write so (the repository is full): their
        # error is told from here until a mend starts them again.
        self._unrecorded: dict[str, model.Operation] = {}
        self._committing: set[str] = set()
        self._closing = False

    def is_active(self, op_id: str) -> bool:
        with self._lock:
            return op_id in self._active or op_id in self._committing

    @contextlib.contextmanager
    def committing(self, op_id: str) -> Iterator[None]:
        """An operation whose intent a call is committing, its journal first (outside the
        metadata lock) and its image record next (under it): active from the start, so no
        check takes the journal, alone for a moment, for a finished one to clean. Over when
        the call has submitted it (then it is active as queued) or failed."""
        with self._lock:
            self._committing.add(op_id)
        try:
            yield
        finally:
            with self._lock:
                self._committing.discard(op_id)

    def live(self, op_id: str) -> model.Operation | None:
        """The in-memory state of an operation this process is running, if it is."""
        with self._lock:
            return self._live.get(op_id) or self._unrecorded.get(op_id)

    def making(self, repo: contract.Repository, image_id: str) -> model.Operation | None:
        """The operation this process runs to make an image, while it runs a step before
        the last (the seal, which writes the image record)."""
        with self._lock:
            return self._making.get((repo.uuid, image_id))

    def submit(self, repo: contract.Repository, op: model.Operation) -> None:
        """Queue an operation (its journal as just written) in its lane; a no-op when this
        process already runs it."""
        op_id = op.id
        # A quick operation whose reflink the file system refuses copies in the quick lane:
        # rare (a btrfs NOCOW file), and it still never delays the data lane.
        lane = QUICK if operations.quick(repo, op) else DATA
        with self._lock:
            if self._closing:
                raise errors.Error("the agent is shutting down")
            if op_id in self._active:
                return
            cancel = command.Cancel()
            self._unrecorded.pop(op_id, None)
            pool = self._pools.get((repo.uuid, lane))
            if pool is None:
                pool = self._pools[repo.uuid, lane] = concurrent.futures.ThreadPoolExecutor(
                    self._workers[lane], thread_name_prefix=f"{lane}-{repo.uuid[:8]}")
            future = pool.submit(self._run, repo, op_id, cancel)
            self._active[op_id] = (cancel, future)
        future.add_done_callback(lambda _f: self._forget(op_id))

    def _forget(self, op_id: str) -> None:
        with self._lock:
            self._active.pop(op_id, None)
            self._live.pop(op_id, None)

    def wait(self, op_ids: list[str], timeout: float) -> bool:
        """Wait until none of these operations runs in this process (at most ``timeout``
        seconds): on their futures, no polling. True when none runs any more."""
        with self._lock:
            futures = [self._active[o][1] for o in op_ids if o in self._active]
        _, not_done = concurrent.futures.wait(futures, timeout)
        return not not_done

    def stop(self, op_id: str, timeout: float = 60.0) -> bool:
        """Stop a running operation and wait for it to record that; False if it was not running."""
        with self._lock:
            entry = self._active.get(op_id)
        if entry is None:
            return False
        cancel, future = entry
        cancel.request("client")
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise errors.ImageBusy(f"operation {op_id} did not stop within {timeout} s") from None
        return True

    def interrupt(self, op_ids: list[str]) -> None:
        """Stop operations as a crash would (their children killed, nothing recorded): they
        stay resumable from the journal, here or on another host."""
        with self._lock:
            cancels = [self._active[o][0] for o in op_ids if o in self._active]
        for cancel in cancels:
            cancel.request("shutdown")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Interrupt every operation as a crash would, so a later start can mend them."""
        with self._lock:
            self._closing = True
            entries = list(self._active.values())
        for cancel, _ in entries:
            cancel.request("shutdown")
        concurrent.futures.wait([f for _, f in entries], timeout)
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- one operation -----------------------------------------------------------------------

    def _run(self, repo: contract.Repository, op_id: str, cancel: command.Cancel) -> None:
        token = logctx.operation_id.set(op_id)
        try:
            self._run_steps(repo, op_id, cancel)
        finally:
            logctx.operation_id.reset(token)
            # Before the future resolves: whoever waits on it then sees it inactive.
            self._forget(op_id)

    def _run_steps(self, repo: contract.Repository, op_id: str,
                   cancel: command.Cancel) -> None:
        op = repo.get_operation(op_id)
        if op is None or op.state in (model.OpState.ABORTED, model.OpState.STOPPED):
            return  # gone, or stopped by a client between a mend and this start
        # The operation's own claim, for as long as it runs here: everything its journal names.
        # It waits the milliseconds a call that just committed it still holds its claim.
        deadline = time.monotonic() + CLAIM_WAIT
        while True:
            try:
                claim = self.host.claims.claim_operation(repo, op, cancel)
                break
            except errors.OperationStopped:
                return  # stopped before it began: nothing done, nothing to record
            except (errors.LeaseHeld, errors.LockspaceNotJoined) as e:
                # Passing on shared storage: another host's call holds a lease for the
                # milliseconds it takes to refuse (it read this operation's journal under
                # it), or a repository it names is still joining its lockspace (a mend sent
                # right after a connect). Wait for that; a lease another host keeps holding
                # is a failure to record like any other.
                if time.monotonic() < deadline and not cancel.requested:
                    time.sleep(0.2)
                    continue
                error: errors.Error = e
            except errors.Error as e:
                # Another operation owns what this one needs (ImageBusy: it never runs twice
                # at once), or its repository fails: recorded, never lost (an operation whose
                # claim failed silently stayed broken with no error and nobody running it).
                error = e
            log.warning("event=op_not_claimed image=%s error=%r", op.image_id, error.message)
            self._failed(repo, op, error.message, functools.partial(_write, repo, op))
            return
        try:
            # Under the claim, the journal again: a removal or a stop may have come first.
            op = repo.get_operation(op_id)
            if op is None or op.state in (model.OpState.ABORTED, model.OpState.STOPPED):
                return
            # Every repository write of this run checks the claim first (contract.fence).
            fence = contract.fence.set(claim.check)
            try:
                self._run_claimed(repo, op, cancel, claim)
            finally:
                contract.fence.reset(fence)
                with self._lock:  # however it ended, the records tell its image's status
                    self._making.pop((repo.uuid, op.image_id), None)
        finally:
            claim.release()

    def _run_claimed(self, repo: contract.Repository, op: model.Operation,
                     cancel: command.Cancel, claim: claims.Claim) -> None:
        op_id = op.id
        steps = operations.STEPS[op.kind]
        last_write = [0.0]
        making = (repo.uuid, op.image_id)
        with self._lock:
            self._live[op_id] = op
            if not op.kind.is_fix:
                self._making[making] = op

        def persist() -> None:
            with repo.meta_lock:
                claim.check()  # never a journal write by an owner that lost its claim
                if repo.get_operation(op_id) is not None:
                    repo.put_operation(op)
            last_write[0] = time.monotonic()

        def report(percent: float) -> None:
            value = int(percent)
            if value != op.progress.percent:
                op.progress.percent = value
                if time.monotonic() - last_write[0] >= PROGRESS_INTERVAL:
                    persist()

        fresh = op.step == 0 and op.state == model.OpState.PENDING
        op.state = model.OpState.RUNNING
        op.progress.host_id = self.host.host_id
        # With the host id, the fencing token of this run (on a shared repository): whoever
        # resumes it after this host died takes the lease again, and its version moves on.
        op.progress.lease_version = claim.lease_version(repo.uuid, op.image_id)
        op.progress.last_error = None
        ctx = operations.Context(self.host, repo, op, cancel, report, persist, claim)
        log.info("event=op_start kind=%s image=%s step=%d", op.kind, op.image_id, op.step)
        try:
            # A fresh quick operation (an empty qcow2, a reflink) is over in milliseconds: its
            # journal is not written again until it ends, as each write would be a fifth of
            # its time; a crash resumes it from its first step, which every step allows.
            # Anything that moves data says at once that it runs, and where, so a crash shows
            # it interrupted on this host, and records each step done. (A clone that turns out
            # to be a copy says so itself: Context.persist.)
            fresh = fresh and operations.quick(repo, op)
            while op.step < len(steps):
                name, fn = steps[op.step]
                op.progress.stage = f"{op.step + 1}/{len(steps)}"
                op.progress.percent = 0
                # The journal records each step done, so a resume skips it. Not for a fresh
                # quick operation (above), nor before the last step (seal is cheap and
                # idempotent, and deletes the journal): every step is safe to run again.
                if not fresh and op.step < len(steps) - 1:
                    persist()
                cancel.check()
                crashpoint.hit(op.kind.value, name)
                if op.step == len(steps) - 1:
                    claim.finishing = True
                    with self._lock:  # from here the records tell the image's status
                        self._making.pop(making, None)
                fn(ctx)
                log.info("event=step_done step=%s", name)
                if op.step == len(steps) - 1:
                    break  # the last step (seal) removed the journal
                op.step += 1
        except errors.ClaimLost as e:
            log.warning("event=op_claim_lost step=%d error=%r", op.step, e.message)
            return  # as a crash leaves it: whoever holds the repository next resumes it
        except errors.OperationStopped:
            if cancel.reason == "shutdown":
                log.info("event=op_interrupted step=%d", op.step)
                return  # left as a crash leaves it: "running" in the journal, mend resumes it
            self._failed(repo, op, "stopped by client", persist)
        except errors.Error as e:
            # Over either way: a client that sees the failure and calls at once (the image
            # given back by a failed fix reads "optimized" before the claim goes) waits the
            # milliseconds until the release, instead of being refused.
            claim.finishing = True
            self._failed(repo, op, str(e), persist)
        except Exception as e:
            log.exception("event=op_crashed")
            claim.finishing = True
            self._failed(repo, op, f"internal error: {e.__class__.__name__}: {e}", persist)
        else:
            log.info("event=op_done kind=%s image=%s", op.kind, op.image_id)

    def _failed(self, repo: contract.Repository, op: model.Operation, message: str,
                persist: Callable[[], None]) -> None:
        log.warning("event=op_failed image=%s error=%r", op.image_id, message)
        try:
            if op.kind.is_fix and op.step == 0:
                # A failed fix must leave the image as usable as before: give it back.
                operations.release_fix(repo, op, message)
                return
            op.state = model.OpState.STOPPED
            op.progress.last_error = message
            persist()
        except (errors.Error, OSError) as e:
            # Most often the very lack of space the operation failed on. The journal still
            # says what to resume; the error is told from memory until then.
            log.warning("event=failure_unrecorded image=%s error=%r", op.image_id, str(e))
            op.state = model.OpState.STOPPED
            op.progress.last_error = f"{message} (not recorded in the repository: {e})"
            with self._lock:
                self._unrecorded[op.id] = op


def _write(repo: contract.Repository, op: model.Operation) -> None:
    """Record an operation that never got its claim, unless it is gone meanwhile."""
    with repo.meta_lock:
        if repo.get_operation(op.id) is not None:
            repo.put_operation(op)
