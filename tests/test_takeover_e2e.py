"""Takeover between hosts, real everywhere: a GlusterFS volume, a sanlock daemon and an agent per
simulated host (tests/cluster.py), io_timeout 1. A dead host's leases are free 8·io_timeout + 60 s
after its last renewal (68 s here, sanlock's own floor): those tests are slow by nature."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent import fileio
from agent.repo import leases
from tests import cluster, qemu
from tests.conftest import settle

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.xdist_group("cluster")]

REPO = cluster.REPO_ID
IO = 1
FLOOR = 8 * IO + 60  # when sanlock frees a dead host's leases


def wait_for(what: str, probe: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(every)


def mends(h: cluster.Host, image_id: str) -> list[dict[str, Any]]:
    return [f for f in h.call("checkStorageRepository", REPO)
            if f["type"] == "mend" and image_id in f["imageIds"] and not f.get("manual")]


def prepared(h: cluster.Host, image_id: str) -> str:
    """The image's top volume as the test process reaches it through host ``h``'s mount."""
    p: str = h.call("prepareImage", REPO, image_id)["path"]
    h.call("teardownImage", REPO, image_id)
    return h.path(p)


def disk_with(h: cluster.Host, gib: float, size: int = 4 * qemu.GiB) -> tuple[str, qemu.Layout]:
    disk: str = h.call("createVirtualDisk", REPO, size)
    assert settle(h.call, REPO, disk)["status"] == "optimized"
    return disk, qemu.fill(prepared(h, disk), gib)


def running_on(h: cluster.Host, image_id: str, host_id: int) -> bool:
    s = h.call("getImageStatus", REPO, image_id)
    return bool(s.get("runningOn", {}).get("hostId") == host_id and s["percent_complete"] > 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_dead_and_a_frozen_hosts_work_is_mended_on_another_host_to_the_same_bytes(
        cluster_hosts: Any, gluster_volume: Any) -> None:
    """Host 1 dies in the middle of a copy and a merge; host 3 freezes in the middle of a copy
    (one wait of sanlock's floor for both). Host 2 mends all three; host 3, thawed, writes
    nothing."""
    h1, h2, h3 = cluster_hosts(3)
    cluster.connect_repository([h1, h2, h3], gluster_volume, io_timeout=IO)
    # Host 1: a copy of a disk with 1.5 GiB of data, a merge of 0.75 GiB into a removed
    # snapshot. Host 3: a copy of a disk with 1 GiB.
    source, layout = disk_with(h1, 1.5)
    merged, low = disk_with(h1, 0.75)
    snap = h1.call("createSnapshot", REPO, merged)
    settle(h1.call, REPO, snap)
    high = qemu.fill(prepared(h1, merged), 0.75, offset=2 * qemu.GiB)
    h1.call("removeImage", REPO, snap)
    [merge] = [f for f in h1.call("checkStorageRepository", REPO) if f["type"] == "merge"]
    source3, layout3 = disk_with(h3, 1)
    h1.call("fixStorageRepository", REPO, merge)
    copy = h1.call("copyImage", REPO, source)
    copy3 = h3.call("copyImage", REPO, source3)
    # All run where they were started, as host 2 sees it.
    wait_for("the copy runs on host 1", lambda: running_on(h2, copy, 1), 60, 0.1)
    wait_for("the copy runs on host 3", lambda: running_on(h2, copy3, 3), 60, 0.1)
    assert [f["type"] for f in h2.call("checkStorageRepository", REPO)
            if copy in f["imageIds"]] == ["running"]
    for method, args in (("removeImage", (copy,)),
                         # even a record change waits for host 1's lease: no update is lost
                         ("setImageUserData", (copy, {"from": "host2"}))):
        with pytest.raises(Exception) as e:
            h2.call(method, REPO, *args)
        assert getattr(e.value, "data", {}).get("name") == "LeaseHeld", e.value
        assert e.value.data["hostId"] == 1  # type: ignore[attr-defined]
    h1.kill()  # whole: agent, qemu-img, sanlock daemon, FUSE client
    h3.freeze()  # the same, stopped
    stopped = time.monotonic()

    # Until sanlock declares them dead their work is not host 2's to take.
    assert mends(h2, copy) == [] and mends(h2, copy3) == []
    wait_for("host 2's mends", lambda: all(mends(h2, i) for i in (copy, merged, copy3)),
             FLOOR + 30)
    offered = time.monotonic() - stopped
    for image_id in (copy, merged, copy3):
        [fix] = mends(h2, image_id)
        h2.call("fixStorageRepository", REPO, fix)
    for image_id in (copy, merged, copy3):
        s = settle(h2.call, REPO, image_id, timeout=300)
        assert s["status"] == "optimized" and s["hostID"] == 2, s
    done = time.monotonic() - stopped
    print(f"mends offered {offered:.1f} s after the kill, all done at {done:.1f} s "
          f"(sanlock's floor {FLOOR} s)")
    # Offered (and started) within sanlock's floor + 10 s; the copies then start their data
    # over (a partial file of a dead host is never trusted), at the disks' speed.
    assert offered < FLOOR + 10, (offered, done)

    # The same bytes an uninterrupted run gives.
    assert qemu.same_content(prepared(h2, source), prepared(h2, copy))
    assert qemu.reads_layout(prepared(h2, copy), layout)
    assert qemu.reads_layout(prepared(h2, copy3), layout3)
    top = prepared(h2, merged)
    assert qemu.reads_layout(top, low) and qemu.reads_layout(top, high)
    assert len(h2.call("getImageInfo", REPO, merged)["chain"]) == 1
    assert [f["type"] for f in h2.call("checkStorageRepository", REPO)
            if f["type"] in ("mend", "running")] == []

    # Host 3 wakes: its threads, its qemu-img and its daemon go on where they stopped.
    root = os.path.dirname(os.path.dirname(prepared(h2, copy3)))  # ROOT/volumes/<file>
    before = snapshot_files(h2, root)
    h3.thaw()
    time.sleep(8 * IO)
    assert snapshot_files(h2, root) == before
    assert qemu.reads_layout(prepared(h2, copy3), layout3)
    before = snapshot_files(h2, root)

    # Host 3 is fenced: its sanlock daemon, finding on waking that its lockspace expired with
    # leases still held, kills the agent at once (SIGKILL: past 8·io_timeout + 40 s there is
    # no grace left), or the agent, waking first, found its renewals late and let them go.
    def fenced() -> str:
        if h3.agent is not None and h3.agent.poll() is not None:
            return "killed"
        [r] = [r for r in h3.call("listStorageRepositories") if r["repoId"] == REPO]
        return "out" if r["lockspace"]["state"] != "joined" else ""

    how = wait_for("host 3 fenced", fenced, 30)
    if how == "killed":
        assert h3.sanlock is not None
        with open(h3.sanlock.log) as f:
            assert f"kill {h3.agent_pid} sig" in f.read()
    log = h3.read_log().split("event=op_start kind=copyImage")[-1]
    assert "event=op_done" not in log and "event=step_done" not in log
    # Booted again, it finds nothing of its own to do (host 2 finished the copy), and writes
    # nothing either.
    h3.kill()
    h3.restart()
    cluster.wait_joined(h3, REPO)
    assert [f for f in h3.call("checkStorageRepository", REPO) if f["type"] != "clean"] == []
    assert h3.call("getImageStatus", REPO, copy3)["status"] == "optimized"
    assert snapshot_files(h2, root) == before


@pytest.mark.timeout(400)
def test_a_host_whose_storage_is_cut_stops_writing_and_joins_again(
        cluster_hosts: Any, gluster_volume: Any, tmp_path: Any) -> None:
    h1, h2 = cluster_hosts(2)
    cluster.connect_repository([h1, h2], gluster_volume, io_timeout=IO)
    local = {"path": str(tmp_path / "local")}  # a second, local, repository of host 1
    h1.call("formatStorageRepository", "localfs-1.0", local)
    h1.call("connectStorageRepository", "local", "localfs-1.0", local)
    source, layout = disk_with(h1, 1.5)
    copy = h1.call("copyImage", REPO, source)
    wait_for("the copy runs on host 1", lambda: running_on(h2, copy, 1), 60, 0.1)
    agent = h1.agent_pid
    h1.cut_storage()
    cut = time.monotonic()

    def state() -> dict[str, Any]:
        # The listing answers whatever the file system does (getStorageRepositoryInfo reads
        # it, and fails while it is gone); the lockspace state is the host's own.
        [r] = [r for r in h1.call("listStorageRepositories") if r["repoId"] == REPO]
        return r["lockspace"]  # type: ignore[no-any-return]

    failed = wait_for("host 1 gives its lockspace up", lambda: state()["state"] == "failed"
                      and state(), 8 * IO)
    assert time.monotonic() - cut < 8 * IO  # before sanlock would have to kill the agent
    assert "renewal" in failed["reason"], failed  # late, or given up by sanlock
    # It holds no lease any more (sanlock kills a holder that keeps them past 8·io_timeout).
    status = h1.run(["sanlock", "client", "status"]).stdout
    assert not [line for line in status.splitlines() if line.startswith("r ")], status
    # Changes are refused at once; its other repository and the other host carry on.
    with pytest.raises(Exception) as e:
        h1.call("createVirtualDisk", REPO, qemu.MiB)
    assert getattr(e.value, "data", {}).get("name") == "LockspaceNotJoined", e.value
    d = h1.call("createVirtualDisk", "local", qemu.MiB)
    assert settle(h1.call, "local", d)["status"] == "optimized"
    other = h2.call("createVirtualDisk", REPO, qemu.MiB)
    assert settle(h2.call, REPO, other)["status"] == "optimized"

    # The storage back (the agent mounts it again), the host joins again by itself, alive.
    wait_for("host 1 joins again", lambda: state()["state"] == "joined", 60)
    assert h1.agent_pid == agent and h1.agent is not None and h1.agent.poll() is None
    # Its interrupted copy waits for a mend (its old leases went with its old lockspace).
    [fix] = wait_for("the copy's mend", lambda: mends(h1, copy), 30)
    h1.call("fixStorageRepository", REPO, fix)
    assert settle(h1.call, REPO, copy, timeout=300)["status"] == "optimized"
    assert qemu.reads_layout(prepared(h2, copy), layout)


def snapshot_files(h: cluster.Host, root: str) -> dict[str, tuple[int, int]]:
    """Every file of the repository but the lease areas (sanlock writes them), with its size
    and modification time, as host ``h`` sees them."""
    out = {}
    for d, _, files in os.walk(root):
        if os.path.relpath(d, root).split(os.sep)[0] == leases.LEASES:
            continue
        for n in files:
            if fileio.is_temporary(n):
                continue  # not a record: a write the fence stopped before its rename unlinks it
            st = os.stat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), root)] = (st.st_size, st.st_mtime_ns)
    return out
