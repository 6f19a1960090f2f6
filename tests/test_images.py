"""Image operations on real qemu-img, checked by the bytes read back through every chain."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent import errors
from tests import qemu
from tests.conftest import FORMATS, Engine

MiB = qemu.MiB


@pytest.fixture(params=FORMATS)
def repo_format(request: pytest.FixtureRequest) -> str:
    """This suite runs on every format (tests/conftest.py FORMATS)."""
    return str(request.param)


def disk_with_data(e: Engine, repo: str = "r1", size: int = 64 * MiB) -> str:
    d = e.call("createVirtualDisk", repo, size)
    assert e.settle(repo, d)["status"] == "optimized"
    qemu.write(e.path(repo, d), 0x11, 0, 4 * MiB)
    return str(d)


def mend_the_one(e: Engine, repo: str, image_id: str) -> None:
    """Run the one mend fix the checker proposes, for image_id; it ends optimized."""
    mends = [f for f in e.call("checkStorageRepository", repo) if f["type"] == "mend"]
    assert [f["imageIds"] for f in mends] == [[image_id]]
    e.call("fixStorageRepository", repo, mends[0])
    assert e.settle(repo, image_id)["status"] == "optimized"


def test_blank_disk_is_thin_and_reads_zero(engine: Engine) -> None:
    d = engine.call("createVirtualDisk", "r1", 1 << 40)  # 1 TiB: thin, instant
    s = engine.settle("r1", d)
    assert s == {**s, "status": "optimized", "stage": "2/2", "percent_complete": 100,
                 "hostID": 1, "last_error": None}
    path = engine.path("r1", d)
    assert qemu.info(path)["virtual-size"] == 1 << 40
    assert os.stat(path).st_blocks * 512 < 2 * MiB
    assert qemu.reads(path, 0, 0, MiB)


def test_snapshot_switch_keeps_bytes_and_later_writes_go_to_the_disk_only(engine: Engine) -> None:
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    assert engine.settle("r1", s)["status"] == "optimized"
    # The snapshot took the disk's volume; the disk got a new empty top.
    snap_path, disk_path = engine.path("r1", s), engine.path("r1", d)
    assert snap_path != disk_path
    assert qemu.info(disk_path)["backing-filename"] == os.path.basename(snap_path)
    qemu.write(disk_path, 0x22, 0, MiB)
    assert qemu.reads(disk_path, 0x22, 0, MiB)
    assert qemu.reads(disk_path, 0x11, MiB, 3 * MiB)
    assert qemu.reads(snap_path, 0x11, 0, 4 * MiB)  # the snapshot never changes
    info = engine.call("getImageInfo", "r1", d)
    assert info["parentId"] == s and info["chain"] == [d, s]
    assert engine.call("getImageInfo", "r1", s)["kind"] == "snapshot"


def test_thin_disk_on_snapshot_reads_through_chain(engine: Engine) -> None:
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    d2 = engine.call("createVirtualDisk", "r1", 128 * MiB, s)
    assert engine.settle("r1", d2)["status"] == "optimized"
    p = engine.path("r1", d2)
    assert qemu.info(p)["virtual-size"] == 128 * MiB
    assert qemu.reads(p, 0x11, 0, 4 * MiB)
    assert os.stat(p).st_blocks * 512 < MiB  # thin: only qcow2 metadata


def test_performance_disk_is_independent_full_copy(engine: Engine) -> None:
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    d2 = engine.call("createVirtualDisk", "r1", 64 * MiB, s, {}, {"strategy": "performance"})
    assert engine.settle("r1", d2)["status"] == "optimized"
    p = engine.path("r1", d2)
    assert "backing-filename" not in qemu.info(p)
    assert qemu.reads(p, 0x11, 0, 4 * MiB)
    assert engine.call("getImageInfo", "r1", d2)["chain"] == [d2]


def test_copy_full_between_repositories(engine: Engine) -> None:
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    qemu.write(engine.path("r1", d), 0x33, 8 * MiB, MiB)
    c = engine.call("copyImage", "r2", d)
    assert c != d
    assert engine.settle("r2", c)["status"] == "optimized"
    p = engine.path("r2", c)
    assert p.startswith(engine.roots["r2"])
    assert "backing-filename" not in qemu.info(p)
    assert qemu.same_content(p, engine.path("r1", d))
    assert qemu.check_clean(p)


def test_the_source_repository_leaves_as_soon_as_a_copy_from_it_reads_done(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that reads optimized still releases its claims for a moment (its seal is done,
    the release follows): a disconnect of its source in that moment waits for the release,
    instead of counting a copy reading from it (seen on a host leaving a shared repository
    right after its copy: about 1 run in 20 of the multi-host suite)."""
    from agent.image import claims

    real = claims.Table.release

    def slow_release(table: claims.Table, claim: claims.Claim) -> None:
        if claim.finishing:
            time.sleep(0.5)  # the window, widened so that every run meets it
        real(table, claim)

    monkeypatch.setattr(claims.Table, "release", slow_release)
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    c = engine.call("copyImage", "r2", s)
    assert engine.settle("r2", c)["status"] == "optimized"
    engine.call("disconnectStorageRepository", "r1")
    assert [r["repoId"] for r in engine.call("listStorageRepositories")] == ["r2"]


class PausedCopies:
    """qemu-img convert, held after it reported 37%: copies that stay running until let go."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from agent import qemuimg

        real = qemuimg.convert
        self.started = threading.Semaphore(0)
        self.going = threading.Event()

        def paused_convert(*args: Any, **kw: Any) -> None:
            kw["progress"](37.0)
            self.started.release()
            assert self.going.wait(60)
            real(*args, **kw)

        monkeypatch.setattr(qemuimg, "convert", paused_convert)

    def wait_started(self, n: int = 1) -> None:
        for _ in range(n):
            assert self.started.acquire(timeout=60), "a copy did not start"


@pytest.fixture
def paused(monkeypatch: pytest.MonkeyPatch) -> Iterator[PausedCopies]:
    p = PausedCopies(monkeypatch)
    yield p
    p.going.set()  # a test that failed midway leaves no copy waiting


def test_the_status_of_a_copy_running_here_reads_no_record(
        engine: Engine, paused: PausedCopies, monkeypatch: pytest.MonkeyPatch) -> None:
    """While this host runs the operation that makes an image, it holds the image's claim and
    is the only writer of its records: getImageStatus tells it from the running operation, not
    from the repository (on GlusterFS each record read is a round trip that competed with the
    copy polled about). Once the operation seals, the records tell it again."""
    d = disk_with_data(engine)
    repo = engine.api.host.connection("r2").repo
    reads: list[str] = []

    def counting(name: str) -> Any:
        real_read = getattr(repo, name)

        def counted(*a: Any) -> Any:
            reads.append(name)
            return real_read(*a)
        return counted

    for name in ("get_image", "get_volume", "get_operation"):
        monkeypatch.setattr(repo, name, counting(name))
    c = engine.call("copyImage", "r2", d)
    paused.wait_started()
    reads.clear()
    for _ in range(5):
        s = engine.call("getImageStatus", "r2", c)
        assert s == {"imageId": c, "status": "broken", "hostID": 1, "stage": "1/2",
                     "percent_complete": 37, "last_error": None,
                     "operation": "copyImage", "running": True}, s
    assert reads == []
    paused.going.set()
    assert engine.settle("r2", c)["status"] == "optimized"
    reads.clear()
    assert engine.call("getImageStatus", "r2", c)["status"] == "optimized"
    assert "get_image" in reads  # the sealed image is told by its records again
    assert qemu.reads(engine.path("r2", c), 0x11, 0, 4 * MiB)


def test_quick_operations_never_wait_behind_copies(engine: Engine, paused: PausedCopies) -> None:
    """Copies fill every data worker of a repository (the engine has 2); a thin disk, a
    snapshot and a disk on it still reach optimized, in their own lane, while the copies wait."""
    d, other = disk_with_data(engine), disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    copies = [engine.call("copyImage", "r1", d) for _ in range(3)]  # one more than workers
    paused.wait_started(2)
    thin = engine.call("createVirtualDisk", "r1", 64 * MiB)
    snap = engine.call("createSnapshot", "r1", other)
    on_snap = engine.call("createVirtualDisk", "r1", 64 * MiB, s)
    for image in (thin, snap, on_snap):
        assert engine.settle("r1", image)["status"] == "optimized"
    assert [engine.call("getImageStatus", "r1", c)["status"] for c in copies] == ["broken"] * 3
    paused.going.set()
    for c in copies:
        assert engine.settle("r1", c)["status"] == "optimized"
        assert qemu.reads(engine.path("r1", c), 0x11, 0, 4 * MiB)
    assert qemu.reads(engine.path("r1", on_snap), 0x11, 0, 4 * MiB)


def test_snapshot_copy_keeps_id_and_second_copy_is_noop(engine: Engine) -> None:
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    assert engine.call("copyImage", "r2", s) == s
    engine.settle("r2", s)
    gen = engine.call("getImageInfo", "r2", s)["generation"]
    assert engine.call("copyImage", "r2", s) == s
    assert engine.call("getImageInfo", "r2", s)["generation"] == gen
    assert qemu.same_content(engine.path("r2", s), engine.path("r1", s))


def test_copy_with_base_holds_only_the_difference(engine: Engine) -> None:
    d = engine.call("createVirtualDisk", "r1", 256 * MiB)
    engine.settle("r1", d)
    qemu.write(engine.path("r1", d), 0x11, 0, 128 * MiB)
    s1 = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s1)
    engine.call("copyImage", "r2", s1)
    engine.settle("r2", s1)
    qemu.write(engine.path("r1", d), 0x44, 16 * MiB, 4 * MiB)  # change 4 MiB
    s2 = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s2)
    c = engine.call("copyImage", "r2", s2, s1)
    assert c == s2
    assert engine.settle("r2", c)["status"] == "optimized"
    info = engine.call("getImageInfo", "r2", c)
    assert info["chain"] == [s2, s1]
    assert info["allocated"] < 6 * MiB  # the 4 MiB changed, plus qcow2 metadata
    assert qemu.same_content(engine.path("r2", c), engine.path("r1", s2))


def test_copy_with_base_across_a_deeper_chain(engine: Engine) -> None:
    """The base is two layers down in the source: the copy must still hold every change."""
    d = engine.call("createVirtualDisk", "r1", 64 * MiB)
    engine.settle("r1", d)
    qemu.write(engine.path("r1", d), 0x11, 0, 16 * MiB)
    s1 = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s1)
    engine.call("copyImage", "r2", s1)
    engine.settle("r2", s1)
    qemu.write(engine.path("r1", d), 0x22, 0, MiB)
    s2 = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s2)
    qemu.write(engine.path("r1", d), 0x33, 2 * MiB, MiB)
    c = engine.call("copyImage", "r2", d, s1)
    assert engine.settle("r2", c)["status"] == "optimized"
    p = engine.path("r2", c)
    assert qemu.same_content(p, engine.path("r1", d))
    assert engine.call("getImageInfo", "r2", c)["allocated"] < 4 * MiB


def test_remove_delinks_then_clean_reclaims(engine: Engine) -> None:
    d = disk_with_data(engine)
    path = engine.path("r1", d)
    engine.call("removeImage", "r1", d)
    assert all(i["imageId"] != d for i in engine.call("listImages", "r1"))
    with pytest.raises(errors.ImageNotFound):
        engine.call("getImageStatus", "r1", d)
    assert os.path.exists(path)  # delinked only
    fixes = engine.call("checkStorageRepository", "r1")
    assert [f["type"] for f in fixes] == ["clean"] and fixes[0]["imageIds"] == [d]
    engine.call("fixStorageRepository", "r1", fixes[0])
    assert not os.path.exists(path)
    assert engine.call("checkStorageRepository", "r1") == []
    # The same fix again is stale, and refused.
    with pytest.raises(errors.StaleFix):
        engine.call("fixStorageRepository", "r1", fixes[0])


def test_removed_snapshot_keeps_bytes_its_disk_needs(engine: Engine) -> None:
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    engine.call("removeImage", "r1", s)
    # The removed snapshot still backs the disk: no clean, a merge.
    assert [f["type"] for f in engine.call("checkStorageRepository", "r1")] == ["merge"]
    assert qemu.reads(engine.path("r1", d), 0x11, 0, 4 * MiB)
    engine.call("removeImage", "r1", d)
    [clean] = engine.call("checkStorageRepository", "r1")
    engine.call("fixStorageRepository", "r1", clean)
    assert os.listdir(os.path.join(engine.roots["r1"], "volumes")) == []
    assert os.listdir(os.path.join(engine.roots["r1"], "images")) == []


def test_forged_fix_is_refused_and_changes_nothing(engine: Engine) -> None:
    d = disk_with_data(engine)
    before = sorted(os.listdir(os.path.join(engine.roots["r1"], "volumes")))
    for forged in ({"type": "clean", "data": "0" * 64, "imageIds": [d]},
                   {"type": "mend", "data": "x"}):
        with pytest.raises(errors.StaleFix):
            engine.call("fixStorageRepository", "r1", forged)
    assert sorted(os.listdir(os.path.join(engine.roots["r1"], "volumes"))) == before


def test_prepared_disk_cannot_be_snapshotted_or_removed(engine: Engine) -> None:
    d = disk_with_data(engine)
    prep = engine.call("prepareImage", "r1", d)
    assert prep["format"] == "qcow2" and prep["chain"][0]["path"] == prep["path"]
    assert not prep["readonly"]
    with pytest.raises(errors.ImageBusy):
        engine.call("createSnapshot", "r1", d)
    with pytest.raises(errors.ImageBusy):
        engine.call("removeImage", "r1", d)
    assert engine.call("teardownImage", "r1", d) == {"changed": True}
    assert engine.call("teardownImage", "r1", d) == {"changed": False}
    engine.call("removeImage", "r1", d)


def test_wrong_kinds_are_refused(engine: Engine) -> None:
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    with pytest.raises(errors.WrongImageKind):
        engine.call("createSnapshot", "r1", s)  # a snapshot of a snapshot
    with pytest.raises(errors.WrongImageKind):
        engine.call("createVirtualDisk", "r1", 64 * MiB, d)  # a disk "based" on a disk
    engine.call("copyImage", "r2", s)
    engine.settle("r2", s)
    c = engine.call("copyImage", "r2", d)
    engine.settle("r2", c)
    with pytest.raises(errors.WrongImageKind):
        engine.call("copyImage", "r2", d, c)  # a disk as a copy's base
    with pytest.raises(errors.InvalidArgument):
        engine.call("createVirtualDisk", "r1", 32 * MiB, s)  # smaller than the snapshot
    with pytest.raises(errors.InvalidArgument):
        engine.call("createVirtualDisk", "r2", 64 * MiB, s, {},
                    {"participatingRepositories": ["r1"]})  # thin across repositories


def test_image_lookup_follows_options(engine: Engine) -> None:
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    with pytest.raises(errors.ImageNotFound):
        engine.call("copyImage", "r2", s, None, {}, {"participatingRepositories": ["r2"]})
    with pytest.raises(errors.ImageNotFound):
        engine.call("copyImage", "r2", s, None, {}, {"imageHints": {s: "r2"}})
    assert engine.call("copyImage", "r2", s, None, {}, {"imageHints": {s: "r1"}}) == s


def test_autofix_false_commits_intent_and_mend_runs_it(engine: Engine) -> None:
    d = engine.call("createVirtualDisk", "r1", 64 * MiB, None, {}, {"AutoFix": False})
    s = engine.call("getImageStatus", "r1", d)
    assert s["status"] == "broken" and not s["running"] and s["last_error"] is None
    [mend] = engine.call("checkStorageRepository", "r1")
    assert mend["type"] == "mend" and mend["imageIds"] == [d]
    engine.call("fixStorageRepository", "r1", mend)
    assert engine.settle("r1", d)["status"] == "optimized"
    assert engine.call("checkStorageRepository", "r1") == []


def test_removing_a_broken_image_aborts_its_operation(engine: Engine) -> None:
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    c = engine.call("copyImage", "r2", s, None, {}, {"AutoFix": False})
    engine.call("removeImage", "r2", c)
    [clean] = engine.call("checkStorageRepository", "r2")
    assert clean["type"] == "clean"
    engine.call("fixStorageRepository", "r2", clean)
    for sub in ("images", "volumes", "journal"):
        assert os.listdir(os.path.join(engine.roots["r2"], sub)) == []


def test_user_data_and_listing(engine: Engine) -> None:
    d = engine.call("createVirtualDisk", "r1", 64 * MiB, None, {"vm": "web-1"})
    engine.settle("r1", d)
    engine.call("setImageUserData", "r1", d, {"vm": "web-2"})
    [row] = engine.call("listImages", "r1")
    assert row["imageId"] == d and row["userData"] == {"vm": "web-2"} and row["kind"] == "disk"
    info = engine.call("getStorageRepositoryInfo", "r1")
    assert info["images"]["disk"] == 1 and info["free"] <= info["capacity"]
    # This machine's root file system (ext4, overlay...) has no reflink; XFS is tested apart.
    assert {"thin", "snapshot", "copy", "merge"} <= set(info["capabilities"])


def test_a_disk_being_copied_cannot_be_prepared(engine: Engine) -> None:
    d = disk_with_data(engine)
    c = engine.call("copyImage", "r2", d, None, {}, {"AutoFix": False})
    with pytest.raises(errors.ImageBusy):
        engine.call("prepareImage", "r1", d)
    mend_the_one(engine, "r2", c)
    assert engine.call("prepareImage", "r1", d)["path"]


def test_performance_disk_larger_than_its_snapshot(engine: Engine) -> None:
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    for repo in ("r1", "r2"):
        big = engine.call("createVirtualDisk", repo, 128 * MiB, s, {},
                          {"strategy": "performance"})
        assert engine.settle(repo, big)["status"] == "optimized"
        p = engine.path(repo, big)
        assert qemu.info(p)["virtual-size"] == 128 * MiB
        assert qemu.reads(p, 0x11, 0, 4 * MiB) and qemu.reads(p, 0, 64 * MiB, 64 * MiB)


def test_the_source_of_an_unfinished_copy_cannot_be_removed(engine: Engine) -> None:
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    c = engine.call("copyImage", "r2", s, None, {}, {"AutoFix": False})
    with pytest.raises(errors.ImageBusy):
        engine.call("removeImage", "r1", s)
    mend_the_one(engine, "r2", c)
    engine.call("removeImage", "r1", s)  # now it may go


def test_remove_and_prepare_racing_never_both_win(engine: Engine) -> None:
    import concurrent.futures

    for _ in range(20):
        d = engine.call("createVirtualDisk", "r1", MiB)
        engine.settle("r1", d)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            rm = pool.submit(engine.call, "removeImage", "r1", d)
            prep = pool.submit(engine.call, "prepareImage", "r1", d)
            outcomes = [f.exception() is None for f in (rm, prep)]
        assert outcomes.count(True) == 1, outcomes
        if outcomes[1]:
            engine.call("teardownImage", "r1", d)
            engine.call("removeImage", "r1", d)
    for f in engine.call("checkStorageRepository", "r1"):
        engine.call("fixStorageRepository", "r1", f)
    assert os.listdir(os.path.join(engine.roots["r1"], "volumes")) == []


def test_copying_a_removed_snapshot_back_revives_it(engine: Engine) -> None:
    d = disk_with_data(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    engine.call("copyImage", "r2", s)
    engine.settle("r2", s)
    thin = engine.call("createVirtualDisk", "r2", 64 * MiB, s)
    engine.settle("r2", thin)
    engine.call("removeImage", "r2", s)  # the thin disk still needs its bytes
    assert engine.call("copyImage", "r2", s) == s
    assert engine.call("getImageStatus", "r2", s)["status"] == "optimized"
    assert s in {i["imageId"] for i in engine.call("listImages", "r2")}
    assert qemu.reads(engine.path("r2", s), 0x11, 0, 4 * MiB)
    assert engine.call("checkStorageRepository", "r2") == []


def test_an_interrupted_format_can_be_finished(tmp_path: Any) -> None:
    from agent import api as agent_api

    a = agent_api.Api(1, 1)
    root = tmp_path / "half"
    for sub in ("images", "volumes"):
        (root / sub).mkdir(parents=True)  # a crash before repository.json
    a.formatStorageRepository("localfs-1.0", {"path": str(root)}, {})
    assert a.connectStorageRepository("x", "localfs-1.0", {"path": str(root)}, {})["changed"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "data.img").write_bytes(b"x")
    with pytest.raises(errors.RepositoryNotEmpty):
        a.formatStorageRepository("localfs-1.0", {"path": str(tmp_path / "full")}, {})
    a.close()


def test_a_snapshot_whose_disk_lost_its_file_fails_and_changes_nothing(engine: Engine) -> None:
    """The overlay is refused when its backing file cannot be opened, as qemu-img create
    refuses it: the disk keeps its volume, and the snapshot resumes once the file is back."""
    d = disk_with_data(engine)
    path = engine.path("r1", d)
    os.rename(path, path + ".away")
    s = engine.call("createSnapshot", "r1", d)
    st = engine.settle("r1", s)
    assert st["status"] == "broken" and "cannot open backing file" in st["last_error"]
    assert engine.call("getImageInfo", "r1", d)["chain"] == [d]  # not switched

    os.rename(path + ".away", path)
    mend_the_one(engine, "r1", s)
    assert qemu.reads(engine.path("r1", s), 0x11, 0, 4 * MiB)
    assert qemu.reads(engine.path("r1", d), 0x11, 0, 4 * MiB)
    assert engine.call("checkStorageRepository", "r1") == []


def test_a_failure_the_full_repository_cannot_record_is_still_told(engine: Engine) -> None:
    """An operation that fails, and cannot write its failure into the journal (there, the
    journal directory is made immutable: what a full file system does to a write), still shows
    its error; the journal keeps what to resume."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr (e2fsprogs) is not installed")
    d = disk_with_data(engine)
    path = engine.path("r1", d)
    journal = os.path.join(engine.roots["r1"], "journal")
    # The disk's volume becomes a file that is not qcow2, under a snapshot committed without
    # being started (a FIFO, which once held the step back, is now refused before it is
    # opened); the journal is made immutable, then the runner starts the step, which fails.
    os.rename(path, path + ".away")
    with open(path, "wb") as f:
        f.write(b"not a qcow2 image")
    immutable = False
    try:
        s = engine.call("createSnapshot", "r1", d, {}, {"AutoFix": False})
        if subprocess.run(["chattr", "+i", journal], capture_output=True).returncode != 0:
            # GlusterFS's FUSE client has no FS_IOC_SETFLAGS: the immutable journal that stands
            # in for a full file system cannot be made there (it runs on localfs and posixfs).
            pytest.skip("this file system has no immutable attribute (GlusterFS over FUSE)")
        immutable = True
        repo = engine.api.host.connection("r1").repo
        img = repo.get_image(s)
        assert img is not None and img.operation_id is not None
        op = repo.get_operation(img.operation_id)
        assert op is not None
        engine.api.runner.submit(repo, op)
        st = engine.settle("r1", s)
        assert st["status"] == "broken" and not st["running"]
        assert "is not a qcow2 image" in st["last_error"]
        assert "not recorded in the repository" in st["last_error"]
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", journal], check=True)
        os.unlink(path)
        os.rename(path + ".away", path)
    mend_the_one(engine, "r1", s)
    assert qemu.reads(engine.path("r1", s), 0x11, 0, 4 * MiB)
