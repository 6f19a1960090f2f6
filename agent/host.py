"""This host: its id and the repositories connected to it under client-chosen repoIds."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

from agent import errors, repo
from agent.image import claims, model
from agent.repo import contract, leases, lockspace

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Connection:
    repo_id: str
    repo_format: str
    parameters: dict[str, Any]
    repo: contract.Repository


@dataclasses.dataclass
class Found:
    """An image located in a connected repository."""

    repo_id: str
    repo: contract.Repository
    image: model.Image


class Host:
    def __init__(self, host_id: int, run_dir: str) -> None:
        self.host_id = host_id
        # Where the formats that mount their file system mount it ([agent] run_dir).
        self.run_dir = run_dir
        # Guards the two dicts only, never held across I/O: a repository whose file system
        # hangs must not stop the calls about the others (each looks its connection up here).
        self._lock = threading.Lock()
        self._connections: dict[str, Connection] = {}
        # repoId -> root of the connections being opened right now, outside the lock.
        self._opening: dict[str, str] = {}
        # Who may change which image now: the one place every call, operation and fix asks.
        self.claims = claims.Claims(self)
        # Told when this host loses a shared repository's lockspace (its storage stopped
        # answering), before the leases go: the agent stops what runs there.
        self.on_lockspace_lost: Callable[[Connection, str], None] | None = None

    # -- connections -------------------------------------------------------------------------

    @staticmethod
    def driver(repo_format: str) -> type[contract.Repository]:
        try:
            return repo.FORMATS[repo_format]
        except KeyError:
            raise errors.UnsupportedFormat(
                f"unknown repoFormat {repo_format!r}; supported: {', '.join(sorted(repo.FORMATS))}"
            ) from None

    def connect(self, repo_id: str, repo_format: str, parameters: dict[str, Any]) -> bool:
        """Connect; return False when it was already connected with the same parameters."""
        driver = self.driver(repo_format)
        root = driver.location(parameters, self.run_dir)  # checks them: nothing touched yet
        with self._lock:
            existing = self._connections.get(repo_id)
            if existing is not None:
                if existing.repo_format == repo_format and existing.parameters == parameters:
                    return False
                raise errors.RepositoryAlreadyConnected(
                    f"repoId {repo_id!r} is already connected with other parameters "
                    f"({existing.repo_format} {existing.parameters}); disconnect it first",
                    repoId=repo_id,
                )
            if repo_id in self._opening:
                raise errors.RepositoryAlreadyConnected(
                    f"repoId {repo_id!r} is being connected by another call", repoId=repo_id
                )
            roots = {c.repo_id: c.repo.root for c in self._connections.values()}
            for other, other_root in [*roots.items(), *self._opening.items()]:
                if other_root == root:
                    raise errors.RepositoryAlreadyConnected(
                        f"{root} is already connected as repoId {other!r}", repoId=repo_id
                    )
            self._opening[repo_id] = root
        # Opening reads and writes the repository (its lock, the probes): outside the lock,
        # so a file system that hangs holds only this call.
        try:
            r = driver.open(parameters, self.run_dir)
        except BaseException:
            with self._lock:
                del self._opening[repo_id]
            raise
        conn = Connection(repo_id, repo_format, dict(parameters), r)
        with self._lock:
            del self._opening[repo_id]
            # The same repository under other parameters (another mount option, another
            # server name): serving it twice would run two writers on one set of records.
            same = [c.repo_id for c in self._connections.values() if c.repo.uuid == r.uuid]
            if not same:
                self._connections[repo_id] = conn
        if same:
            r.close()
            raise errors.RepositoryAlreadyConnected(
                f"repository {r.uuid} is already connected as repoId {same[0]!r}",
                repoId=repo_id)
        if r.shared:
            # Joined in the background: reads work at once, changes once it is joined.
            space = leases.Lockspace(r.root, r.uuid, self.host_id, r.io_timeout)
            r.membership = lockspace.Membership(space, lambda why: self._lost(conn, why),
                                                r.recover)
            r.membership.start()
        log.info("event=connected repo=%s format=%s root=%s", repo_id, repo_format, r.root)
        return True

    def _lost(self, conn: Connection, why: str) -> None:
        if self.on_lockspace_lost is not None:
            self.on_lockspace_lost(conn, why)
        # Whatever still holds a claim there finds it gone at its next write.
        self.claims.table.revoke(conn.repo.uuid)

    def disconnect(self, repo_id: str) -> Connection:
        with self._lock:
            conn = self._connections.pop(repo_id, None)
        if conn is None:
            raise errors.RepositoryNotConnected(f"repository {repo_id!r} is not connected")
        conn.repo.close()
        log.info("event=disconnected repo=%s", repo_id)
        return conn

    def connection(self, repo_id: str) -> Connection:
        with self._lock:
            conn = self._connections.get(repo_id)
        if conn is None:
            raise errors.RepositoryNotConnected(
                f"repository {repo_id!r} is not connected", repoId=repo_id
            )
        return conn

    def connections(self) -> list[Connection]:
        with self._lock:
            return list(self._connections.values())

    def get(self, repo_id: str) -> Connection | None:
        """The connection under ``repo_id``, or None."""
        with self._lock:
            return self._connections.get(repo_id)

    def repo_id_of(self, r: contract.Repository) -> str | None:
        for conn in self.connections():
            if conn.repo is r:
                return conn.repo_id
        return None

    # -- finding images ----------------------------------------------------------------------

    def find_image(
        self,
        image_id: str,
        options: model.Options | None = None,
        include_removed: bool = False,
    ) -> Found:
        """Look an image up in every connected repository, or where options narrow it to."""
        options = options or model.Options()
        hints = options.hints
        if image_id in hints:
            conn = self.connection(hints[image_id])
            img = conn.repo.get_image(image_id)
            if img is None or (img.removed and not include_removed):
                raise errors.ImageNotFound(
                    f"image {image_id} is not in repository {conn.repo_id!r} (imageHints)",
                    imageId=image_id,
                )
            return Found(conn.repo_id, conn.repo, img)
        candidates = options.participating
        conns = (
            [self.connection(r) for r in candidates] if candidates else self.connections()
        )
        failed: list[errors.RepositoryUnavailable] = []
        damaged: errors.RecordDamaged | None = None
        for conn in conns:
            try:
                img = conn.repo.get_image(image_id)
            except errors.RepositoryUnavailable as e:
                # A failed repository must not fail a lookup another one answers.
                failed.append(e)
                continue
            except errors.RecordDamaged as e:
                damaged = e  # that repository's record cannot be read: look on elsewhere
                continue
            if img is not None and (include_removed or not img.removed):
                return Found(conn.repo_id, conn.repo, img)
        if failed:
            raise failed[0]  # it may be there: not found would be a guess
        if damaged is not None:
            raise damaged
        where = "participating repositories" if candidates else "connected repositories"
        raise errors.ImageNotFound(
            f"image {image_id} is not in any of the {where}", imageId=image_id
        )

    def find_volume(self, vol_id: str) -> tuple[contract.Repository, model.Volume] | None:
        damaged: errors.RecordDamaged | None = None
        for conn in self.connections():
            try:
                vol = conn.repo.get_volume(vol_id)
            except errors.RepositoryUnavailable as e:
                # Asked for every volume not found where it was first looked for (the top of
                # an image being made, too): a failed repository must not fail the calls of
                # the others. A chain leaning on a volume there reads as a missing parent, a
                # manual finding the checker reports and never acts on.
                log.debug("event=volume_lookup_skipped volume=%s repo=%s error=%r",
                          vol_id, conn.repo_id, str(e))
                continue
            except errors.RecordDamaged as e:
                damaged = e
                continue
            if vol is not None:
                return conn.repo, vol
        if damaged is not None:
            raise damaged
        return None

    def close(self) -> None:
        # Side by side: leaving a lockspace waits for sanlock (2·io_timeout or so each).
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda c: c.repo.close(), self.connections()))
        with self._lock:
            self._connections.clear()
