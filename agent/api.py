"""The API of one agent, as plain Python: one method per call of the contract.

Arguments arrive already checked against the API document by ``rpc``; this layer adds the checks
that need the repository's state. Every method blocks (fsync, qemu-img): call it on a real thread.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from agent import errors, fileio, host, repo, requests
from agent.fix import check as checker
from agent.fix import fixes
from agent.image import model, runner, service

log = logging.getLogger(__name__)

VERSION = "0.1.0"
# How long a request id is remembered by default: [agent] request_ttl.
REQUEST_TTL = 86400.0


class Api:
    def __init__(self, host_id: int, workers: int, state_dir: str | None = None,
                 max_chain_depth: int = 10, request_ttl: float = REQUEST_TTL) -> None:
        self.host = host.Host(host_id)
        self.runner = runner.Runner(self.host, workers)
        self.max_chain_depth = max_chain_depth
        self.images = service.ImageService(self.host, self.runner, max_chain_depth)
        self.started = time.time()
        # Connections are remembered so a restarted agent (after a crash, an upgrade) serves the
        # same repoIds at once; the cluster manager may still reconnect, which is idempotent.
        self._connections_file = (
            os.path.join(state_dir, "connections.json") if state_dir is not None else None
        )
        # Every data-changing call goes through it: options.requestId makes a retry safe.
        self.requests = requests.Store(
            os.path.join(state_dir, "requests") if state_dir is not None else None, request_ttl
        )

    def _once(self, method: str, params: dict[str, Any],
              call: Callable[[requests.Attempt], Any]) -> Any:
        """Run a data-changing call at most once per ``options.requestId``."""
        options = params.get("options") or {}
        return self.requests.run(options.get("requestId"), method, params, call)

    def _made(self, repo_id: str, image_id: str) -> bool:
        """Whether an attempt cut short already made this image (in any state)."""
        try:
            return self.host.connection(repo_id).repo.get_image(image_id) is not None
        except errors.Error:
            return False  # the call itself says what is wrong with the repository

    def restore_connections(self) -> None:
        if self._connections_file is None or not os.path.exists(self._connections_file):
            return
        for c in fileio.read_json(self._connections_file):
            try:
                self.host.connect(c["repoId"], c["repoFormat"], c["connectionParameters"])
            except errors.Error as e:
                log.warning("event=reconnect_failed repo=%s error=%r", c["repoId"], str(e))

    def _save_connections(self) -> None:
        if self._connections_file is None:
            return
        os.makedirs(os.path.dirname(self._connections_file), exist_ok=True)
        fileio.write_json(
            self._connections_file,
            [
                {"repoId": c.repo_id, "repoFormat": c.repo_format,
                 "connectionParameters": c.parameters}
                for c in self.host.connections()
            ],
        )

    # Calls that only read a bounded handful of records: polled many times a second by cluster
    # managers, and cheap enough to answer without a hop to a worker thread, which costs more
    # than the call itself (measured: 2,100 against 4,650 getImageStatus calls/s, 8 clients).
    INLINE = frozenset({"getImageStatus"})

    def runs_inline(self, method: str, params: dict[str, Any]) -> bool:
        """Whether a call may run on the caller's thread (the RPC event loop) without blocking
        it: a bounded read of a repository whose driver reads without blocking."""
        if method not in self.INLINE:
            return False
        try:
            conn = self.host.connection(params.get("repositoryId", ""))
        except errors.Error:
            return True  # answered at once with an error
        return conn.repo.INLINE_READS

    def close(self) -> None:
        self.runner.shutdown()
        self.host.close()

    # -- repositories --------------------------------------------------------------------------

    def formatStorageRepository(
        self, repoFormat: str, connectionParameters: dict[str, Any], options: dict[str, Any]
    ) -> dict[str, Any]:
        def call(_: requests.Attempt) -> dict[str, Any]:
            repo_uuid = self.host.driver(repoFormat).format(connectionParameters)
            log.info("event=formatted format=%s uuid=%s", repoFormat, repo_uuid)
            return {"repoUUID": repo_uuid, "repoFormat": repoFormat}

        result: dict[str, Any] = self._once(
            "formatStorageRepository",
            {"repoFormat": repoFormat, "connectionParameters": connectionParameters,
             "options": options},
            call)
        return result

    def connectStorageRepository(
        self,
        repoId: str,
        repoFormat: str,
        connectionParameters: dict[str, Any],
        options: dict[str, Any],
    ) -> dict[str, Any]:
        result: dict[str, Any] = self._once(
            "connectStorageRepository",
            {"repoId": repoId, "repoFormat": repoFormat,
             "connectionParameters": connectionParameters, "options": options},
            lambda _: self._connect(repoId, repoFormat, connectionParameters),
        )
        return result

    def _connect(self, repoId: str, repoFormat: str,
                 connectionParameters: dict[str, Any]) -> dict[str, Any]:
        changed = self.host.connect(repoId, repoFormat, connectionParameters)
        try:
            info = self.getStorageRepositoryInfo(repoId)
        except Exception:
            if changed:
                self.host.disconnect(repoId)  # never keep a repository we cannot serve
            raise
        if changed:
            self._save_connections()
        info["changed"] = changed
        return info

    def disconnectStorageRepository(self, repoId: str, options: dict[str, Any]) -> None:
        def call(attempt: requests.Attempt) -> None:
            try:
                self._disconnect(repoId, options)
            except errors.RepositoryNotConnected:
                if not attempt.retry:
                    raise
                # The attempt cut short disconnected it: that is the answer it would have had.

        self._once("disconnectStorageRepository", {"repoId": repoId, "options": options}, call)

    def _disconnect(self, repoId: str, options: dict[str, Any]) -> None:
        conn = self.host.connection(repoId)
        running = [op.id for op in conn.repo.operations() if self.runner.is_active(op.id)]
        prepared = [i.id for i in conn.repo.images() if i.prepared_by]
        # Copies elsewhere that read from this repository right now.
        readers = [op.id for c in self.host.connections() if c is not conn
                   for op in c.repo.operations()
                   if self.runner.is_active(op.id) and conn.repo.get_image(
                       op.params.source() or ""
                   ) is not None]
        if (running or prepared or readers) and not options.get("force", False):
            raise errors.ImageBusy(
                f"repository {repoId!r} is in use: {len(running)} running operation(s), "
                f"{len(prepared)} prepared image(s), {len(readers)} copy(ies) reading from it; "
                "finish or tear them down, or pass options.force=true (operations stay "
                "resumable)",
                repoId=repoId,
            )
        for op_id in readers:
            self.runner.stop(op_id)
        for op_id in running:
            self.runner.stop(op_id)
        self.host.disconnect(repoId)
        self._save_connections()

    def listStorageRepositories(self) -> list[dict[str, Any]]:
        return [self.getStorageRepositoryInfo(c.repo_id) for c in self.host.connections()]

    def getStorageRepositoryInfo(self, repoId: str) -> dict[str, Any]:
        conn = self.host.connection(repoId)
        capacity, free = conn.repo.capacity()
        counts = {"disk": 0, "snapshot": 0, "incomplete": 0, "removed": 0}
        for img in conn.repo.images():
            if img.removed:
                counts["removed"] += 1
            elif not img.strong:
                counts["incomplete"] += 1
            else:
                counts[img.kind.value] += 1
        return {
            "repoId": repoId,
            "repoFormat": conn.repo_format,
            "repoUUID": conn.repo.uuid,
            "connectionParameters": conn.parameters,
            "capabilities": conn.repo.capabilities(),
            "capacity": capacity,
            "free": free,
            "images": counts,
        }

    # -- images --------------------------------------------------------------------------------

    def createVirtualDisk(
        self,
        targetRepoId: str,
        size: int,
        baseSnapshotId: str | None,
        userData: dict[str, Any],
        options: dict[str, Any],
    ) -> str:
        def call(attempt: requests.Attempt) -> str:
            if attempt.retry and self._made(targetRepoId, attempt.reserved_id):
                return attempt.reserved_id
            return self.images.create_virtual_disk(
                targetRepoId, size, baseSnapshotId, userData, model.Options.parse(options),
                new_image_id=attempt.reserved_id,
            )

        result: str = self._once(
            "createVirtualDisk",
            {"targetRepoId": targetRepoId, "size": size, "baseSnapshotId": baseSnapshotId,
             "userData": userData, "options": options},
            call,
        )
        return result

    def createSnapshot(
        self,
        targetRepoId: str,
        baseVirtualDiskId: str,
        userData: dict[str, Any],
        options: dict[str, Any],
    ) -> str:
        def call(attempt: requests.Attempt) -> str:
            if attempt.retry and self._made(targetRepoId, attempt.reserved_id):
                return attempt.reserved_id
            return self.images.create_snapshot(
                targetRepoId, baseVirtualDiskId, userData, model.Options.parse(options),
                new_image_id=attempt.reserved_id,
            )

        result: str = self._once(
            "createSnapshot",
            {"targetRepoId": targetRepoId, "baseVirtualDiskId": baseVirtualDiskId,
             "userData": userData, "options": options},
            call,
        )
        return result

    def copyImage(
        self,
        targetRepoId: str,
        imageId: str,
        baseImageId: str | None,
        userData: dict[str, Any],
        options: dict[str, Any],
    ) -> str:
        def call(attempt: requests.Attempt) -> str:
            # A snapshot's copy keeps its id and a copy already there is a no-op: only a disk's
            # copy gets the reserved id.
            if attempt.retry and self._made(targetRepoId, attempt.reserved_id):
                return attempt.reserved_id
            return self.images.copy_image(
                targetRepoId, imageId, baseImageId, userData, model.Options.parse(options),
                new_image_id=attempt.reserved_id,
            )

        result: str = self._once(
            "copyImage",
            {"targetRepoId": targetRepoId, "imageId": imageId, "baseImageId": baseImageId,
             "userData": userData, "options": options},
            call,
        )
        return result

    def removeImage(self, repositoryId: str, imageId: str, options: dict[str, Any]) -> None:
        def call(attempt: requests.Attempt) -> None:
            try:
                self.images.remove_image(repositoryId, imageId)
            except errors.ImageNotFound:
                if not attempt.retry:
                    raise
                # Already removed: by the attempt cut short, the answer it would have had.

        self._once("removeImage",
                   {"repositoryId": repositoryId, "imageId": imageId, "options": options}, call)

    def getImageStatus(self, repositoryId: str, imageId: str) -> dict[str, Any]:
        return self.images.image_status(repositoryId, imageId)

    def listImages(self, repositoryId: str, options: dict[str, Any]) -> list[dict[str, Any]]:
        return self.images.list_images(repositoryId, options)

    def getImageInfo(self, repositoryId: str, imageId: str) -> dict[str, Any]:
        return self.images.image_info(repositoryId, imageId)

    def setImageUserData(
        self, repositoryId: str, imageId: str, userData: dict[str, Any],
        options: dict[str, Any] | None = None,
    ) -> None:
        self._once("setImageUserData",
                   {"repositoryId": repositoryId, "imageId": imageId, "userData": userData,
                    "options": options or {}},
                   lambda _: self.images.set_user_data(repositoryId, imageId, userData))

    def prepareImage(
        self, repositoryId: str, imageId: str, options: dict[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = self._once(
            "prepareImage", {"repositoryId": repositoryId, "imageId": imageId, "options": options},
            lambda _: self.images.prepare(repositoryId, imageId))
        return result

    def teardownImage(
        self, repositoryId: str, imageId: str, options: dict[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = self._once(
            "teardownImage",
            {"repositoryId": repositoryId, "imageId": imageId, "options": options},
            lambda _: {"changed": self.images.teardown(repositoryId, imageId)})
        return result

    def stopOperation(self, repositoryId: str, imageId: str,
                      options: dict[str, Any] | None = None) -> None:
        self._once("stopOperation",
                   {"repositoryId": repositoryId, "imageId": imageId, "options": options or {}},
                   lambda _: self.images.stop_operation(repositoryId, imageId))

    # -- fixes ---------------------------------------------------------------------------------

    def checkStorageRepository(
        self, repositoryId: str, options: dict[str, Any]
    ) -> list[dict[str, Any]]:
        types = {fixes.FixType(t) for t in options.get("types") or []} or None
        found = self._checker(repositoryId).check(types, deep=bool(options.get("deep")))
        return [f.to_dict() for f in found]

    def fixStorageRepository(
        self, repositoryId: str, fix: dict[str, Any], options: dict[str, Any]
    ) -> dict[str, Any]:
        def call(_: requests.Attempt) -> dict[str, Any]:
            done = self._checker(repositoryId).apply(fix["type"], fix["data"])
            return {"type": done.type.value, "imageIds": done.image_ids}

        result: dict[str, Any] = self._once(
            "fixStorageRepository",
            {"repositoryId": repositoryId, "fix": fix, "options": options}, call)
        return result

    def _checker(self, repo_id: str) -> checker.Checker:
        repo = self.host.connection(repo_id).repo
        return checker.Checker(self.host, self.runner, repo, self.max_chain_depth)

    # -- host ----------------------------------------------------------------------------------

    def getHostInfo(self) -> dict[str, Any]:
        return {
            "hostID": self.host.host_id,
            "hostname": socket.gethostname(),
            "version": VERSION,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "repositories": [c.repo_id for c in self.host.connections()],
            "repoFormats": sorted(repo.FORMATS),
        }
