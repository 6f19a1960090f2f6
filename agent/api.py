"""The API of one agent, as plain Python: one method per call of the contract.

Arguments arrive already checked against the API document by ``rpc``; this layer adds the checks
that need the repository's state. Every method blocks (fsync, qemu-img): call it on a real thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from agent import errors, fileio, host, repo, requests
from agent.fix import check as checker
from agent.fix import fixes
from agent.image import memo, model, operations, runner, service
from agent.repo import contract, layout

log = logging.getLogger(__name__)

VERSION = "0.1.0"
# How long a request id is remembered by default: [agent] request_ttl.
REQUEST_TTL = 86400.0
RUN_DIR = "/run/strata"

T = TypeVar("T")

# How long listStorageRepositories waits for one repository's capacity and counts (statvfs and
# a directory listing: microseconds on a healthy file system) before answering it from its last
# answer, marked unavailable: a host call must not hang on one repository's file system.
INFO_WAIT = 2.0
# How long a forced disconnect waits for the repository's operations to stop, and for the
# journal read that names them: it lets the repository go after this, whatever still runs.
FORCE_WAIT = 5.0

# waitForOperations: how long it waits by default, and at most (seconds; below [rpc]
# repository_call_timeout's default of 30, as it waits on one of the repository's threads).
WAIT_TIMEOUT = 10.0
WAIT_MAX = 20.0

# The params that name the repository a call is about (copyImage also reads its source's).
REPO_PARAMS = ("repoId", "repositoryId", "targetRepoId")


class Api:
    def __init__(self, host_id: int, workers: int, state_dir: str | None = None,
                 max_chain_depth: int = 10, request_ttl: float = REQUEST_TTL,
                 run_dir: str | None = None,
                 quick_workers: int = runner.QUICK_WORKERS) -> None:
        # Runtime files (the mounts of the shared formats): [agent] run_dir; by default next
        # to the state, or /run/strata for an agent that keeps no state.
        if run_dir is None:
            run_dir = os.path.join(state_dir, "run") if state_dir is not None else RUN_DIR
        self.host = host.Host(host_id, run_dir)
        self.runner = runner.Runner(self.host, workers, quick_workers)
        self.max_chain_depth = max_chain_depth
        self.images = service.ImageService(self.host, self.runner, max_chain_depth)
        self.host.on_lockspace_lost = self._lockspace_lost
        self.started = time.time()
        # Connections are remembered so a restarted agent (after a crash, an upgrade) serves the
        # same repoIds at once; the cluster manager may still reconnect, which is idempotent.
        self._connections_file = (
            os.path.join(state_dir, "connections.json") if state_dir is not None else None
        )
        # repoId -> the last getStorageRepositoryInfo answered, and the one being asked now:
        # listStorageRepositories answers from the first when the second does not come back.
        self._info_lock = threading.Lock()
        self._last_info: dict[str, dict[str, Any]] = {}
        self._probes: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}
        # repoId -> why calls about it fail now, as the RPC layer saw it (a timeout, a full
        # executor, an I/O error); cleared by the next call that succeeds.
        self._failures: dict[str, str] = {}
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

    def resume_interrupted(self) -> tuple[int, int]:
        """Take up again, in every connected repository, the operations that were running when
        the agent stopped or died, or were queued to run (``Operation.resumes_on_start``): each
        through its own mend fix, the very path a client's fix call takes. What a client
        stopped, what failed and AutoFix=false intents keep waiting for a mend, and so does a
        copy whose source is in no connected repository (it could only fail). Returns
        (resumed, left waiting); one log line for each, then a summary."""
        resumed = waiting = 0
        for conn in self.host.connections():
            ms = conn.repo.membership
            if ms is not None:
                # A shared repository connected a moment ago is still joining its lockspace
                # (2·ioTimeout+1 s): its mends would all be refused with LockspaceNotJoined
                # and left waiting for a client. Take them up once joined.
                ms.wait_joined(2 * ms.space.io_timeout + 11)
            try:
                mends = self._checker(conn.repo_id).check({fixes.FixType.MEND})
            except (errors.Error, OSError) as e:
                log.warning("event=resume_failed repo=%s error=%r", conn.repo_id, str(e))
                continue
            for fix in mends:
                op_id = fix.facts.get("op")
                op = conn.repo.get_operation(op_id) if op_id and not fix.manual else None
                if op is None:
                    continue  # a chain fault, or a finding for a person: not an operation
                why = self._waits_because(conn.repo, op)
                if why is not None:
                    waiting += 1
                    log.info("event=resume_waits repo=%s op=%s kind=%s image=%s reason=%r",
                             conn.repo_id, op.id, op.kind.value, op.image_id, why)
                    continue
                try:
                    # The path a client's fix call takes: claimed and derived again first.
                    self._checker(conn.repo_id).apply(fix.to_dict())
                except (errors.Error, OSError) as e:
                    waiting += 1
                    log.warning("event=resume_failed repo=%s op=%s image=%s error=%r",
                                conn.repo_id, op.id, op.image_id, str(e))
                    continue
                resumed += 1
                log.info("event=resumed repo=%s op=%s kind=%s image=%s step=%d state=%s",
                         conn.repo_id, op.id, op.kind.value, op.image_id, op.step + 1,
                         op.state.value)
        log.info("event=resume_summary resumed=%d waiting=%d", resumed, waiting)
        return resumed, waiting

    def _waits_because(self, repository: contract.Repository,
                       op: model.Operation) -> str | None:
        if op.state == model.OpState.STOPPED:
            return f"stopped: {op.progress.last_error or 'no error recorded'}"
        if not op.resumes_on_start:
            return "committed with AutoFix=false"
        source = op.params.source()
        if source is not None and operations.find_source(self.host, repository, op) is None:
            return f"its source image {source} is not in any connected repository"
        return None

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

    def repositories_of(self, method: str, params: dict[str, Any]) -> tuple[str, ...]:
        """The repositories a call waits on, first the one it is about; none for a host call.
        A forced disconnect is a host call: it must work when the repository's own calls are
        all stuck in its file system."""
        if method == "disconnectStorageRepository" and (params.get("options") or {}).get("force"):
            return ()
        repos = [params[p] for p in REPO_PARAMS if isinstance(params.get(p), str)]
        hints = (params.get("options") or {}).get("imageHints") or {}
        for key in ("imageId", "baseSnapshotId", "baseVirtualDiskId"):
            hinted = hints.get(params.get(key)) if isinstance(params.get(key), str) else None
            if isinstance(hinted, str) and hinted not in repos:
                repos.append(hinted)
        return tuple(repos)

    def repository_at(self, path: Any) -> str | None:
        """The repoId of the connected repository holding ``path``, if any."""
        if not isinstance(path, str):
            return None
        for conn in self.host.connections():
            if path == conn.repo.root or path.startswith(conn.repo.root + os.sep):
                return conn.repo_id
        return None

    def name_failure(self, e: errors.RepositoryUnavailable, default: str) -> str:
        """Name the repository in an error raised where only its path was known (fileio);
        return its repoId."""
        repo_id = e.data.get("repoId") or self.repository_at(e.data.get("path")) or default
        if "repoId" not in e.data:
            e.data["repoId"] = repo_id
            e.message = f"repository {repo_id!r}: {e.message}"
            e.args = (e.message,)
        return str(repo_id)

    def note_failure(self, repo_id: str, why: str | None) -> None:
        """What the RPC layer saw of a repository's calls: why they fail, or None once one
        succeeds again. Shown by listStorageRepositories and getStorageRepositoryInfo."""
        with self._info_lock:
            if why is None:
                self._failures.pop(repo_id, None)
            elif self.host.get(repo_id) is not None:
                self._failures[repo_id] = why

    def close(self) -> None:
        self.runner.shutdown()
        self.host.close()

    # -- repositories --------------------------------------------------------------------------

    def formatStorageRepository(
        self, repoFormat: str, connectionParameters: dict[str, Any], options: dict[str, Any]
    ) -> dict[str, Any]:
        def call(_: requests.Attempt) -> dict[str, Any]:
            connected = tuple(c.repo.root for c in self.host.connections())
            repo_uuid = self.host.driver(repoFormat).format(
                connectionParameters, options, self.host.run_dir, connected)
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
            # A repository connected just now: its records are read in the background (the
            # cache every repository-wide call then answers from), not before the answer, so
            # a connect costs the same at 10 or 100,000 images. A connect of a repository
            # already connected counts them: that is quick once they are read.
            info = self._info(repoId, count=not changed)
        except Exception:
            if changed:
                self.host.disconnect(repoId)  # never keep a repository we cannot serve
            raise
        if changed:
            self._save_connections()
            threading.Thread(target=self._read_records, args=(repoId,),
                             name=f"read-{repoId}", daemon=True).start()
        info["changed"] = changed
        return info

    def _read_records(self, repo_id: str) -> None:
        """Every record of a repository connected just now, read once (what its first
        listing, check or count would otherwise wait for)."""
        conn = self.host.get(repo_id)
        if conn is None:
            return
        t0 = time.monotonic()
        try:
            images, _ = conn.repo.scan_images()
            volumes, _ = conn.repo.scan_volumes()
            ops, _ = conn.repo.scan_operations()
            # And what a listing derives from them (chains, files, summaries: kept while the
            # records stay the same), so the first listing after a connect is a quick one.
            self.images.list_images(repo_id, {})
        except errors.RepositoryNotConnected:
            return  # disconnected meanwhile: nothing to read ahead for
        except Exception as e:  # its calls say so; this is only a head start
            log.warning("event=records_read_failed repo=%s error=%r", repo_id, str(e))
            return
        log.info("event=records_read repo=%s images=%d volumes=%d journals=%d seconds=%.2f",
                 repo_id, len(images), len(volumes), len(ops), time.monotonic() - t0)

    def _in_use(self, conn: host.Connection) -> tuple[list[str], list[str], list[str]]:
        """The operations running on a repository, its prepared images, and the copies
        elsewhere that read from it right now: the claims on it say who (no journal scan)."""
        claimed = self.host.claims.table.lasting_in(conn.repo.uuid)
        mine = {op.id for op in conn.repo.operations()}
        running = [c.owner for c in claimed if c.owner in mine]
        readers = [c.owner for c in claimed if c.owner not in mine]
        # Prepared here: on a shared repository another host's consumers are that host's
        # business, and must not keep this host from leaving.
        prepared = [i.id for i in conn.repo.images() if self.host.host_id in i.prepared_by]
        return running, prepared, readers

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
        if options.get("force", False):
            self._force_disconnect(conn)
            return
        running, prepared, readers = self._in_use(conn)
        if running or prepared or readers:
            raise errors.ImageBusy(
                f"repository {repoId!r} is in use: {len(running)} running operation(s), "
                f"{len(prepared)} prepared image(s), {len(readers)} copy(ies) reading from it; "
                "finish or tear them down, or pass options.force=true (operations stay "
                "resumable)",
                repoId=repoId,
            )
        self._forget(repoId)

    def _force_disconnect(self, conn: host.Connection) -> None:
        """Let the repository go, whatever its file system does: stop what runs there for at
        most FORCE_WAIT (each operation stays in the journal, resumable: mend), close the
        agent's lock on it, forget it. Calls stuck in its file system stay stuck until it
        answers; they find the repository closed then, and write nothing more."""
        deadline = time.monotonic() + FORCE_WAIT
        # Who runs there, or reads from there, is in the claims (no read of its journal,
        # which may hang): every operation that claims an image of it is stopped.
        ops = [c.owner for c in self.host.claims.table.in_repository(conn.repo.uuid)
               if c.lasting]
        for op_id in ops:
            with contextlib.suppress(errors.ImageBusy):  # asks each at once; all waited below
                self.runner.stop(op_id, timeout=0)
        while any(self.runner.is_active(o) for o in ops) and time.monotonic() < deadline:
            time.sleep(0.05)
        still = [o for o in ops if self.runner.is_active(o)]
        # Whatever still runs loses its claims: its next record write fails (ClaimLost), and
        # the operation stays resumable from the journal.
        self.host.claims.table.revoke(conn.repo.uuid)
        log.warning("event=disconnect_forced repo=%s stopped=%d still_running=%s",
                    conn.repo_id, len(ops) - len(still), ",".join(still) or "-")
        self._forget(conn.repo_id)

    def _lockspace_lost(self, conn: host.Connection, why: str) -> None:
        """This host's storage stopped answering for a shared repository: stop writing there
        before sanlock would kill the agent. Its operations are interrupted as a crash
        interrupts them (their qemu-img killed, nothing more written: resumable by a mend here
        or on another host); the leases go once this returns. Its other repositories go on."""
        ops = [c.owner for c in self.host.claims.table.in_repository(conn.repo.uuid)
               if c.lasting]
        self.runner.interrupt(ops)
        deadline = time.monotonic() + conn.repo.io_timeout
        while any(self.runner.is_active(o) for o in ops) and time.monotonic() < deadline:
            time.sleep(0.05)
        log.warning("event=lockspace_lost_stopped repo=%s operations=%d still_running=%s "
                    "reason=%r", conn.repo_id, len(ops),
                    ",".join(o for o in ops if self.runner.is_active(o)) or "-", why)

    def _forget(self, repo_id: str) -> None:
        self.host.disconnect(repo_id)
        with self._info_lock:
            self._last_info.pop(repo_id, None)
            self._probes.pop(repo_id, None)
            self._failures.pop(repo_id, None)
        self._save_connections()

    def listStorageRepositories(self) -> list[dict[str, Any]]:
        """Every connected repository, each answered within INFO_WAIT: one whose file system
        does not answer is listed from its last answer, marked unavailable (and stale)."""
        conns = self.host.connections()
        probes = [(c, self._probe(c)) for c in conns]
        deadline = time.monotonic() + INFO_WAIT
        out = []
        for conn, probe in probes:
            error: str
            try:
                info = probe.result(max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                error = (f"repository {conn.repo_id!r} did not answer within {INFO_WAIT:g} s: "
                         "its file system may be frozen or hung")
            except errors.Error as e:
                error = e.message
            except Exception as e:  # never fail the whole listing for one repository
                log.warning("event=info_failed repo=%s error=%r", conn.repo_id, str(e))
                error = "internal error; the agent's log has the details"
            else:
                out.append(info)
                continue
            with self._info_lock:
                last = self._last_info.get(conn.repo_id)
            base = last or {"repoId": conn.repo_id, "repoFormat": conn.repo_format,
                            "repoUUID": conn.repo.uuid,
                            "connectionParameters": conn.parameters}
            out.append({**base, "available": False, "error": error, "stale": last is not None,
                        "lockspace": conn.repo.lockspace_state()})
        return out

    def _probe(self, conn: host.Connection) -> concurrent.futures.Future[dict[str, Any]]:
        """getStorageRepositoryInfo on a thread of its own; at most one at a time per
        repository, so a hung file system holds one thread however often it is listed."""
        with self._info_lock:
            probe = self._probes.get(conn.repo_id)
            if probe is not None and not probe.done():
                return probe
            probe = self._probes[conn.repo_id] = concurrent.futures.Future()
        threading.Thread(target=_fulfil, args=(probe, self.getStorageRepositoryInfo,
                                                conn.repo_id),
                         name=f"info-{conn.repo_id}", daemon=True).start()
        return probe

    def getStorageRepositoryInfo(self, repoId: str) -> dict[str, Any]:
        return self._info(repoId)

    def _info(self, repoId: str, count: bool = True) -> dict[str, Any]:
        """``count=False``: images null (not counted yet), its records not read."""
        conn = self.host.connection(repoId)
        capacity, free = conn.repo.capacity()
        counts: dict[str, int] | None = None
        damage: list[layout.Damage] = []
        if count:
            images, damage = conn.repo.scan_images()
            counts = memo.of(conn.repo).counts(images)
        info = {
            "repoId": repoId,
            "repoFormat": conn.repo_format,
            "repoUUID": conn.repo.uuid,
            "connectionParameters": conn.parameters,
            "capabilities": conn.repo.capabilities(),
            "capacity": capacity,
            "free": free,
            "images": counts,
            # Image records that cannot be read, so not counted (checkStorageRepository lists
            # every damaged record as a finding).
            "warnings": [d.to_dict() for d in damage],
        }
        with self._info_lock:
            if count:
                self._last_info[repoId] = info
            failure = self._failures.get(repoId)
        # Its records read fine, but its calls may still fail (a frozen file system reads).
        # The lockspace is this host's own state, known without I/O: always fresh.
        return {**info, "available": failure is None, "error": failure, "stale": False,
                "lockspace": conn.repo.lockspace_state()}

    # -- images --------------------------------------------------------------------------------

    def _create(self, method: str, params: dict[str, Any],
                make: Callable[[model.Options, str | None], str]) -> str:
        """A call that makes an image, at most once per requestId: a retry of an attempt cut
        short after its commit finds the image it reserved the id of."""
        target = params["targetRepoId"]

        def call(attempt: requests.Attempt) -> str:
            if attempt.retry and self._made(target, attempt.reserved_id):
                return attempt.reserved_id
            return make(model.Options.parse(params["options"]), attempt.reserved_id)

        result: str = self._once(method, params, call)
        return result

    def createVirtualDisk(
        self,
        targetRepoId: str,
        size: int,
        baseSnapshotId: str | None,
        userData: dict[str, Any],
        options: dict[str, Any],
    ) -> str:
        return self._create(
            "createVirtualDisk",
            {"targetRepoId": targetRepoId, "size": size, "baseSnapshotId": baseSnapshotId,
             "userData": userData, "options": options},
            lambda opts, reserved: self.images.create_virtual_disk(
                targetRepoId, size, baseSnapshotId, userData, opts, new_image_id=reserved),
        )

    def createSnapshot(
        self,
        targetRepoId: str,
        baseVirtualDiskId: str,
        userData: dict[str, Any],
        options: dict[str, Any],
    ) -> str:
        return self._create(
            "createSnapshot",
            {"targetRepoId": targetRepoId, "baseVirtualDiskId": baseVirtualDiskId,
             "userData": userData, "options": options},
            lambda opts, reserved: self.images.create_snapshot(
                targetRepoId, baseVirtualDiskId, userData, opts, new_image_id=reserved),
        )

    def copyImage(
        self,
        targetRepoId: str,
        imageId: str,
        baseImageId: str | None,
        userData: dict[str, Any],
        options: dict[str, Any],
    ) -> str:
        # A snapshot's copy keeps its id and a copy already there is a no-op: only a disk's
        # copy gets the reserved id.
        return self._create(
            "copyImage",
            {"targetRepoId": targetRepoId, "imageId": imageId, "baseImageId": baseImageId,
             "userData": userData, "options": options},
            lambda opts, reserved: self.images.copy_image(
                targetRepoId, imageId, baseImageId, userData, opts, new_image_id=reserved),
        )

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
        try:
            return self.images.image_status(repositoryId, imageId)
        except errors.RepositoryUnavailable as e:
            # Runs inline, on the event loop: not through the RPC layer that names the
            # repository of other calls' failures.
            self.note_failure(self.name_failure(e, repositoryId), e.message)
            raise

    def waitForOperations(self, repositoryId: str, imageIds: list[str],
                          options: dict[str, Any]) -> list[dict[str, Any] | None]:
        timeout = min(float(options.get("timeout", WAIT_TIMEOUT)), WAIT_MAX)
        return self.images.wait(repositoryId, imageIds, timeout)

    def listImages(self, repositoryId: str, options: dict[str, Any]
                   ) -> list[dict[str, Any]] | dict[str, Any]:
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
            done = self._checker(repositoryId).apply(fix)
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


def _fulfil(future: concurrent.futures.Future[T], fn: Callable[[str], T], arg: str) -> None:
    try:
        future.set_result(fn(arg))
    except BaseException as e:
        future.set_exception(e)

