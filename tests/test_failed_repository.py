"""A failed repository fails only its own calls: frozen (fsfreeze), I/O errors (XFS shut down),
read-only; every other repository and every host call keep answering, and a forced disconnect
lets the repository (and its mount) go.

The real daemon, each repository on its own loop-mounted XFS. The daemon is started with a
configuration file (not --dev) to make the repository call timeout small.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rpc import transport
from tests import mounts, qemu
from tests.conftest import ROOT, Daemon, settle

pytestmark = [pytest.mark.root, pytest.mark.e2e]

MiB = qemu.MiB
TIMEOUT = 2  # [rpc] repository_call_timeout, seconds
THREADS = 2  # [rpc] repository_threads
UNAVAILABLE = 1106
# Generous bounds for "answered": a hung call would never answer at all. Calls about the
# failed repository must answer within its timeout, plus slack for a loaded 2-core machine.
PROMPT = 15.0
BOUNDED = TIMEOUT + 10.0


class ConfigDaemon(Daemon):
    """The real strata-agent started with ``--config``: a small repository call timeout."""

    def start(self, timeout: float = 20.0) -> None:
        os.makedirs(self.dir, exist_ok=True)
        conf = os.path.join(self.dir, "agent.conf")
        with open(conf, "w") as f:
            f.write(f"[rpc]\nsocket = {self.socket}\nrepository_call_timeout = {TIMEOUT}\n"
                    f"repository_threads = {THREADS}\n"
                    f"[agent]\nstate_dir = {os.path.join(self.dir, 'state')}\n")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rpc.main", "--config", conf],
                stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": ROOT},
            )
        proc = self.proc
        if not transport.wait_for_socket(self.socket, timeout, lambda: proc.poll() is None):
            raise AssertionError(f"agent did not listen (exit {proc.poll()}): {self.read_log()}")

    def within(self, seconds: float, method: str, *args: Any) -> Any:
        """A call that must answer within ``seconds`` (the client gives up after that)."""
        c = transport.Client(socket_path=self.socket, timeout=seconds)
        try:
            return c.call(method, *args)
        finally:
            c.close()

    def fails(self, method: str, *args: Any) -> tuple[transport.RemoteError, float]:
        """A call about the failed repository: it must answer RepositoryUnavailable, within
        the bound; its error and how long it took."""
        t = time.monotonic()
        with pytest.raises(transport.RemoteError) as info:
            self.within(BOUNDED + PROMPT, method, *args)
        e = info.value
        assert e.code == UNAVAILABLE and e.name == "RepositoryUnavailable", (method, e)
        return e, time.monotonic() - t


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def two_repositories(tmp_path: Any, mib: tuple[int, int] = (320, 320)
                     ) -> Iterator[tuple[ConfigDaemon, str, str]]:
    """The daemon with repository r1 on one XFS (returned: its mount point) and r2 on another,
    of ``mib`` MiB each; every mount unfrozen, made writable again and unmounted afterwards,
    whatever happened."""
    for sub in ("a", "b"):
        os.makedirs(tmp_path / sub)
    with mounts.loop_mount(str(tmp_path / "a"), "xfs", mib[0]) as a, \
            mounts.loop_mount(str(tmp_path / "b"), "xfs", mib[1]) as b:
        d = ConfigDaemon(str(tmp_path / "agent"))
        try:
            d.start()
            for name, mnt in (("r1", a), ("r2", b)):
                params = {"path": os.path.join(mnt, "repo")}
                d.call("formatStorageRepository", "localfs-1.0", params)
                d.call("connectStorageRepository", name, "localfs-1.0", params)
            yield d, a, b
        finally:
            for mnt in (a, b):
                _run("fsfreeze", "-u", mnt)  # fails harmlessly when it is not frozen
                _run("mount", "-o", "remount,rw", mnt)
            if d.proc is not None and d.proc.poll() is None:
                try:
                    d.stop()
                except subprocess.TimeoutExpired:
                    d.kill()


def _disk(d: ConfigDaemon, repo: str) -> str:
    disk: str = d.within(PROMPT, "createVirtualDisk", repo, 16 * MiB)
    assert settle(d.call, repo, disk, timeout=PROMPT)["status"] == "optimized"
    return disk


def _others_answer(d: ConfigDaemon) -> dict[str, dict[str, Any]]:
    """Host calls and the other repository answer; the repositories as listed."""
    info = d.within(PROMPT, "getHostInfo")
    assert info["repositories"] == ["r1", "r2"]
    disk = _disk(d, "r2")
    assert disk in [i["imageId"] for i in d.within(PROMPT, "listImages", "r2")]
    listed = {r["repoId"]: r for r in d.within(PROMPT, "listStorageRepositories")}
    assert listed["r2"]["available"] is True and listed["r2"]["error"] is None
    return listed


def test_a_frozen_repository_fails_its_own_calls_within_the_bound(tmp_path: Any) -> None:
    with two_repositories(tmp_path) as (d, a, _b):
        before = _disk(d, "r1")
        subprocess.run(["fsfreeze", "-f", a], check=True)
        pool = concurrent.futures.ThreadPoolExecutor(20)
        try:
            calls = [pool.submit(d.fails, "createVirtualDisk", "r1", 16 * MiB)
                     for _ in range(20)]
            time.sleep(0.5)  # they now hold (or wait for) every thread r1 has
            listed = _others_answer(d)
            answers = [c.result() for c in calls]
        finally:
            pool.shutdown(wait=False)
        for e, took in answers:
            assert "'r1'" in e.message and took < BOUNDED + PROMPT, (e.message, took)
        started = [e for e, _ in answers if "may still complete" in e.message]
        assert 1 <= len(started) <= THREADS, [e.message for e, _ in answers]
        assert all("nothing was done" in e.message for e, _ in answers if e not in started)

        # Its threads are all stuck now: a new call about r1 fails at once, and says so.
        e, _ = d.fails("createVirtualDisk", "r1", 16 * MiB)
        assert "nothing was done" in e.message
        listed = {r["repoId"]: r for r in d.within(PROMPT, "listStorageRepositories")}
        assert listed["r1"]["available"] is False and "r1" in listed["r1"]["error"]
        assert _others_answer(d)["r1"]["available"] is False

        subprocess.run(["fsfreeze", "-u", a], check=True)
        # The stuck calls end, and r1 works again.
        deadline = time.monotonic() + PROMPT
        while True:
            try:
                after = _disk(d, "r1")
                break
            except transport.RemoteError as e:
                assert e.code == UNAVAILABLE and time.monotonic() < deadline, e
                time.sleep(0.2)
        listed = {r["repoId"]: r for r in d.within(PROMPT, "listStorageRepositories")}
        assert listed["r1"]["available"] is True and listed["r1"]["error"] is None
        # Nothing lost, nothing made twice: the calls told "nothing was done" made nothing;
        # those told "may still complete" did.
        images = d.call("listImages", "r1", {"includeIncomplete": True})
        made = {i["imageId"] for i in images} - {before, after}
        assert len(made) == len(started), (images, [e.message for e in started])
        for image_id in made:
            assert settle(d.call, "r1", image_id, timeout=PROMPT)["status"] == "optimized"


def test_connecting_a_frozen_repository_holds_only_that_call(tmp_path: Any) -> None:
    with two_repositories(tmp_path) as (d, a, _b):
        params = {"path": os.path.join(a, "third")}
        d.call("formatStorageRepository", "localfs-1.0", params)
        subprocess.run(["fsfreeze", "-f", a], check=True)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            connect = pool.submit(d.fails, "connectStorageRepository", "r3", "localfs-1.0",
                                  params)
            time.sleep(0.5)
            _others_answer(d)
            e, _ = connect.result()
        assert "'r3'" in e.message
        subprocess.run(["fsfreeze", "-u", a], check=True)


def test_forced_disconnect_of_a_frozen_repository_lets_it_go(tmp_path: Any) -> None:
    with two_repositories(tmp_path) as (d, a, _b):
        subprocess.run(["fsfreeze", "-f", a], check=True)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            stuck = [pool.submit(d.fails, "createVirtualDisk", "r1", 16 * MiB)
                     for _ in range(4)]
            [c.result() for c in stuck]
        # A plain disconnect goes through the repository's own (stuck) threads.
        e, _ = d.fails("disconnectStorageRepository", "r1")
        assert "nothing was done" in e.message
        assert d.within(PROMPT, "disconnectStorageRepository", "r1", {"force": True}) is None
        assert d.within(PROMPT, "getHostInfo")["repositories"] == ["r2"]
        _disk(d, "r2")
        # The agent holds nothing there: once the stuck writes drain the mount can go, and
        # the repository connects again (its lock was released), every image intact.
        subprocess.run(["fsfreeze", "-u", a], check=True)
        params = {"path": os.path.join(a, "repo")}
        deadline = time.monotonic() + PROMPT
        while True:
            try:
                d.within(PROMPT, "connectStorageRepository", "r1", "localfs-1.0", params)
                break
            except transport.RemoteError as e:
                assert e.code == UNAVAILABLE and time.monotonic() < deadline, e
                time.sleep(0.2)
        # The calls stuck in the file system committed their intent when it thawed; the
        # disconnect kept them from running further: each is resumable with a fix.
        for fix in d.call("checkStorageRepository", "r1"):
            d.call("fixStorageRepository", "r1", fix)
        for img in d.call("listImages", "r1", {"includeIncomplete": True}):
            st = settle(d.call, "r1", img["imageId"], timeout=PROMPT)
            assert st["status"] == "optimized", (st, d.read_log())
        assert d.call("checkStorageRepository", "r1") == []
        assert d.call("disconnectStorageRepository", "r1") is None
        assert _run("umount", a).returncode == 0, "the agent still holds the mount"


def test_io_errors_fail_only_that_repository_and_forced_disconnect_lets_the_mount_go(
        tmp_path: Any) -> None:
    with two_repositories(tmp_path) as (d, a, _b):
        disk = _disk(d, "r1")
        d.call("prepareImage", "r1", disk)  # in use: a plain disconnect would refuse
        subprocess.run(["xfs_io", "-x", "-c", "shutdown", a], check=True)
        for method, args in (("createVirtualDisk", ("r1", 16 * MiB)),
                             ("getImageStatus", ("r1", disk)),
                             ("listImages", ("r1",)),
                             ("getStorageRepositoryInfo", ("r1",)),
                             ("checkStorageRepository", ("r1",)),
                             ("disconnectStorageRepository", ("r1",))):
            e, _ = d.fails(method, *args)
            assert "'r1'" in e.message and "EIO" in e.message, (method, e.message)
        listed = _others_answer(d)
        assert listed["r1"]["available"] is False and "EIO" in listed["r1"]["error"]
        assert d.within(PROMPT, "disconnectStorageRepository", "r1", {"force": True}) is None
        assert d.within(PROMPT, "getHostInfo")["repositories"] == ["r2"]
        _disk(d, "r2")
        # No descriptor of the agent's keeps the failed file system: it unmounts, not lazily.
        r = _run("umount", a)
        assert r.returncode == 0, r.stderr


def test_a_read_only_repository_refuses_writes_clearly_and_still_reads(tmp_path: Any) -> None:
    with two_repositories(tmp_path) as (d, a, _b):
        disk = _disk(d, "r1")
        path = d.path("r1", disk)
        qemu.write(path, 0x5A, 0, MiB)
        r = _run("mount", "-o", "remount,ro", a)
        assert r.returncode == 0, f"the agent keeps the mount from going read-only: {r.stderr}"
        for method, args in (("createVirtualDisk", ("r1", 16 * MiB)),
                             ("setImageUserData", ("r1", disk, {"k": "v"})),
                             ("prepareImage", ("r1", disk))):
            e, _ = d.fails(method, *args)
            assert "'r1'" in e.message and "EROFS" in e.message, (method, e.message)
        assert d.within(PROMPT, "getImageStatus", "r1", disk)["status"] == "optimized"
        assert disk in [i["imageId"] for i in d.within(PROMPT, "listImages", "r1")]
        assert d.within(PROMPT, "getImageInfo", "r1", disk)["chain"] == [disk]
        assert d.within(PROMPT, "getStorageRepositoryInfo", "r1")["images"]["disk"] == 1
        assert qemu.reads(path, 0x5A, 0, MiB)
        _others_answer(d)
        subprocess.run(["mount", "-o", "remount,rw", a], check=True)
        _disk(d, "r1")


def test_operations_stuck_in_a_frozen_repository_hold_only_its_own_workers(
        tmp_path: Any) -> None:
    """Copies into a repository that freezes under them wait in its file system; operations of
    the other repository still run at once (each repository has its own workers)."""
    with two_repositories(tmp_path, (1200, 400)) as (d, a, _b):
        src = d.within(PROMPT, "createVirtualDisk", "r2", 128 * MiB)
        settle(d.call, "r2", src, timeout=PROMPT)
        qemu.fill(d.path("r2", src), 100 / 1024)
        # Eight copies of a disk (each its own image), more than the 4 workers of a pool.
        copies = [d.within(PROMPT, "copyImage", "r1", src) for _ in range(8)]
        subprocess.run(["fsfreeze", "-f", a], check=True)
        stuck = [c for c in copies
                 if d.within(PROMPT, "getImageStatus", "r1", c)["status"] != "optimized"]
        assert len(stuck) >= 4, "the copies ended before the freeze: nothing was tested"
        disk = d.within(PROMPT, "createVirtualDisk", "r2", 16 * MiB)
        assert settle(d.call, "r2", disk, timeout=PROMPT)["status"] == "optimized"
        subprocess.run(["fsfreeze", "-u", a], check=True)
        for c in copies:
            assert settle(d.call, "r1", c, timeout=60)["status"] == "optimized"
