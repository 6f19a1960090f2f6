"""options.requestId in-process: a retried data-changing call is answered from its record and
commits nothing new; a reused id with other params is refused and changes nothing."""

from __future__ import annotations

import functools
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from agent import api as agent_api
from agent import errors, fileio
from tests import conftest

MiB = 1 << 20


def rid() -> dict[str, Any]:
    return {"requestId": str(uuid.uuid4())}


def tree(root: str) -> dict[str, bytes]:
    """Every file under a repository with its bytes: what "nothing changed" compares."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def quiet(root: str, timeout: float = 30.0) -> None:
    """Wait until the repository's journal is empty: a sealed operation deletes its journal
    just after the image says it is done."""
    deadline = time.monotonic() + timeout
    while os.listdir(os.path.join(root, "journal")):
        assert time.monotonic() < deadline, os.listdir(os.path.join(root, "journal"))
        time.sleep(0.02)


def records(engine: conftest.Engine, repo: str) -> list[str]:
    """The image records in the repository (not a record being rewritten by a worker)."""
    names = os.listdir(os.path.join(engine.roots[repo], "images"))
    return sorted(n for n in names if not fileio.is_temporary(n))


def listed(engine: conftest.Engine, repo: str) -> list[str]:
    return [i["imageId"] for i in engine.api.listImages(repo, {"includeIncomplete": True})]


def test_same_request_id_twice_makes_one_disk(engine: conftest.Engine) -> None:
    opts = rid()
    first = engine.api.createVirtualDisk("r1", 64 * MiB, None, {"vm": "a"}, opts)
    again = engine.api.createVirtualDisk("r1", 64 * MiB, None, {"vm": "a"}, dict(opts))
    assert again == first
    assert listed(engine, "r1") == [first]
    assert records(engine, "r1") == [f"{first}.json"]
    assert engine.settle("r1", first)["status"] == "optimized"
    # Still the first call's answer once the disk is made, and with the params sent by name.
    assert engine.api.createVirtualDisk(targetRepoId="r1", size=64 * MiB, baseSnapshotId=None,
                                        userData={"vm": "a"}, options=opts) == first
    assert listed(engine, "r1") == [first]


def test_same_request_id_other_params_is_refused_and_changes_nothing(
        engine: conftest.Engine) -> None:
    opts = rid()
    disk = engine.api.createVirtualDisk("r1", 64 * MiB, None, {}, opts)
    engine.settle("r1", disk)
    quiet(engine.roots["r1"])
    before = tree(engine.roots["r1"])
    for call in (
        lambda: engine.api.createVirtualDisk("r1", 128 * MiB, None, {}, opts),
        lambda: engine.api.createVirtualDisk("r1", 64 * MiB, None, {"x": 1}, opts),
        lambda: engine.api.createVirtualDisk("r1", 64 * MiB, None, {}, {**opts, "AutoFix": False}),
        lambda: engine.api.createSnapshot("r1", disk, {}, opts),  # another method
        lambda: engine.api.removeImage("r1", disk, opts),
    ):
        with pytest.raises(errors.RequestIdReused) as e:
            call()
        assert e.value.code == 1010
        assert opts["requestId"] in e.value.message
        assert e.value.data["requestId"] == opts["requestId"]
    assert tree(engine.roots["r1"]) == before
    assert listed(engine, "r1") == [disk]


def test_snapshot_copy_and_remove_retried(engine: conftest.Engine) -> None:
    disk = engine.api.createVirtualDisk("r1", 64 * MiB, None, {}, {})
    engine.settle("r1", disk)
    snap_opts = rid()
    snap = engine.api.createSnapshot("r1", disk, {}, snap_opts)
    engine.settle("r1", snap)
    assert engine.api.createSnapshot("r1", disk, {}, dict(snap_opts)) == snap
    copy_opts = rid()
    copy = engine.api.copyImage("r2", disk, None, {}, copy_opts)  # a disk's copy: a new id
    assert copy != disk
    assert engine.api.copyImage("r2", disk, None, {}, dict(copy_opts)) == copy
    engine.settle("r2", copy)
    assert sorted(listed(engine, "r1")) == sorted([disk, snap])
    assert listed(engine, "r2") == [copy]
    rm = rid()
    engine.api.removeImage("r2", copy, rm)
    engine.api.removeImage("r2", copy, dict(rm))  # today: ImageNotFound
    assert listed(engine, "r2") == []
    # Prepare and teardown answer the first call's result too.
    prep = rid()
    first = engine.api.prepareImage("r1", disk, prep)
    assert engine.api.prepareImage("r1", disk, dict(prep)) == first
    down = rid()
    assert engine.api.teardownImage("r1", disk, down) == {"changed": True}
    assert engine.api.teardownImage("r1", disk, dict(down)) == {"changed": True}


def test_a_refused_call_is_not_remembered(engine: conftest.Engine) -> None:
    opts = rid()
    before = tree(engine.roots["r1"])
    with pytest.raises(errors.InvalidArgument):
        engine.api.createVirtualDisk("r1", 1000, None, {}, opts)  # not a multiple of 512
    assert tree(engine.roots["r1"]) == before
    # Nothing was done: the same requestId may carry the corrected call.
    disk = engine.api.createVirtualDisk("r1", 64 * MiB, None, {}, opts)
    assert engine.api.createVirtualDisk("r1", 64 * MiB, None, {}, opts) == disk
    assert listed(engine, "r1") == [disk]


def race(rnd: random.Random, n: int, send: Callable[[], Any], spread: float) -> list[Any]:
    """Run ``send`` on n threads at once, each after a seeded random delay; every answer (or
    the exception instead)."""
    answers: list[Any] = [None] * n

    def one(i: int, delay: float) -> None:
        time.sleep(delay)
        try:
            answers[i] = send()
        except Exception as e:  # noqa: BLE001 - the caller asserts on it
            answers[i] = e

    threads = [threading.Thread(target=one, args=(i, rnd.uniform(0, spread))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_concurrent_duplicates_make_one_image(engine: conftest.Engine) -> None:
    rnd = random.Random(9)
    for _ in range(15):
        opts = rid()
        send = functools.partial(engine.api.createVirtualDisk, "r1", 64 * MiB, None, {}, opts)
        answers = race(rnd, 6, send, 0.005)
        assert all(isinstance(a, str) for a in answers), answers
        assert len(set(answers)) == 1
    assert len(listed(engine, "r1")) == 15
    assert len(records(engine, "r1")) == 15


def short_lived(tmp_path: Any, state_dir: str | None) -> tuple[agent_api.Api, dict[str, Any],
                                                              str]:
    """An agent that keeps request ids for 1 s, with repository r1, and a disk made with a
    request id sent twice: (the agent, the options with that id, the disk)."""
    api = agent_api.Api(1, 1, state_dir, request_ttl=1.0)
    params = {"path": str(tmp_path / "r1")}
    api.formatStorageRepository("localfs-1.0", params, {})
    api.connectStorageRepository("r1", "localfs-1.0", params, {})
    opts = rid()
    first = api.createVirtualDisk("r1", 64 * MiB, None, {}, opts)
    assert api.createVirtualDisk("r1", 64 * MiB, None, {}, dict(opts)) == first
    return api, opts, first


def test_an_expired_request_id_is_a_new_call(tmp_path: Any) -> None:
    api, opts, first = short_lived(tmp_path, str(tmp_path / "state"))
    try:
        record = tmp_path / "state" / "requests" / f"{opts['requestId']}.json"
        assert record.exists()
        time.sleep(1.3)
        # Past request_ttl the id is forgotten: the same id is a new call, even with other
        # params, and the old record is pruned.
        second = api.createVirtualDisk("r1", 128 * MiB, None, {}, dict(opts))
        assert second != first
        assert sorted(i["imageId"] for i in api.listImages("r1", {"includeIncomplete": True})
                      ) == sorted([first, second])
        time.sleep(1.3)
        assert api.requests.prune() == 1
        assert not record.exists()
    finally:
        api.close()


def test_without_a_state_dir_request_ids_are_kept_in_memory(tmp_path: Any) -> None:
    api, opts, first = short_lived(tmp_path, None)
    try:
        with pytest.raises(errors.RequestIdReused):
            api.createVirtualDisk("r1", 128 * MiB, None, {}, opts)
        time.sleep(1.3)
        assert api.requests.prune() == 1
        assert api.createVirtualDisk("r1", 128 * MiB, None, {}, opts) != first
    finally:
        api.close()


def test_a_damaged_record_refuses_and_creates_nothing(engine: conftest.Engine) -> None:
    opts = rid()
    directory = os.path.join(engine.base, "state", "requests")
    with open(os.path.join(directory, f"{opts['requestId']}.json"), "w") as f:
        f.write('{"requestId": ')
    with pytest.raises(errors.Error) as e:
        engine.api.createVirtualDisk("r1", 64 * MiB, None, {}, opts)
    assert "cannot be read" in e.value.message
    assert listed(engine, "r1") == []


def test_a_request_id_must_be_a_uuid(engine: conftest.Engine) -> None:
    with pytest.raises(errors.InvalidArgument):
        engine.api.createVirtualDisk("r1", 64 * MiB, None, {}, {"requestId": "../../etc/x"})
    assert listed(engine, "r1") == []
