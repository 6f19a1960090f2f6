"""options.requestId against the real daemon: retries over the socket, after the agent died
between its commit and its record, from many clients at once, past request_ttl, and from
strata-client, whose timeout says how to retry safely."""

from __future__ import annotations

import functools
import http.client
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from agent import crashpoint
from rpc import transport
from tests import conftest, mounts
from tests.test_requests import quiet, race, tree

MiB = 1 << 20
ENV = {**os.environ, "PYTHONPATH": conftest.ROOT}


def rid() -> dict[str, Any]:
    return {"requestId": str(uuid.uuid4())}


def images(d: Any, repo: str = "default") -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = d.call("listImages", repo, {"includeIncomplete": True})
    return found


def test_same_request_id_twice_over_rpc(daemon: conftest.Daemon) -> None:
    opts = rid()
    first = daemon.call("createVirtualDisk", "default", 64 * MiB, None, {"vm": "a"}, opts)
    # By name this time: the same params bound the same way.
    again = daemon.call("createVirtualDisk", targetRepoId="default", size=64 * MiB,
                        userData={"vm": "a"}, options=opts)
    assert again == first
    conftest.settle(daemon.call, "default", first)
    root = os.path.join(daemon.dir, "repos", "default")
    quiet(root)
    before = tree(root)
    assert [i["imageId"] for i in images(daemon)] == [first]
    assert sorted(os.listdir(os.path.join(root, "images"))) == [f"{first}.json"]

    with pytest.raises(transport.RemoteError) as e:
        daemon.call("createVirtualDisk", "default", 128 * MiB, None, {"vm": "a"}, opts)
    assert (e.value.code, e.value.name) == (1010, "RequestIdReused")
    assert opts["requestId"] in e.value.message
    assert tree(root) == before
    assert daemon.call("createVirtualDisk", "default", 64 * MiB, None, {"vm": "a"}, opts) == first


def test_request_id_must_be_a_uuid_and_only_on_data_changing_calls(
        daemon: conftest.Daemon) -> None:
    # setImageUserData and stopOperation had no options: they take a requestId now too.
    disk = daemon.call("createVirtualDisk", "default", 64 * MiB)
    conftest.settle(daemon.call, "default", disk)
    opts = rid()
    daemon.call("setImageUserData", "default", disk, {"a": 1}, opts)
    daemon.call("setImageUserData", "default", disk, {"a": 1}, opts)
    with pytest.raises(transport.RemoteError) as e:
        daemon.call("setImageUserData", "default", disk, {"a": 2}, opts)
    assert e.value.name == "RequestIdReused"
    assert daemon.call("getImageInfo", "default", disk)["userData"] == {"a": 1}
    with pytest.raises(transport.RemoteError) as e:
        daemon.call("stopOperation", "default", disk, rid())
    assert e.value.name == "NoOperation"
    with pytest.raises(transport.RemoteError) as e:
        daemon.call("createVirtualDisk", "default", 64 * MiB, None, {}, {"requestId": "x/../y"})
    assert e.value.code == -32602 and "requestId" in e.value.message
    with pytest.raises(transport.RemoteError) as e:
        daemon.call("listImages", "default", rid())
    assert e.value.code == -32602
    assert [i["imageId"] for i in images(daemon)] == [disk]


def _crash_and_retry(tmp_path: Any, point: str, method: str) -> None:
    arm = tmp_path / "arm"
    d = conftest.Daemon(str(tmp_path / "dev"), env={
        "STRATA_TEST_CRASH_AT": f"request:{point}", "STRATA_TEST_CRASH_ARM": str(arm)})
    d.start()
    try:
        disk = d.call("createVirtualDisk", "default", 64 * MiB)  # no requestId: no crash point
        conftest.settle(d.call, "default", disk)
        args: tuple[Any, ...] = (("default", 64 * MiB, None, {}) if method == "createVirtualDisk"
                                 else ("default", disk, {}))
        opts = rid()
        arm.touch()
        with pytest.raises((OSError, http.client.HTTPException)):
            d.call(method, *args, opts)
        assert d.proc is not None and d.proc.wait(30) == crashpoint.EXIT_CODE, d.read_log()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
    again = conftest.Daemon(d.dir)
    again.start()
    try:
        made = again.call(method, *args, opts)
        assert again.call(method, *args, opts) == made
        others = [i["imageId"] for i in images(again) if i["imageId"] != disk]
        assert others == [made]
        records = [n for n in os.listdir(os.path.join(d.dir, "repos", "default", "images"))
                   if not n.startswith(".")]
        assert sorted(records) == sorted([f"{disk}.json", f"{made}.json"])
        # The operation the crash cut short is finished by its mend fix; then nothing but
        # cleaning is left, and the new image is whole.
        for fix in again.call("checkStorageRepository", "default", {"types": ["mend"]}):
            again.call("fixStorageRepository", "default", fix)
        assert conftest.settle(again.call, "default", made)["status"] == "optimized"
        left = again.call("checkStorageRepository", "default", {"types": ["mend", "merge"]})
        assert left == []
    finally:
        assert again.stop() == 0, again.read_log()


@pytest.mark.parametrize("method", ["createVirtualDisk", "createSnapshot"])
def test_retry_after_a_crash_between_commit_and_record(tmp_path: Any, method: str) -> None:
    _crash_and_retry(tmp_path, "record", method)


def test_retry_after_a_crash_before_the_commit(tmp_path: Any) -> None:
    _crash_and_retry(tmp_path, "run", "createVirtualDisk")


def test_concurrent_duplicates_over_rpc(daemon: conftest.Daemon) -> None:
    rnd = random.Random(41)
    disk = daemon.call("createVirtualDisk", "default", 64 * MiB)
    conftest.settle(daemon.call, "default", disk)
    made = set()
    for _ in range(8):
        opts = rid()
        send = functools.partial(daemon.call, "createVirtualDisk", "default", 64 * MiB, None,
                                 {}, opts)
        answers = race(rnd, 6, send, 0.02)
        assert all(isinstance(a, str) for a in answers), answers
        assert len(set(answers)) == 1
        made |= set(answers)
        # Snapshots too: without the request id, the second would be refused as busy or make
        # a second snapshot.
        opts = rid()
        send = functools.partial(daemon.call, "createSnapshot", "default", disk, {}, opts)
        answers = race(rnd, 4, send, 0.02)
        assert all(isinstance(a, str) for a in answers), answers
        assert len(set(answers)) == 1
        made |= set(answers)
        conftest.settle(daemon.call, "default", answers[0])
    assert sorted(i["imageId"] for i in images(daemon)) == sorted(made | {disk})
    assert len(made) == 16


@pytest.fixture
def configured(tmp_path: Any) -> Iterator[str]:
    """The real daemon from a configuration file with request_ttl = 1; its socket."""
    sock = str(tmp_path / "agent.sock")
    conf = tmp_path / "agent.conf"
    conf.write_text(f"[rpc]\nsocket = {sock}\n[agent]\nstate_dir = {tmp_path / 'state'}\n"
                    "request_ttl = 1\n")
    with open(tmp_path / "agent.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rpc.main", "--config", str(conf)],
                                stdout=log, stderr=log, env=ENV)
    try:
        assert transport.wait_for_socket(sock, 20, lambda: proc.poll() is None), (
            (tmp_path / "agent.log").read_text())
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "agent.log").read_text()


def test_request_ttl_from_the_configuration(configured: str, tmp_path: Any) -> None:
    c = transport.Client(socket_path=configured)
    try:
        params = {"path": str(tmp_path / "r1")}
        c.call("formatStorageRepository", "localfs-1.0", params)
        c.call("connectStorageRepository", "r1", "localfs-1.0", params)
        opts = rid()
        first = c.call("createVirtualDisk", "r1", 64 * MiB, None, {}, opts)
        assert c.call("createVirtualDisk", "r1", 64 * MiB, None, {}, opts) == first
        time.sleep(1.3)
        # Forgotten after a second: the same requestId is a new call.
        second = c.call("createVirtualDisk", "r1", 64 * MiB, None, {}, opts)
        assert second != first
        listed = c.call("listImages", "r1", {"includeIncomplete": True})
        assert sorted(i["imageId"] for i in listed) == sorted([first, second])
    finally:
        c.close()


def cli(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rpc.client", "-s", sock, *args],
                          capture_output=True, text=True, env=ENV, timeout=90)


def test_cli_sends_a_request_id_and_retries_with_it(daemon: conftest.Daemon) -> None:
    requests_dir = os.path.join(daemon.dir, "state", "requests")
    before = set(os.listdir(requests_dir))
    p = cli(daemon.socket, "createVirtualDisk", "targetRepoId=default", "size=64M")
    assert p.returncode == 0, p.stderr
    disk = p.stdout.strip()
    new = set(os.listdir(requests_dir)) - before
    assert len(new) == 1  # the CLI's own requestId, answered with the disk's id
    with open(os.path.join(requests_dir, new.pop())) as f:
        assert json.load(f)["result"] == disk

    request_id = str(uuid.uuid4())
    args = ("createSnapshot", "targetRepoId=default", f"baseVirtualDiskId={disk}",
            "--request-id", request_id)
    first = cli(daemon.socket, *args)
    assert first.returncode == 0, first.stderr
    again = cli(daemon.socket, *args)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    snaps = [i["imageId"] for i in images(daemon) if i["kind"] == "snapshot"]
    assert snaps == [first.stdout.strip()]
    # Other params under the same id: the agent's error, exit 1.
    other = cli(daemon.socket, "createSnapshot", "targetRepoId=default",
                f"baseVirtualDiskId={disk}", 'userData={"x": 1}', "--request-id", request_id)
    assert other.returncode == 1
    assert "RequestIdReused (1010)" in other.stderr
    bad = cli(daemon.socket, "getHostInfo", "--request-id", request_id)
    assert bad.returncode == 2 and "--request-id goes with a data-changing call" in bad.stderr
    bad = cli(daemon.socket, "removeImage", "repositoryId=default", f"imageId={disk}",
              "--request-id", "not-a-uuid")
    assert bad.returncode == 2 and "not a lower-case UUID" in bad.stderr
    assert disk in [i["imageId"] for i in images(daemon)]

    # fixStorageRepository --all sends each fix with its own requestId.
    gone = cli(daemon.socket, "createVirtualDisk", "targetRepoId=default", "size=64M").stdout
    conftest.settle(daemon.call, "default", gone.strip())
    assert cli(daemon.socket, "removeImage", "repositoryId=default",
               f"imageId={gone.strip()}").returncode == 0
    p = cli(daemon.socket, "fixStorageRepository", "repositoryId=default", "--all", "--types",
            "clean")
    assert p.returncode == 0, p.stderr + p.stdout
    methods = []
    for name in os.listdir(requests_dir):
        with open(os.path.join(requests_dir, name)) as f:
            methods.append(json.load(f)["method"])
    assert methods.count("fixStorageRepository") == 1
    assert methods.count("removeImage") == 1


def test_cli_without_an_answer_says_how_to_retry_safely(tmp_path: Any) -> None:
    """The agent's state directory frozen (fsfreeze) holds the call past the client's timeout,
    as a stuck disk would; once thawed the call is carried out, and the printed command gets
    its answer without making a second disk."""
    dev = str(tmp_path / "dev")
    os.makedirs(dev)
    with mounts.loop_mount(str(tmp_path), "xfs", 300) as mnt:
        state = os.path.join(dev, "state")
        os.symlink(mnt, state)
        d = conftest.Daemon(dev)
        d.start()
        frozen = False
        try:
            subprocess.run(["fsfreeze", "-f", mnt], check=True)
            frozen = True
            p = cli(d.socket, "--timeout", "2", "createVirtualDisk", "targetRepoId=default",
                    "size=64M")
            assert p.returncode == 5, p.stderr
            assert "Traceback" not in p.stderr
            assert "no answer from the agent" in p.stderr
            assert "createVirtualDisk may have been carried out" in p.stderr
            retry = shlex.split(p.stderr.splitlines()[-1])
            assert retry[0] == "strata-client" and retry[-2] == "--request-id"
            assert retry[1:-2] == ["-s", d.socket, "--timeout", "2", "createVirtualDisk",
                                   "targetRepoId=default", "size=64M"]
            subprocess.run(["fsfreeze", "-u", mnt], check=True)
            frozen = False
            done = subprocess.run([sys.executable, "-m", "rpc.client", *retry[1:]],
                                  capture_output=True, text=True, env=ENV, timeout=90)
            assert done.returncode == 0, done.stderr
            disk = done.stdout.strip()
            assert [i["imageId"] for i in images(d)] == [disk]
        finally:
            if frozen:
                subprocess.run(["fsfreeze", "-u", mnt], check=False)
            if d.proc is not None and d.proc.poll() is None:
                assert d.stop() == 0, d.read_log()
