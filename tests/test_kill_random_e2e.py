"""kill -9 from outside at random moments of a multi-GiB copy and of a merge (seeded).

Unlike the crash matrix, the kill lands anywhere: inside qemu-img's work, between a data write and
its record, in a progress update. After a restart the repository must converge to the same bytes.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest

from agent.fix import clean
from tests import qemu
from tests.conftest import Daemon, settle, source_snapshot
from tests.test_crash_matrix import converge

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
GiB = qemu.GiB
DATA_GIB = 1.0


def kill_within(d: Daemon, seconds: float) -> None:
    time.sleep(seconds)
    d.kill()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_random_during_copy(tmp_path: Any, seed: int) -> None:
    rng = random.Random(seed)
    d = Daemon(str(tmp_path / "dev"))
    d.start()
    snap, layout = source_snapshot(d, tmp_path, DATA_GIB)

    started = time.monotonic()
    d.call("copyImage", "r2", snap)
    settle(d.call, "r2", snap)
    full = time.monotonic() - started  # how long an uninterrupted copy takes here
    d.call("removeImage", "r2", snap)
    converge(d, "r2")

    d.call("copyImage", "r2", snap)
    kill_within(d, rng.uniform(0.0, full))
    killed = time.monotonic()
    d.start()
    # A record write the kill cut leaves its temporary file, which clean leaves alone for
    # TEMP_GRACE (it may be a write in flight): converge once that is over.
    time.sleep(max(0.0, clean.TEMP_GRACE + 1 - (time.monotonic() - killed)))
    converge(d, "r2")
    s = d.call("getImageStatus", "r2", snap)
    assert s["status"] == "optimized", s
    copy = d.path("r2", snap)
    assert qemu.reads_layout(copy, layout)
    assert qemu.same_content(copy, d.path("default", snap))
    assert qemu.check_clean(copy)
    assert d.call("checkStorageRepository", "r2", {"deep": True}) == []
    assert d.stop() == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_random_during_merge(tmp_path: Any, seed: int) -> None:
    rng = random.Random(seed)
    d = Daemon(str(tmp_path / "dev"))
    d.start()
    disk = d.call("createVirtualDisk", "default", 2 * GiB)
    settle(d.call, "default", disk)
    base = qemu.fill(d.path("default", disk), DATA_GIB / 4, chunk=64 << 20)
    snap = d.call("createSnapshot", "default", disk)
    settle(d.call, "default", snap)
    # The top holds more than the snapshot and covers half of it: whichever way the merge goes,
    # it moves data, and both layers' bytes must survive it.
    top = qemu.fill(d.path("default", disk), DATA_GIB / 2, chunk=64 << 20,
                    offset=128 << 20)
    d.call("removeImage", "default", snap)
    [merge] = d.call("checkStorageRepository", "default", {"types": ["merge"]})
    d.call("fixStorageRepository", "default", merge)
    kill_within(d, rng.uniform(0.0, 0.8))
    d.start()
    converge(d, "default")
    assert d.call("getImageInfo", "default", disk)["chain"] == [disk]
    p = d.path("default", disk)
    assert qemu.reads_layout(p, top)
    below = [chunk for chunk in base if chunk[1] < 128 << 20]
    assert len(below) == 2 and qemu.reads_layout(p, below)
    assert qemu.check_clean(p)
    vols = os.listdir(os.path.join(d.dir, "repos", "default", "volumes"))
    assert len([v for v in vols if v.endswith(".qcow2")]) == 1, vols
    assert d.call("checkStorageRepository", "default", {"deep": True}) == []
    assert d.stop() == 0
