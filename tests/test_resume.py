"""Resume at start, in-process: which journaled operations a starting agent takes up again by
itself, and which wait for a mend fix. (The real daemon killed mid-copy: tests/test_crash_e2e.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from agent import api as agent_api
from agent.image import model
from tests import qemu
from tests.conftest import FORMATS, ROOT, Engine, settle

MiB = qemu.MiB


@pytest.fixture(params=FORMATS)
def repo_format(request: pytest.FixtureRequest) -> str:
    """This suite runs on every format (tests/conftest.py FORMATS)."""
    return str(request.param)


def journal(e: Engine, repo: str) -> dict[str, dict[str, Any]]:
    """Operation id -> its journal record, as on disk."""
    out = {}
    directory = os.path.join(e.roots[repo], "journal")
    for name in os.listdir(directory):
        with open(os.path.join(directory, name)) as f:
            out[name.removesuffix(".json")] = json.load(f)
    return out


def rewrite(e: Engine, repo: str, op_id: str, **fields: Any) -> None:
    path = os.path.join(e.roots[repo], "journal", f"{op_id}.json")
    with open(path) as f:
        record = json.load(f)
    record.update(fields)
    for key, value in list(record.items()):
        if value is DROP:
            del record[key]
    with open(path, "w") as f:
        json.dump(record, f)


DROP = object()


class Restarted:
    """The engine's repositories under a new Api, as a restarted agent sees them."""

    def __init__(self, e: Engine) -> None:
        e.api.close()
        self.api = agent_api.Api(1, 2, os.path.join(e.base, "state"))
        self.api.restore_connections()

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.api, method)(*args)


@pytest.fixture
def restarted() -> Iterator[list[Restarted]]:
    made: list[Restarted] = []
    yield made
    for r in made:
        r.api.close()


def op_of(e: Engine, repo: str, image_id: str) -> str:
    [op_id] = [k for k, v in journal(e, repo).items() if v["image_id"] == image_id]
    return op_id


def test_auto_fix_is_journaled(engine: Engine) -> None:
    waiting = engine.call("createVirtualDisk", "r1", 64 * MiB, None, {}, {"AutoFix": False})
    assert journal(engine, "r1")[op_of(engine, "r1", waiting)]["auto_fix"] is False


@pytest.mark.parametrize("state, auto_fix, resumes", [
    ("running", True, True),
    ("running", False, True),  # a mend started it: running is running
    ("pending", True, True),  # queued
    ("pending", False, False),  # an AutoFix=false intent
    ("stopped", True, False),  # a client stopped it, or it failed
    ("aborted", True, False),
])
def test_what_resumes_on_start(state: str, auto_fix: bool, resumes: bool) -> None:
    op = model.Operation.from_dict({"id": str(uuid.uuid4()), "kind": "copyImage",
                                    "image_id": str(uuid.uuid4()), "params": {}, "state": state,
                                    "auto_fix": auto_fix})
    assert op.resumes_on_start is resumes


@pytest.mark.parametrize("state, auto_fix", [("running", True), ("pending", False),
                                             ("stopped", False)])
def test_a_journal_from_before_the_field(state: str, auto_fix: bool) -> None:
    # An older agent never started anything by itself: only what it ran is sure to be wanted.
    op = model.Operation.from_dict({"id": str(uuid.uuid4()), "kind": "copyImage",
                                    "image_id": str(uuid.uuid4()), "params": {}, "state": state})
    assert op.auto_fix is auto_fix


def test_start_takes_up_queued_and_leaves_the_rest(engine: Engine,
                                                   restarted: list[Restarted]) -> None:
    def intent() -> tuple[str, str]:
        image = engine.call("createVirtualDisk", "r1", 64 * MiB, None, {}, {"AutoFix": False})
        return image, op_of(engine, "r1", image)

    waiting, _ = intent()  # AutoFix=false: waits
    queued, queued_op = intent()
    rewrite(engine, "r1", queued_op, auto_fix=True)  # committed with AutoFix, never picked up
    interrupted, interrupted_op = intent()
    rewrite(engine, "r1", interrupted_op, state="running", auto_fix=DROP)  # an older agent's
    failed, failed_op = intent()
    rewrite(engine, "r1", failed_op, state="stopped", auto_fix=True,
            progress={"host_id": 1, "stage": "1/2", "percent": 0,
                      "last_error": "No space left on device"})
    old_pending, old_op = intent()
    rewrite(engine, "r1", old_op, auto_fix=DROP)  # an older agent's: AutoFix false, or queued

    r = Restarted(engine)
    restarted.append(r)
    assert r.api.resume_interrupted() == (2, 3)
    for image in (queued, interrupted):
        assert settle(r.call, "r1", image)["status"] == "optimized"
    for image in (waiting, failed, old_pending):
        s = r.call("getImageStatus", "r1", image)
        assert s["status"] == "broken" and not s["running"], s
    assert r.call("getImageStatus", "r1", failed)["last_error"] == "No space left on device"
    mends = {f["imageIds"][0] for f in r.call("checkStorageRepository", "r1", {})}
    assert mends == {waiting, failed, old_pending}


def test_a_copy_whose_source_is_not_connected_waits(engine: Engine,
                                                    restarted: list[Restarted]) -> None:
    disk = engine.call("createVirtualDisk", "r1", 64 * MiB)
    engine.settle("r1", disk)
    qemu.write(engine.path("r1", disk), 0x22, 0, MiB)
    snap = engine.call("createSnapshot", "r1", disk)
    engine.settle("r1", snap)
    engine.call("copyImage", "r2", snap, None, {}, {"AutoFix": False})
    rewrite(engine, "r2", op_of(engine, "r2", snap), state="running")
    with open(os.path.join(engine.base, "state", "connections.json")) as f:
        connections = [c for c in json.load(f) if c["repoId"] == "r2"]
    with open(os.path.join(engine.base, "state", "connections.json"), "w") as f:
        json.dump(connections, f)  # r1, which holds the source, is not remembered

    r = Restarted(engine)
    restarted.append(r)
    assert r.api.resume_interrupted() == (0, 1)
    assert not r.call("getImageStatus", "r2", snap)["running"]
    # Once the source's repository is back, its mend runs it.
    r.call("connectStorageRepository", "r1", engine.format, engine.params["r1"], {})
    [mend] = r.call("checkStorageRepository", "r2", {})
    r.call("fixStorageRepository", "r2", mend, {})
    assert settle(r.call, "r2", snap)["status"] == "optimized"
    assert qemu.reads(r.call("prepareImage", "r2", snap, {})["path"], 0x22, 0, MiB)
    r.call("teardownImage", "r2", snap, {})


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rpc.main", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})


def test_dev_with_config_is_refused(tmp_path: Any) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text("[agent]\nworkers = 2\n")
    p = agent("--dev", str(tmp_path / "dev"), "--config", str(conf))
    assert p.returncode == 2, p
    assert p.stderr.startswith("strata-agent: --dev and --config do not go together")
    assert p.stderr.count("\n") == 1
    assert not (tmp_path / "dev").exists()  # nothing was started or made


def test_no_resume_and_the_key(tmp_path: Any) -> None:
    p = agent("--dev", str(tmp_path / "dev"), "--show-config")
    assert p.returncode == 0 and "resume_on_start = true" in p.stdout.splitlines(), p
    p = agent("--dev", str(tmp_path / "dev"), "--no-resume", "--show-config")
    assert p.returncode == 0 and "resume_on_start = false" in p.stdout.splitlines(), p
    conf = tmp_path / "agent.conf"
    conf.write_text("[agent]\nresume_on_start = no\n")
    p = agent("--config", str(conf), "--show-config")
    assert p.returncode == 0 and "resume_on_start = false" in p.stdout.splitlines(), p
