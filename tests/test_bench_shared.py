"""The benchmark's shared-repository parts that can be checked without a cluster: figure 11's lease
helper against a real sanlock daemon and a real lockspace (on a local directory: the cluster's
GlusterFS volume is what ``python -m bench --only 9,10,11,12`` adds), and the table's run count for
rows made of one value (a p95)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from agent.repo import leases
from bench import context, report, stats
from tests import sanlockd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IO = 1


@pytest.fixture
def joined(tmp_path: Any, sanlock_daemon: sanlockd.Daemon) -> Iterator[tuple[str, str]]:
    """A lockspace this host (id 1) joined, as a host's agent has before the helper runs."""
    root, repo_uuid = str(tmp_path / "repo"), str(uuid.uuid4())
    leases.format_areas(root, repo_uuid, IO)
    space = leases.Lockspace(root, repo_uuid, 1, IO)
    space.join()
    try:
        yield root, repo_uuid
    finally:
        space.remove()


def _helper(mode: str, root: str, repo_uuid: str, rounds: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.leasehelper", mode, root, repo_uuid, "1", str(IO),
         str(rounds)], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def _left(root: str) -> list[str]:
    return sorted(os.listdir(os.path.join(root, leases.LEASES)))


def test_the_lease_helper_times_each_round_and_leaves_no_lease_behind(
        joined: tuple[str, str]) -> None:
    root, repo_uuid = joined
    before = _left(root)
    got = _helper("leases", root, repo_uuid, 5)
    for key in ("acquire", "release", "bare_acquire", "bare_release"):
        assert len(got[key]) == 5 and all(t > 0 for t in got[key]), (key, got[key])
    assert got["make"] > 0
    assert _left(root) == before  # its own lease area went with it


def test_the_floor_helper_times_each_part_and_removes_what_it_wrote(
        joined: tuple[str, str]) -> None:
    root, repo_uuid = joined
    before = _left(root)
    got = _helper("floor", root, repo_uuid, 4)
    for key in ("intent", "complete", "record", "lease"):
        assert len(got[key]) == 4 and all(t > 0 for t in got[key]), (key, got[key])
    assert _left(root) == before
    assert os.listdir(os.path.join(root, "bench-scratch")) == []


def test_a_row_of_one_value_made_of_many_runs_shows_their_number() -> None:
    row = context.Row("p95", stats.Samples([0.02], stats.SECONDS),
                      stats.Samples([0.01], stats.SECONDS), "bare", 2.0, "≤ 50 ms", context.PASS,
                      n=40)
    lines = report.text([row]).splitlines()
    assert lines[-1].split()[-1] == "40"
    plain = context.Row("p50", stats.Samples([0.01, 0.02, 0.03], stats.SECONDS), None, "", None,
                        "", context.INFO)
    assert report.text([plain]).splitlines()[-1].split()[-1] == "3"
