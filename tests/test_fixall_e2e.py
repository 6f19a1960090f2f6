"""``strata-client fixStorageRepository --all``: converge a repository from the shell."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from tests import qemu
from tests.conftest import ROOT, Daemon, settle, source_snapshot

pytestmark = pytest.mark.e2e
MiB = qemu.MiB


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rpc.client", "-s", d.socket, *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_all_applies_every_fix_in_a_safe_order(daemon: Daemon) -> None:
    disk = daemon.call("createVirtualDisk", "default", 64 * MiB)
    settle(daemon.call, "default", disk)
    path = daemon.call("prepareImage", "default", disk)["path"]
    daemon.call("teardownImage", "default", disk)
    qemu.write(path, 0x11, 0, 4 * MiB)
    snap = daemon.call("createSnapshot", "default", disk)
    settle(daemon.call, "default", snap)
    daemon.call("removeImage", "default", snap)  # a merge
    pending = daemon.call("createVirtualDisk", "default", 64 * MiB, None, {},
                          {"AutoFix": False})  # a mend

    only_clean = cli(daemon, "fixStorageRepository", "repositoryId=default", "--all",
                     "--types", "clean")
    assert only_clean.returncode == 0, only_clean
    assert "0 fix(es) applied" in only_clean.stdout  # nothing to clean yet

    r = cli(daemon, "fixStorageRepository", "repositoryId=default", "--all")
    assert r.returncode == 0, r
    kinds = [line.split()[0] for line in r.stdout.splitlines()
             if line.split() and line.split()[0] in ("mend", "merge", "optimize", "clean")]
    assert kinds == ["mend", "merge", "clean"], r.stdout
    assert "3 fix(es) applied, 0 failed" in r.stdout
    assert daemon.call("checkStorageRepository", "default") == []
    assert daemon.call("getImageStatus", "default", pending)["status"] == "optimized"
    assert daemon.call("getImageInfo", "default", disk)["chain"] == [disk]
    assert qemu.reads(daemon.call("prepareImage", "default", disk)["path"], 0x11, 0, 4 * MiB)
    daemon.call("teardownImage", "default", disk)


def test_all_reports_findings_for_a_person_and_bad_usage(daemon: Daemon) -> None:
    disk = daemon.call("createVirtualDisk", "default", 64 * MiB)
    settle(daemon.call, "default", disk)
    path = daemon.call("prepareImage", "default", disk)["path"]
    daemon.call("teardownImage", "default", disk)
    with open(path, "r+b") as f:
        f.write(b"JUNK")  # no longer a qcow2: which is right, the record or the file?
    r = cli(daemon, "fixStorageRepository", "repositoryId=default", "--all")
    assert r.returncode == 4 and "needs a person" in r.stdout, r
    assert cli(daemon, "fixStorageRepository", "repositoryId=default", "--all",
               "--types", "tidy").returncode == 2
    assert cli(daemon, "listImages", "repositoryId=default", "--all").returncode == 2


def test_all_shows_the_progress_of_each_fix(daemon: Daemon, tmp_path: Any) -> None:
    snap, layout = source_snapshot(daemon, tmp_path, 1.0)
    daemon.call("copyImage", "r2", snap, None, {}, {"AutoFix": False})  # waits for its mend
    r = cli(daemon, "fixStorageRepository", "repositoryId=r2", "--all")
    assert r.returncode == 0, r
    assert r.stdout.splitlines()[0].startswith(f"mend     resume copyImage of snapshot {snap}")
    assert "1 fix(es) applied, 0 failed" in r.stdout
    # stderr is no terminal here: the --watch line, once per change, while the copy runs.
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith("[") for line in lines), r.stderr
    assert lines[-1].startswith("[" + "#" * 30 + "] 100%  optimized")
    running = [line for line in lines if "stage 1/2" in line and "copyImage" in line]
    assert running, r.stderr
    percents = [int(line.split("]")[1].split("%")[0]) for line in running
                if "?%" not in line]
    assert percents == sorted(percents)
    assert qemu.reads_layout(daemon.path("r2", snap), layout)
