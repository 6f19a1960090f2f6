"""Recovering many pending operations after a kill -9, from the shell: ``--all`` applies them
in batches and waits on them (waitForOperations), instead of a check, a call and a poll per
fix; and applying them one fix per call works the same."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import pytest

from rpc import fixall, transport
from tests import qemu
from tests.conftest import ROOT, Daemon, settle

pytestmark = pytest.mark.e2e
MiB = qemu.MiB
PENDING = 150  # more than one batch of fixes (rpc/fixall.py BATCH)


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rpc.client", "-s", d.socket, *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})


def pending_after_kill(d: Daemon, n: int) -> list[str]:
    """n disks from one snapshot whose creates wait for a mend, and the agent killed -9 and
    started again."""
    disk = d.call("createVirtualDisk", "default", 64 * MiB)
    settle(d.call, "default", disk)
    snap = d.call("createSnapshot", "default", disk)
    settle(d.call, "default", snap)
    client = d.client()
    try:
        made = [client.call("createVirtualDisk", "default", 64 * MiB, snap, {},
                            {"AutoFix": False}) for _ in range(n)]
    finally:
        client.close()
    d.kill()
    d.start()
    return made


def test_all_recovers_many_pending_operations_in_batches(daemon: Daemon) -> None:
    made = pending_after_kill(daemon, PENDING)
    assert all(s["status"] == "broken" for s in daemon.call(
        "waitForOperations", "default", made))  # nothing runs them: answered at once
    r = cli(daemon, "fixStorageRepository", "repositoryId=default", "--all")
    assert r.returncode == 0, r
    assert f"{PENDING} fix(es) applied, 0 failed" in r.stdout, r.stdout
    assert sum(line.startswith("mend ") for line in r.stdout.splitlines()) == PENDING
    statuses = daemon.call("waitForOperations", "default", made)
    assert [s["status"] for s in statuses] == ["optimized"] * PENDING
    assert daemon.call("checkStorageRepository", "default") == []
    path = daemon.path("default", made[-1])
    qemu.write(path, 0x5A, 0, MiB)
    assert qemu.reads(path, 0x5A, 0, MiB)


def test_all_checks_once_sends_batches_and_waits_without_polling(daemon: Daemon) -> None:
    made = pending_after_kill(daemon, PENDING)
    sent: list[str] = []
    batches: list[int] = []
    client = daemon.client()

    def call(method: str, params: Mapping[str, Any]) -> Any:
        sent.append(method)
        return client.call(method, **params)

    def batch(calls: list[tuple[str, Mapping[str, Any]]]) -> list[Any]:
        batches.append(len(calls))
        return client.call_batch(calls)

    def no_sleep(_: float) -> None:
        raise AssertionError("--all slept in a polling loop")

    out = io.StringIO()
    try:
        assert fixall.fix_all(call, "default", None, out, no_sleep, None, batch,
                              wait=True) == (PENDING, 0, 0)
    finally:
        client.close()
    # One check finds them all, one more sees nothing left; the fixes go in full batches and
    # are waited on, never polled with getImageStatus.
    assert sent.count("checkStorageRepository") == 2, sent
    assert "getImageStatus" not in sent and "fixStorageRepository" not in sent
    assert batches == [fixall.BATCH, PENDING - fixall.BATCH]
    assert [s["status"] for s in daemon.call("waitForOperations", "default", made)] \
        == ["optimized"] * PENDING


def test_one_fix_per_call_recovers_them_too(daemon: Daemon) -> None:
    made = pending_after_kill(daemon, 40)
    fixes = daemon.call("checkStorageRepository", "default", {"types": ["mend"]})
    assert sorted(i for f in fixes for i in f["imageIds"]) == sorted(made)
    client = daemon.client()
    try:
        for fix in fixes:
            client.call("fixStorageRepository", "default", fix)
        with pytest.raises(transport.RemoteError, match="does not match"):
            client.call("fixStorageRepository", "default", fixes[0])  # sent again: stale
        statuses = client.call("waitForOperations", "default", made, {"timeout": 20})
    finally:
        client.close()
    assert [s["status"] for s in statuses] == ["optimized"] * len(made)
    assert daemon.call("checkStorageRepository", "default") == []


def test_wait_for_operations_answers_each_image_and_refuses_bad_input(daemon: Daemon) -> None:
    disk = daemon.call("createVirtualDisk", "default", 64 * MiB)
    gone = "00000000-0000-4000-8000-000000000000"
    statuses = daemon.call("waitForOperations", "default", [disk, gone], {"timeout": 20})
    assert statuses[0]["status"] == "optimized" and not statuses[0]["running"]
    assert statuses[1] is None
    for bad in ([], ["not-an-id"]):
        with pytest.raises(transport.RemoteError, match="imageIds") as e:
            daemon.call("waitForOperations", "default", bad)
        assert e.value.code == -32602
    with pytest.raises(transport.RemoteError, match="timeout") as e:
        daemon.call("waitForOperations", "default", [disk], {"timeout": 3600})
    assert e.value.code == -32602
