"""This host's membership of a shared repository's lockspace: joined in the background,
watched, given up before sanlock would kill the agent, and joined again.

States, as ``listStorageRepositories`` and ``getStorageRepositoryInfo`` tell them:

- ``joining``: asking sanlock for this host's id (``2·io_timeout + 1`` s when all is well).
  Reads work; data-changing calls are refused at once (``LockspaceNotJoined``).
- ``joined``: leases can be taken.
- ``failed``: with the reason: the join failed (another host uses this host id, the lockspace
  cannot be read), or this host's renewals stopped (its storage does not answer, its last good
  renewal is ``6·io_timeout`` old where sanlock gives up at ``8·io_timeout``). On a loss
  the agent stops writing there first (its operations stopped as a crash stops them, its
  qemu-img children killed, its leases let go) and only then says failed; it then tries to
  join again until the storage answers.

Whether the renewals are on time is read from the sanlock daemon's own status
(``renewal_last_success``, in CLOCK_MONOTONIC seconds), not from ``get_hosts``, which lags by
a renewal or two.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent import command, errors
from agent.repo import leases

log = logging.getLogger(__name__)

JOINING, JOINED, FAILED = "joining", "joined", "failed"


def daemon_status() -> dict[str, dict[str, str]]:
    """``sanlock client status -D``: lockspace name -> its fields (and "daemon" -> the daemon's)."""
    out = command.run(["sanlock", "client", "status", "-D"])
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in out.splitlines():
        if not line.startswith(" "):
            kind, _, rest = line.partition(" ")
            current = None
            if kind == "s":
                current = sections.setdefault(rest.split(":", 1)[0], {})
            elif kind == "daemon":
                current = sections.setdefault("daemon", {})
            continue
        if current is not None:
            key, _, value = line.strip().partition("=")
            current[key] = value
    return sections


class Membership:
    """One repository's lockspace as this host takes part in it."""

    def __init__(self, space: leases.Lockspace, on_lost: Callable[[str], None],
                 recover: Callable[[], None] = lambda: None) -> None:
        self.space = space
        self.on_lost = on_lost
        # Called before joining again after a loss or a failed join: the storage may need a
        # new mount before it answers again.
        self.recover = recover
        self._cond = threading.Condition()
        self._state = JOINING
        self._reason = ""
        self._since = time.time()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._joining = False  # inside add_lockspace now
        # monotonic second of this host's last good renewal, as the daemon last said.
        self._last_success: float | None = None
        self._expired = False  # a renewal was seen late: lost, whatever the daemon says next
        self._lost = ""  # why this host left the lockspace last, until it is joined again
        space.fresh = self.fresh

    # -- what callers see ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        with self._cond:
            out: dict[str, Any] = {"state": self._state, "hostId": self.space.host_id,
                                   "ioTimeout": self.space.io_timeout, "since": self._since}
            if self._reason:
                out["reason"] = self._reason
            return out

    @property
    def joined(self) -> bool:
        with self._cond:
            return self._state == JOINED

    def wait_joined(self, timeout: float) -> bool:
        """Wait while this host is still joining (at most ``timeout`` s); whether it joined."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._state == JOINING and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
            return self._state == JOINED

    def require_joined(self, what: str) -> None:
        with self._cond:
            state, reason = self._state, self._reason
        if state == JOINED:
            return
        why = {JOINING: "this host is still joining its lockspace (it takes "
               f"{2 * self.space.io_timeout + 1} s or so after connecting)",
               FAILED: f"this host is out of its lockspace: {reason}"}[state]
        raise errors.LockspaceNotJoined(
            f"{what} cannot change repository {self.space.repo_uuid}: {why}; reads still work",
            lockspace=self.space.repo_uuid, state=state)

    def renewal_age(self) -> float | None:
        """Seconds since this host's last good renewal, as last seen; None before any."""
        with self._cond:
            last = self._last_success
        return None if last is None else max(0.0, time.monotonic() - last)

    def fresh(self) -> bool:
        """Whether this host may still write under its leases: joined, and its last good
        renewal recent. A host frozen and thawed finds it old, and writes nothing more, even
        once its daemon renews again: another host may have taken its leases meanwhile, so
        a renewal seen late once is a loss for good (until the lockspace is joined again)."""
        age = self.renewal_age()
        with self._cond:
            if age is None or age >= self.space.loss_age:
                self._expired = True
            return self._state == JOINED and not self._expired

    # -- the watcher ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"lockspace-{self.space.repo_uuid[:8]}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Leave the lockspace (a disconnect): the leases go, then the host id. A join still in
        progress (add_lockspace blocks 2·io_timeout+1 s) is not waited for: the watcher
        leaves once it returns."""
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._cond.notify_all()
            joining = self._joining
        if joining:
            return
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.space.leave()

    def _set(self, state: str, reason: str = "") -> None:
        with self._cond:
            if (state, reason) != (self._state, self._reason):
                self._state, self._reason, self._since = state, reason, time.time()
        log.info("event=lockspace_state lockspace=%s state=%s reason=%r",
                 self.space.repo_uuid, state, reason)

    def _sleep(self, seconds: float) -> bool:
        """Wait; False when stopped meanwhile."""
        with self._cond:
            if not self._stopped:
                self._cond.wait(seconds)
            return not self._stopped

    @property
    def _poll(self) -> float:
        return min(1.0, self.space.io_timeout / 2)

    def _run(self) -> None:
        again = False
        while not self._stopped:
            if again:
                try:
                    self.recover()
                except Exception as e:
                    self._set(FAILED, f"{self._lost or 'out of the lockspace'}; the storage "
                              f"cannot be mounted again yet: {e}")
                    if not self._sleep(max(2.0, 2.0 * self.space.io_timeout)):
                        return
                    continue
            again = True
            if not self._join():
                if not self._sleep(max(2.0, 2.0 * self.space.io_timeout)):
                    return
                continue
            self._watch()

    def _join(self) -> bool:
        self._set(JOINING)
        with self._cond:
            if self._stopped:
                return False
            self._joining = True
        try:
            # Out of it: the daemon must have let the old membership go first (joining "again"
            # while it leaves would only find it there, still late).
            if self._lost and self.space.present():
                with contextlib.suppress(Exception):
                    self.space.remove()
                raise errors.Error("the daemon is still leaving the lockspace")
            self._add()
        except Exception as e:  # sanlock's errors, and the storage's
            self._set(FAILED, f"{self._lost}; not joined again yet: {e}" if self._lost
                      else f"cannot join the lockspace: {e}")
            return False
        finally:
            with self._cond:
                self._joining = False
                stopped = self._stopped
            if stopped:  # disconnected meanwhile: stop() left it to us
                self.space.leave()
        if stopped:
            return False
        with self._cond:
            self._expired = False
            self._last_success = None
            self._lost = ""
        self._observe_joined()
        self._set(JOINED)
        return True

    def _add(self) -> None:
        """Join; when sanlock says this host has the lockspace already, make sure it is not one
        on its way out. A disconnect does not wait for sanlock to give the host id back (2-3
        io_timeouts): a connect right after it is answered "exists" while the daemon no longer
        lists the lockspace, and it would say joined and lose it a moment later. Wait for that
        leave to end, then join anew."""
        deadline = time.monotonic() + 4 * self.space.io_timeout + 10
        while not self.space.join():
            # The daemon's own flags say whether it is being left (LSFLAG_REM); its status
            # output and inq_lockspace may still show it whole meanwhile.
            if self.space.daemon_flags() == 0:
                return  # really joined already (a reconnect while still a member)
            if time.monotonic() > deadline:
                raise errors.Error("sanlock is still giving this host's id in the lockspace "
                                   "back after an earlier disconnect")
            if not self._sleep(0.2):
                return

    def _observe_joined(self) -> None:
        """The first renewal of a join (fresh() would call its absence a loss)."""
        try:
            fields = daemon_status().get(self.space.name.decode()) or {}
            success = float(fields["renewal_last_success"])
        except (errors.Error, KeyError, ValueError):
            success = time.monotonic()  # just joined: add_lockspace renewed it
        with self._cond:
            self._last_success = success

    def _observe(self) -> str | None:
        """Read this host's renewal from the daemon; why this host is out, if it is."""
        late = self._late()
        if late is not None:
            return late  # late before this read: a later renewal does not give it back
        try:
            fields = daemon_status().get(self.space.name.decode())
        except errors.Error as e:
            log.warning("event=lockspace_status_failed lockspace=%s error=%r",
                        self.space.repo_uuid, str(e))
            return self._late()  # nothing learned: the age tells
        if fields is None:
            return "the sanlock daemon no longer has the lockspace"
        if fields.get("space_dead", "0") != "0":
            return "sanlock gave the lockspace up (its renewals failed for 8·io_timeout)"
        try:
            success = float(fields["renewal_last_success"])
        except (KeyError, ValueError):
            return self._late()
        with self._cond:
            self._last_success = max(success, self._last_success or 0.0)
        return self._late()

    def _late(self) -> str | None:
        if self.fresh():
            return None
        age = self.renewal_age()
        return ("this host's last good renewal of its lockspace was "
                f"{'never seen' if age is None else f'{age:.0f} s ago'} (its storage does not "
                "answer in time)")

    def _watch(self) -> None:
        while self._sleep(self._poll):
            why = self._observe()
            if why is not None:
                self._lose(why)
                return

    def _lose(self, why: str) -> None:
        log.warning("event=lockspace_lost lockspace=%s reason=%r", self.space.repo_uuid, why)
        # Stop writing first (operations, their qemu-img), then let the leases go: what is
        # left half done stays resumable from the journal, by this host or another.
        with self._cond:
            self._state, self._reason, self._since = FAILED, why, time.time()
            self._lost = why
        try:
            self.on_lost(why)
        finally:
            self.space.drop()
            # Past 8·io_timeout sanlock gives the lockspace up for good; until then it may
            # still say joined. Remove it ourselves so the next join starts clean.
            try:
                self.space.remove()
            except Exception as e:
                log.info("event=lockspace_remove_failed lockspace=%s error=%r",
                         self.space.repo_uuid, str(e))
