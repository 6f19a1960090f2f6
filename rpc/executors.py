"""The threads that run one repository's calls, and the bounded wait for them.

A file system that stops answering (frozen, a dying disk, a lost NFS server) blocks every
thread that touches it, in the kernel, where nothing can interrupt it. Calls about one
repository therefore run on that repository's own few threads: a stuck repository holds only
those, never the host pool that serves host calls and the other repositories. The RPC side
waits for an answer at most ``timeout`` seconds, then tells the client so (RepositoryUnavailable:
the call did not start and nothing was done, or it started and may still complete). While
every thread is stuck longer than that, new calls about the repository fail at once instead of
queueing behind calls that may never end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.threadpool

from agent import errors

log = logging.getLogger(__name__)


class _Task:
    """One call; whether it started is decided once, against the waiter giving up."""

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        self._fn = fn
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self.state = "queued"  # -> "running" on a thread, or "abandoned" by the waiter
        self.started = 0.0

    def run(self, executor: Executor) -> tuple[bool, Any]:
        with self._lock:
            if self.state == "abandoned":
                return False, None  # its caller was told nothing was done: keep it so
            self.state = "running"
            self.started = time.monotonic()
        executor._began(self)
        # The outcome travels back as a value: gevent re-raising some exceptions across the
        # thread boundary can fail (a RecursionError's traceback), leaving the call hanging.
        try:
            return True, self._fn(**self._kwargs)
        except BaseException as e:
            return False, e
        finally:
            executor._ended(self)

    def abandon(self) -> bool:
        """Give up waiting; True when it had not started, so it never will."""
        with self._lock:
            if self.state == "queued":
                self.state = "abandoned"
                return True
            return False


class Executor:
    """The threads of one repository's calls (see the module's doc)."""

    def __init__(self, repo_id: str, threads: int, timeout: float, owner: Any = None) -> None:
        self.repo_id = repo_id
        self.threads = threads
        self.timeout = timeout
        # What this executor serves (the repository's connection): a new connection under
        # the same repoId gets new threads, not the ones a forced disconnect left stuck.
        self.owner = owner
        # Idle threads end after a minute: a quiet repository costs no thread.
        self._pool = gevent.threadpool.ThreadPool(threads, idle_task_timeout=60)
        # The calls running now; held only to add or remove one, never across a call.
        self._lock = threading.Lock()
        self._running: set[_Task] = set()

    def _began(self, task: _Task) -> None:
        with self._lock:
            self._running.add(task)

    def _ended(self, task: _Task) -> None:
        with self._lock:
            self._running.discard(task)

    def stuck(self) -> int:
        """How many of its threads have run one call longer than the timeout."""
        cutoff = time.monotonic() - self.timeout
        with self._lock:
            return sum(1 for t in self._running if t.started < cutoff)

    def idle(self) -> bool:
        with self._lock:
            return not self._running

    def saturated(self) -> bool:
        return self.stuck() >= self.threads

    def run(self, method: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """``fn(**kwargs)`` on one of the threads, waited for (by this greenlet) at most
        ``timeout`` seconds."""
        if self.saturated():
            raise self.unavailable(
                method, f"all its {self.threads} threads have been stuck for more than "
                f"{self.timeout:g} s; the call was not started, nothing was done")
        task = _Task(fn, kwargs)
        timer = gevent.Timeout(self.timeout)
        timer.start()
        try:
            # spawn itself waits for a free thread: the timer bounds that wait too.
            ok, value = self._pool.spawn(task.run, self).get()
        except gevent.Timeout as t:
            if t is not timer:
                raise
            if task.abandon():
                raise self.unavailable(
                    method, f"no thread of it was free within {self.timeout:g} s; the call "
                    "was not started, nothing was done") from None
            raise self.unavailable(
                method, f"it did not answer within {self.timeout:g} s; the call goes on "
                "and may still complete: look at the repository's state (getImageStatus, "
                "listImages) before calling again") from None
        finally:
            timer.close()
        if not ok:
            raise value
        return value

    def unavailable(self, method: str, why: str) -> errors.RepositoryUnavailable:
        log.warning("event=repository_unavailable repo=%s method=%s why=%r",
                    self.repo_id, method, why)
        return errors.RepositoryUnavailable(
            f"repository {self.repo_id!r} is not answering {method}: {why}. Its file system "
            "may be frozen, failed or hung; other repositories are not affected",
            repoId=self.repo_id,
        )

    def retire(self) -> None:
        """Let its threads end once their calls do; returns at once."""
        gevent.spawn(self._pool.kill)
