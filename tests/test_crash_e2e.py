"""Operations survive crashes: kill -9 mid-copy, a crash at a chosen step, SIGTERM mid-copy.

After each, a restarted agent takes the interrupted operation up again by itself, with no fix
call ([agent] resume_on_start, the default); started with --no-resume it shows it as a mend fix
instead. Either way the copy ends with the same bytes as an uninterrupted run. What a client
stopped, and what was committed with AutoFix=false, wait for their mend across a restart.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import pytest

from tests import conftest, qemu
from tests.conftest import Daemon, settle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
GiB = qemu.GiB
DATA_GIB = 1.5


def source_snapshot(d: Daemon, tmp_path: Any) -> tuple[str, qemu.Layout]:
    return conftest.source_snapshot(d, tmp_path, DATA_GIB)


def wait_progress(d: Daemon, repo: str, image_id: str, at_least: int = 1) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        s = d.call("getImageStatus", repo, image_id)
        if s["percent_complete"] >= at_least and s["stage"] == "1/2":
            return
        assert s["status"] == "broken", f"finished before it could be interrupted: {s}"
        time.sleep(0.01)
    raise AssertionError("no progress")


def mend_all(d: Daemon, repo: str) -> list[dict[str, Any]]:
    fixes: list[dict[str, Any]] = d.call("checkStorageRepository", repo)
    for f in fixes:
        d.call("fixStorageRepository", repo, f)
    return fixes


def assert_complete_copy(d: Daemon, snap: str, layout: qemu.Layout) -> None:
    s = settle(d.call, "r2", snap)
    assert s["status"] == "optimized", s
    copy = d.path("r2", snap)
    assert qemu.same_content(copy, d.path("default", snap))
    assert qemu.reads_layout(copy, layout)
    assert qemu.check_clean(copy)
    volumes = os.listdir(os.path.dirname(copy))
    assert not [v for v in volumes if v.endswith(".partial") or ".tmp-" in v], volumes
    assert d.call("checkStorageRepository", "r2") == []


def resumed_at_start(d: Daemon) -> list[str]:
    """The log lines of the last start that say an operation was taken up again, and the
    start's summary line last."""
    log = d.read_log().rsplit("event=resume_summary", 1)
    assert len(log) == 2, d.read_log()
    start = log[0].rsplit("event=ready", 1)[-1]
    summary = "event=resume_summary" + log[1].splitlines()[0]
    return [line for line in start.splitlines() if "event=resumed " in line] + [summary]


def assert_resumed_copy(d: Daemon, snap: str, layout: qemu.Layout) -> None:
    """The copy was taken up at start, with no fix call, and finishes whole."""
    *lines, summary = resumed_at_start(d)
    assert len(lines) == 1 and f"image={snap}" in lines[0] and "kind=copyImage" in lines[0]
    assert "resumed=1 waiting=0" in summary
    assert_complete_copy(d, snap, layout)


def test_kill_9_during_copy_resumes_at_start(daemon: Daemon, tmp_path: Any) -> None:
    snap, layout = source_snapshot(daemon, tmp_path)
    daemon.call("copyImage", "r2", snap)
    wait_progress(daemon, "r2", snap)
    daemon.kill()

    daemon.start()  # connections come back from the state directory, then the copy
    s = daemon.call("getImageStatus", "r2", snap)
    assert s["running"] or s["status"] == "optimized", s
    assert_resumed_copy(daemon, snap, layout)


def test_sigterm_during_copy_resumes_at_start(daemon: Daemon, tmp_path: Any) -> None:
    snap, layout = source_snapshot(daemon, tmp_path)
    daemon.call("copyImage", "r2", snap)
    wait_progress(daemon, "r2", snap)
    assert daemon.stop() == 0
    daemon.start()
    assert_resumed_copy(daemon, snap, layout)


def test_crash_at_seal_resumes_at_start(tmp_path: Any) -> None:
    d = Daemon(str(tmp_path / "dev"), env={"STRATA_TEST_CRASH_AT": "copyImage:seal"})
    d.start()
    snap, layout = source_snapshot(d, tmp_path)
    # The copy keeps the snapshot's id, so an answer the crash cut short is not needed.
    with contextlib.suppress(*conftest.CUT_SHORT):
        d.call("copyImage", "r2", snap)
    assert d.proc is not None and d.proc.wait(60) == 75  # the hook's _exit
    d.env = {}
    d.start()
    assert_resumed_copy(d, snap, layout)
    assert d.stop() == 0


def test_stopped_and_autofix_false_operations_wait_across_a_restart(daemon: Daemon,
                                                                   tmp_path: Any) -> None:
    snap, layout = source_snapshot(daemon, tmp_path)
    daemon.call("copyImage", "r2", snap)
    wait_progress(daemon, "r2", snap)
    daemon.call("stopOperation", "r2", snap)
    waiting = daemon.call("createVirtualDisk", "default", 64 << 20, None, {},
                          {"AutoFix": False})
    daemon.kill()

    daemon.start()
    *resumed, summary = resumed_at_start(daemon)
    assert resumed == [] and "resumed=0 waiting=2" in summary, daemon.read_log()
    stopped = daemon.call("getImageStatus", "r2", snap)
    assert not stopped["running"] and stopped["last_error"] == "stopped by client", stopped
    assert stopped["percent_complete"] < 100
    pending = daemon.call("getImageStatus", "default", waiting)
    assert pending["status"] == "broken" and not pending["running"], pending
    [mend] = daemon.call("checkStorageRepository", "r2", {"types": ["mend"]})
    assert "stopped by client" in mend["description"]
    [mend2] = daemon.call("checkStorageRepository", "default", {"types": ["mend"]})
    assert "committed, waiting to be started" in mend2["description"]

    # A mend asked for before the next restart is not forgotten by it: the copy is running
    # when the agent is stopped, so the start after takes it up.
    daemon.call("fixStorageRepository", "r2", mend)
    wait_progress(daemon, "r2", snap)
    assert daemon.stop() == 0
    daemon.start()
    *resumed, summary = resumed_at_start(daemon)
    assert len(resumed) == 1 and f"image={snap}" in resumed[0], daemon.read_log()
    assert "resumed=1 waiting=1" in summary
    assert_complete_copy(daemon, snap, layout)
    daemon.call("fixStorageRepository", "default", mend2)
    assert settle(daemon.call, "default", waiting)["status"] == "optimized"


def test_kill_9_during_copy_then_mend_resumes(daemon: Daemon, tmp_path: Any) -> None:
    snap, layout = source_snapshot(daemon, tmp_path)
    daemon.call("copyImage", "r2", snap)
    wait_progress(daemon, "r2", snap)
    daemon.kill()

    daemon.resume = False
    daemon.start()  # connections come back from the state directory
    s = daemon.call("getImageStatus", "r2", snap)
    assert s["status"] == "broken" and not s["running"] and s["last_error"] is None
    fixes = mend_all(daemon, "r2")
    assert [(f["type"], f["imageIds"]) for f in fixes] == [("mend", [snap])]
    assert "interrupted" in fixes[0]["description"]
    assert_complete_copy(daemon, snap, layout)


@pytest.mark.parametrize("step", ["copyImage:copy-data", "copyImage:seal"])
def test_crash_at_a_step_then_mend(tmp_path: Any, step: str) -> None:
    d = Daemon(str(tmp_path / "dev"), env={"STRATA_TEST_CRASH_AT": step})
    d.start()
    snap, layout = source_snapshot(d, tmp_path)
    # The copy keeps the snapshot's id, so an answer the crash cut short is not needed.
    with contextlib.suppress(*conftest.CUT_SHORT):
        d.call("copyImage", "r2", snap)
    assert d.proc is not None and d.proc.wait(60) == 75  # the hook's _exit
    d.env = {}
    d.resume = False
    d.start()
    assert [f["type"] for f in mend_all(d, "r2")] == ["mend"]
    assert_complete_copy(d, snap, layout)
    assert d.stop() == 0


def test_snapshot_crash_before_switch_and_seal(tmp_path: Any) -> None:
    for step in ("createSnapshot:switch", "createSnapshot:seal"):
        d = Daemon(str(tmp_path / step.replace(":", "-")), env={"STRATA_TEST_CRASH_AT": step})
        d.start()
        disk = d.call("createVirtualDisk", "default", 64 << 20)
        settle(d.call, "default", disk)
        qemu.write(d.path("default", disk), 0x5A, 0, 8 << 20)
        try:
            snap = d.call("createSnapshot", "default", disk)
        except conftest.CUT_SHORT:
            snap = None  # the crash beat the answer: found below as a client would find it
        assert d.proc is not None and d.proc.wait(60) == 75
        d.env = {}
        d.resume = False
        d.start()
        if snap is None:
            [snap] = {i["imageId"] for i in d.call("listImages", "default",
                                                     {"includeIncomplete": True})} - {disk}
        assert [f["type"] for f in mend_all(d, "default")] == ["mend"]
        assert settle(d.call, "default", snap)["status"] == "optimized"
        assert d.call("getImageInfo", "default", disk)["chain"] == [disk, snap]
        assert qemu.reads(d.path("default", disk), 0x5A, 0, 8 << 20)
        assert qemu.reads(d.path("default", snap), 0x5A, 0, 8 << 20)
        assert d.call("checkStorageRepository", "default") == []
        assert d.stop() == 0


def test_sigterm_leaves_operation_resumable(daemon: Daemon, tmp_path: Any) -> None:
    snap, layout = source_snapshot(daemon, tmp_path)
    daemon.call("copyImage", "r2", snap)
    wait_progress(daemon, "r2", snap)
    assert daemon.stop() == 0
    daemon.resume = False
    daemon.start()
    s = daemon.call("getImageStatus", "r2", snap)
    assert s["status"] == "broken" and s["last_error"] is None
    assert [f["type"] for f in mend_all(daemon, "r2")] == ["mend"]
    assert_complete_copy(daemon, snap, layout)


def test_stop_operation_pauses_and_mend_resumes(daemon: Daemon, tmp_path: Any) -> None:
    snap, layout = source_snapshot(daemon, tmp_path)
    daemon.call("copyImage", "r2", snap)
    wait_progress(daemon, "r2", snap)
    daemon.call("stopOperation", "r2", snap)
    s = daemon.call("getImageStatus", "r2", snap)
    assert s["status"] == "broken" and not s["running"]
    assert s["last_error"] == "stopped by client"
    [mend] = daemon.call("checkStorageRepository", "r2", {"types": ["mend"]})
    assert "stopped by client" in mend["description"]
    daemon.call("fixStorageRepository", "r2", mend)
    assert_complete_copy(daemon, snap, layout)


def test_remove_during_copy_aborts_and_clean_leaves_nothing(daemon: Daemon, tmp_path: Any) -> None:
    snap, _ = source_snapshot(daemon, tmp_path)
    daemon.call("copyImage", "r2", snap)
    wait_progress(daemon, "r2", snap)
    daemon.call("removeImage", "r2", snap)
    fixes = daemon.call("checkStorageRepository", "r2")
    assert [f["type"] for f in fixes] == ["clean"]
    daemon.call("fixStorageRepository", "r2", fixes[0])
    for sub in ("images", "volumes", "journal"):
        assert os.listdir(tmp_path / "r2" / sub) == []
    # The source is untouched.
    assert daemon.call("getImageStatus", "default", snap)["status"] == "optimized"
