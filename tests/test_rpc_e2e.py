"""The real daemon over its Unix socket: the wire contract and bad input.

Every bad call must get a clear error and change nothing: the repository's files are compared
before and after the whole barrage.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from typing import Any

import pytest

from rpc import transport
from tests.conftest import Daemon, settle

pytestmark = pytest.mark.e2e
MiB = 1 << 20


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def snapshot_tree(root: str) -> list[tuple[str, int, float]]:
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            if f == "lock":
                continue
            st = os.stat(os.path.join(d, f))
            out.append((os.path.relpath(os.path.join(d, f), root), st.st_size, st.st_mtime))
    return sorted(out)


def raw(d: Daemon, body: Any) -> tuple[int, Any]:
    c = d.client()
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, answer = c.post(data)
        return status, json.loads(answer) if answer else None
    finally:
        c.close()


def error_of(d: Daemon, method: str, params: Any) -> dict[str, Any]:
    status, answer = raw(d, {"jsonrpc": "2.0", "method": method, "params": params, "id": 7})
    assert status == 200 and answer["id"] == 7 and "result" not in answer, answer
    err: dict[str, Any] = answer["error"]
    assert "Traceback" not in json.dumps(err)
    return err


def test_socket_mode_and_discover(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660
    doc = daemon.call("rpc.discover")
    names = {m["name"] for m in doc["methods"]}
    assert {"createVirtualDisk", "copyImage", "checkStorageRepository"} <= names
    assert doc["components"]["errors"]["ImageNotFound"]["code"] == 1200


def test_positional_and_named_params(daemon: Daemon) -> None:
    a = daemon.call("createVirtualDisk", "default", 64 * MiB)
    b = daemon.call("createVirtualDisk", targetRepoId="default", size=64 * MiB,
                    userData={"n": 2})
    for i in (a, b):
        assert settle(daemon.call, "default", i)["status"] == "optimized"
    ids = {row["imageId"] for row in daemon.call("listImages", "default")}
    assert {a, b} <= ids


def test_bad_input_gets_clear_errors_and_changes_nothing(daemon: Daemon) -> None:
    d = daemon.call("createVirtualDisk", "default", 64 * MiB)
    settle(daemon.call, "default", d)
    s = daemon.call("createSnapshot", "default", d)
    settle(daemon.call, "default", s)
    root = os.path.join(daemon.dir, "repos", "default")
    before = snapshot_tree(root)
    other = str(uuid.uuid4())

    cases: list[tuple[str, Any, int, str]] = [
        ("noSuchMethod", {}, -32601, ""),
        ("createVirtualDisk", {"targetRepoId": "default", "size": "big"}, -32602, "'size'"),
        ("createVirtualDisk", {"targetRepoId": "default"}, -32602, "'size'"),
        ("createVirtualDisk", {"targetRepoId": "default", "size": -1024}, -32602, "'size'"),
        ("createVirtualDisk", {"targetRepoId": "default", "size": 1000}, -32602, "'size'"),
        ("createVirtualDisk", {"targetRepoId": "default", "size": 10**30}, -32602, "'size'"),
        ("createVirtualDisk", {"targetRepoId": "default", "size": True}, -32602, "'size'"),
        ("createVirtualDisk", {"targetRepoId": 5, "size": 1024}, -32602, "'targetRepoId'"),
        ("createVirtualDisk", {"targetRepoId": "default", "size": 1024, "x": 1}, -32602, "'x'"),
        ("createVirtualDisk", ["default", 1024, None, {}, {}, "extra"], -32602, "at most"),
        ("createVirtualDisk", {"targetRepoId": "default", "size": 1024,
                               "options": {"strategy": "fastest"}}, -32602, "'options'"),
        ("getImageStatus", {"repositoryId": "default", "imageId": "../../etc/passwd"},
         -32602, "'imageId'"),
        ("getImageStatus", {"repositoryId": "../x", "imageId": other}, -32602,
         "'repositoryId'"),
        ("getImageStatus", {"repositoryId": "nope", "imageId": other}, 1100, "nope"),
        ("getImageStatus", {"repositoryId": "default", "imageId": other}, 1200, other),
        ("createSnapshot", {"targetRepoId": "default", "baseVirtualDiskId": s}, 1202,
         "snapshot"),
        ("createVirtualDisk", {"targetRepoId": "default", "size": 64 * MiB,
                               "baseSnapshotId": d}, 1202, "baseSnapshotId"),
        ("copyImage", {"targetRepoId": "default", "imageId": d, "baseImageId": d}, -32602,
         "baseImageId"),
        ("setImageUserData", {"repositoryId": "default", "imageId": d,
                              "userData": _nested(600)}, -32602, "'userData'"),
        ("createVirtualDisk", {"targetRepoId": "default", "size": 1 << 20,
                               "userData": _nested(100)}, -32602, "'userData'"),
        ("connectStorageRepository", {"repoId": "x", "repoFormat": "localfs-1.0",
                                      "connectionParameters": {}}, -32602, "path"),
        ("fixStorageRepository", {"repositoryId": "default",
                                  "fix": {"type": "clean", "imageIds": [], "description": "x",
                                          "data": "forged"}}, 1400, "stale"),
        # A fix is the whole object the checker proposed: a part of one is refused.
        ("fixStorageRepository", {"repositoryId": "default",
                                  "fix": {"type": "clean", "data": "forged"}}, -32602,
         "'imageIds'"),
        ("setImageUserData", {"repositoryId": "default", "imageId": d,
                              "userData": {"x": "y" * 70000}}, -32602, "'userData'"),
    ]
    for method, params, code, needle in cases:
        err = error_of(daemon, method, params)
        assert err["code"] == code, (method, params, err)
        assert needle in err["message"], (method, params, err)
    assert snapshot_tree(root) == before


def test_malformed_bodies_and_batches(daemon: Daemon) -> None:
    status, answer = raw(daemon, b'{"jsonrpc": "2.0", "method": ')
    assert status == 200 and answer["error"]["code"] == -32700 and answer["id"] is None

    status, answer = raw(daemon, b"[" * 200_000 + b"]" * 200_000)
    assert status == 200 and answer["error"]["code"] == -32700

    status, answer = raw(daemon, [])
    assert answer["error"]["code"] == -32600

    status, answer = raw(daemon, [1, 2, 3])
    assert [a["error"]["code"] for a in answer] == [-32600] * 3
    assert all(a["id"] is None for a in answer)

    status, answer = raw(daemon, [
        {"jsonrpc": "2.0", "method": "getHostInfo", "id": "a"},
        {"jsonrpc": "2.0", "method": "getHostInfo"},  # a notification: no answer
        {"foo": "bar"},
        {"jsonrpc": "2.0", "method": "nope", "id": 9},
        {"jsonrpc": "2.0", "method": "getImageStatus", "params": ["default", "x"], "id": 10},
    ])
    by_id = {a["id"]: a for a in answer}
    assert len(answer) == 4
    assert by_id["a"]["result"]["hostID"] == 1
    assert by_id[None]["error"]["code"] == -32600
    assert by_id[9]["error"]["code"] == -32601
    assert by_id[10]["error"]["code"] == -32602

    status, answer = raw(daemon, [{"jsonrpc": "2.0", "method": "getHostInfo"}])
    assert status == 204 and answer is None  # only notifications: nothing to answer

    status, answer = raw(daemon, b'{"jsonrpc":"2.0","method":"getHostInfo","id":1,"p":"'
                         + b"x" * (1 << 20) + b'"}')
    assert status == 413 and answer["error"]["code"] == -32600

    c = transport.Client(socket_path=daemon.socket)
    try:
        assert c.call("getHostInfo")["hostID"] == 1  # the agent is still fine
    finally:
        c.close()


def test_connect_is_idempotent_and_refuses_other_parameters(daemon: Daemon, tmp_path: Any) -> None:
    params = {"path": str(tmp_path / "r2")}
    daemon.call("formatStorageRepository", "localfs-1.0", params)
    first = daemon.call("connectStorageRepository", "r2", "localfs-1.0", params)
    again = daemon.call("connectStorageRepository", "r2", "localfs-1.0", params)
    assert first["changed"] and not again["changed"]
    err = error_of(daemon, "connectStorageRepository",
                   ["r2", "localfs-1.0", {"path": str(tmp_path / "other")}])
    assert err["code"] == 1101
    err = error_of(daemon, "formatStorageRepository", ["localfs-1.0", params])
    assert err["code"] == 1104  # not empty: formatting never destroys a repository
    assert {r["repoId"] for r in daemon.call("listStorageRepositories")} == {"default", "r2"}
    daemon.call("disconnectStorageRepository", "r2")
    assert [r["repoId"] for r in daemon.call("listStorageRepositories")] == ["default"]


def test_a_damaged_repository_is_refused_and_harms_nothing(daemon: Daemon, tmp_path: Any) -> None:
    bad = tmp_path / "damaged"
    bad.mkdir()
    (bad / "repository.json").write_text('{"format": "localfs-1.0"}')
    err = error_of(daemon, "connectStorageRepository",
                   ["bad", "localfs-1.0", {"path": str(bad)}])
    assert err["code"] == 1102 and "damaged" in err["message"]
    assert [r["repoId"] for r in daemon.call("listStorageRepositories")] == ["default"]


def test_disconnect_refuses_while_an_image_is_prepared(daemon: Daemon, tmp_path: Any) -> None:
    params = {"path": str(tmp_path / "r2")}
    daemon.call("formatStorageRepository", "localfs-1.0", params)
    daemon.call("connectStorageRepository", "r2", "localfs-1.0", params)
    d = daemon.call("createVirtualDisk", "r2", 64 * MiB)
    settle(daemon.call, "r2", d)
    daemon.call("prepareImage", "r2", d)
    assert error_of(daemon, "disconnectStorageRepository", ["r2"])["code"] == 1201
    daemon.call("teardownImage", "r2", d)
    daemon.call("disconnectStorageRepository", "r2")


def test_second_agent_cannot_use_a_connected_repository(daemon: Daemon, tmp_path: Any) -> None:
    other = Daemon(str(tmp_path / "other"))
    other.start()
    try:
        path = os.path.join(daemon.dir, "repos", "default")
        err = error_of(other, "connectStorageRepository",
                       ["shared", "localfs-1.0", {"path": path}])
        assert err["code"] == 1103
    finally:
        assert other.stop() == 0


def test_log_lines_carry_request_and_operation_ids(daemon: Daemon) -> None:
    d = daemon.call("createVirtualDisk", "default", 64 * MiB)
    settle(daemon.call, "default", d)
    lines = daemon.read_log().splitlines()
    intent = next(line for line in lines if "event=intent" in line and d in line)
    assert " req=" in intent and "level=INFO" in intent
    op_id = intent.split(" op=")[1].split()[0]
    done = next(line for line in lines if "event=op_done" in line and d in line)
    assert f" op={op_id} " in done
