"""The hub keeps answering while data moves: getImageStatus during a multi-GiB copy."""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest

from tests import qemu
from tests.conftest import Daemon, settle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_status_answers_quickly_during_a_multi_gib_copy(daemon: Daemon, tmp_path: Any) -> None:
    params = {"path": str(tmp_path / "r2")}
    daemon.call("formatStorageRepository", "localfs-1.0", params)
    daemon.call("connectStorageRepository", "r2", "localfs-1.0", params)
    disk = daemon.call("createVirtualDisk", "default", 4 * qemu.GiB)
    settle(daemon.call, "default", disk)
    path = daemon.call("prepareImage", "default", disk)["path"]
    daemon.call("teardownImage", "default", disk)
    qemu.fill(path, 2.0)
    snap = daemon.call("createSnapshot", "default", disk)
    settle(daemon.call, "default", snap)

    client = daemon.client()
    latencies: list[float] = []
    daemon.call("copyImage", "r2", snap)
    while True:
        t = time.perf_counter()
        s = client.call("getImageStatus", "r2", snap)
        elapsed = time.perf_counter() - t
        if s["status"] != "broken":
            break
        if s["running"]:
            latencies.append(elapsed)
        time.sleep(0.005)
    client.close()
    assert s["status"] == "optimized"
    assert len(latencies) >= 20, "the copy ended before enough samples were taken"
    latencies.sort()
    p95 = latencies[int(len(latencies) * 0.95)]
    # 100 ms is the contract; the 95th percentile keeps one scheduler hiccup on a shared
    # 2-core machine from failing the run, the maximum still has to stay well below a second.
    assert p95 < 0.100, (p95, statistics.median(latencies), latencies[-1])
    assert latencies[-1] < 0.5, latencies[-1]
