"""Hostile and careless clients against the real daemon, on its Unix socket and on TLS TCP.

A client that sends nothing, or one byte at a time, or too much, or odd JSON, gets cut or a clear
error, and never stalls the others or breaks an answer. The agent runs with small deadlines
(seconds) so the whole file takes well under a minute.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rpc import transport
from tests import process, test_tcp_e2e
from tests.conftest import ROOT, settle
from tests.test_rpc_e2e import snapshot_tree

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.path.exists("/usr/bin/openssl"), reason="openssl is not installed"),
]

MiB = 1 << 20
HANDSHAKE, HEADER, BODY, IDLE = 1, 2, 2, 3
MAX_CONNECTIONS = 8


class Agent:
    """strata-agent with TLS on 127.0.0.1 and small limits; a repository 'default'."""

    def __init__(self, tmp: str) -> None:
        self.dir = tmp
        self.socket = os.path.join(tmp, "agent.sock")
        self.log = os.path.join(tmp, "agent.log")
        self.certs = test_tcp_e2e.make_certs(tmp)
        self.port = test_tcp_e2e.free_port()
        conf = os.path.join(tmp, "agent.conf")
        with open(conf, "w") as f:
            f.write(
                f"[rpc]\nsocket = {self.socket}\n"
                f"tcp_address = 127.0.0.1\ntcp_port = {self.port}\n"
                f"tls_cert = {self.certs['server.pem']}\ntls_key = {self.certs['server.key']}\n"
                f"tls_ca = {self.certs['ca.pem']}\n"
                f"handshake_timeout = {HANDSHAKE}\nheader_timeout = {HEADER}\n"
                f"body_timeout = {BODY}\nidle_timeout = {IDLE}\n"
                f"max_connections = {MAX_CONNECTIONS}\nmax_response_bytes = {MiB}\n"
                f"[agent]\nstate_dir = {tmp}/state\n[log]\nlevel = DEBUG\n"
            )
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "rpc.main", "--config", conf],
                                         env={**os.environ, "PYTHONPATH": ROOT},
                                         stdout=out, stderr=out)
        proc = self.proc
        if not transport.wait_for_socket(self.socket, 20, lambda: proc.poll() is None):
            proc.kill()
            raise AssertionError(f"agent did not listen: {self.read_log()}")
        params = {"path": os.path.join(tmp, "repo")}
        self.call("formatStorageRepository", "localfs-1.0", params)
        self.call("connectStorageRepository", "default", "localfs-1.0", params)
        self.root = params["path"]

    def read_log(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def client(self, timeout: float = 10.0) -> transport.Client:
        return transport.Client(socket_path=self.socket, timeout=timeout)

    def tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.certs["ca.pem"])
        ctx.load_cert_chain(self.certs["client.pem"], self.certs["client.key"])
        return ctx

    def tls_client(self, timeout: float = 10.0) -> transport.Client:
        return transport.Client(address=("127.0.0.1", self.port), tls=self.tls(),
                                timeout=timeout)

    def call(self, method: str, *args: Any) -> Any:
        c = self.client()
        try:
            return c.call(method, *args)
        finally:
            c.close()

    def stop(self) -> None:
        process.terminate(self.proc)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(str(tmp_path_factory.mktemp("hostile")))
    try:
        yield a
    finally:
        a.stop()
    assert a.proc.returncode == 0, a.read_log()[-4000:]
    # Nothing a client did made the agent print a traceback (pywsgi and the hub print theirs).
    assert "Traceback" not in a.read_log(), a.read_log()[-4000:]


def strict(data: bytes) -> Any:
    """Parse as a strict JSON parser would: UTF-8, no NaN or Infinity, no lone surrogate."""
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    value = json.loads(data.decode("utf-8"), parse_constant=refuse)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")  # a lone surrogate (from a \\ud800 escape) fails here
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


def post(a: Agent, body: bytes | str) -> tuple[int, Any]:
    c = a.client(timeout=30)
    try:
        status, data = c.post(body.encode() if isinstance(body, str) else body)
    finally:
        c.close()
    return status, strict(data) if data else None


def unix_raw() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the agent closes ``s`` (reading and dropping what it sends), or None."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        ready, _, _ = select.select([s], [], [], 0.1)
        if ready:
            try:
                if not s.recv(65536):
                    return time.monotonic() - start
            except OSError:
                return time.monotonic() - start
    return None


def test_an_idle_tls_connection_stalls_nobody_and_is_cut(agent: Agent) -> None:
    silent = socket.create_connection(("127.0.0.1", agent.port))
    try:
        time.sleep(0.2)  # the agent has accepted it and waits for its handshake
        c = agent.client(timeout=5)
        try:
            for _ in range(20):
                assert c.call("getHostInfo")["hostID"] == 1
        finally:
            c.close()
        t = agent.tls_client(timeout=5)
        try:
            assert t.call("getHostInfo")["hostID"] == 1
        finally:
            t.close()
        # Cut once the handshake deadline passes, not held forever.
        assert closed_within(silent, HANDSHAKE + 3) is not None
    finally:
        silent.close()
    assert "phase=handshake" in agent.read_log()


def test_a_tls_client_that_stops_after_the_handshake_is_cut(agent: Agent) -> None:
    raw = socket.create_connection(("127.0.0.1", agent.port))
    conn = agent.tls().wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        conn.sendall(b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\n")  # and no more
        assert agent.call("getHostInfo")["hostID"] == 1
        assert closed_within(conn, HEADER + 3) is not None
    finally:
        conn.close()


def test_an_idle_keep_alive_connection_is_closed(agent: Agent) -> None:
    for make in (agent.client, agent.tls_client):
        c = make()
        try:
            assert c.call("getHostInfo")["hostID"] == 1
            sock = c._conn.sock
            assert sock is not None
            elapsed = closed_within(sock, IDLE + 4)
            assert elapsed is not None and elapsed > IDLE - 1, elapsed
            # The client's next call goes through on a fresh connection.
            assert c.call("getHostInfo")["hostID"] == 1
        finally:
            c.close()


def test_headers_sent_byte_by_byte_are_cut_while_others_are_served(agent: Agent) -> None:
    head = (b"POST /jsonrpc HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"y" * 20) for i in range(20)))
    slow = unix_raw()
    slow.connect(agent.socket)
    other = agent.client(timeout=5)
    started = time.monotonic()
    cut_after = None
    served = 0
    try:
        for byte in head:  # ~700 bytes at 10 a second: 70 s if nobody cut it
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                cut_after = time.monotonic() - started
                break
            if closed_within(slow, 0.1) is not None:
                cut_after = time.monotonic() - started
                break
            if served < 10:
                assert other.call("getHostInfo")["hostID"] == 1
                served += 1
            if time.monotonic() - started > HEADER + 5:
                break
    finally:
        slow.close()
        other.close()
    assert served == 10
    assert cut_after is not None and HEADER - 0.5 < cut_after < HEADER + 3, cut_after
    assert "phase=header" in agent.read_log()


def test_a_body_sent_slowly_gets_408_and_is_cut(agent: Agent) -> None:
    body = json.dumps({"jsonrpc": "2.0", "method": "getHostInfo", "id": 1}).encode()
    body += b" " * 200
    s = unix_raw()
    s.connect(agent.socket)
    started = time.monotonic()
    try:
        s.sendall(b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        answer = b""
        for byte in body:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            ready, _, _ = select.select([s], [], [], 0.1)
            if ready:
                answer = s.recv(65536)
                break
            if time.monotonic() - started > BODY + 5:
                break
        elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert BODY - 0.5 < elapsed < BODY + 3, elapsed
        # The rest of the answer, then the agent closes (pywsgi sends head and body apart).
        s.settimeout(5)
        while chunk := s.recv(65536):
            answer += chunk
        error = strict(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == -32600 and "did not arrive" in error["message"]
    finally:
        s.close()
    assert agent.call("getHostInfo")["hostID"] == 1


def test_connections_past_the_cap_are_refused_clearly_then_served_again(agent: Agent) -> None:
    for make in (agent.client, agent.tls_client):
        held = [make() for _ in range(MAX_CONNECTIONS)]
        try:
            for c in held:
                assert c.call("getHostInfo")["hostID"] == 1  # each holds an open connection
            extra = make(timeout=5)
            try:
                status, data = extra.post(b'{"jsonrpc": "2.0", "method": "getHostInfo", "id": 1}')
            finally:
                extra.close()
            assert status == 503, (status, data)
            error = strict(data)["error"]
            assert error["code"] == -32000 and "max_connections" in error["message"]
            # The ones inside are still served.
            assert held[0].call("getHostInfo")["hostID"] == 1
        finally:
            for c in held[1:]:
                c.close()
        # Served again once the agent has seen the closes (at once, but allow a loaded machine).
        deadline = time.monotonic() + 10
        while True:
            again = make(timeout=5)
            try:
                assert again.call("getHostInfo")["hostID"] == 1
                break
            except transport.RemoteError as e:
                assert e.code == -32000 and time.monotonic() < deadline, e
                time.sleep(0.1)
            finally:
                again.close()
        assert held[0].call("getHostInfo")["hostID"] == 1
        held[0].close()
    assert "event=connections_refused" in agent.read_log()


def test_batch_bombs_are_bounded(agent: Agent) -> None:
    call = {"jsonrpc": "2.0", "method": "getHostInfo"}
    status, answer = post(agent, json.dumps([{**call, "id": i} for i in range(100)]))
    assert status == 200 and len(answer) == 100 and all("result" in a for a in answer)

    status, answer = post(agent, json.dumps([{**call, "id": i} for i in range(101)]))
    assert status == 200 and isinstance(answer, dict), answer
    assert answer["error"]["code"] == -32600 and answer["id"] is None
    assert "100" in answer["error"]["message"] and "max_batch" in answer["error"]["message"]

    # A 1 MiB body of rpc.discover calls (an 861 MiB answer once): one short error.
    one = b'{"jsonrpc":"2.0","method":"rpc.discover","id":1},'
    bomb = b"[" + one * ((MiB - 2) // len(one) - 1) + one[:-1] + b"]"
    assert len(bomb) <= MiB
    c = agent.client(timeout=30)
    try:
        status, data = c.post(bomb)
    finally:
        c.close()
    assert status == 200 and len(data) < 1000, len(data)
    assert strict(data)["error"]["code"] == -32600


def test_answers_are_bounded_in_bytes(agent: Agent) -> None:
    # 100 rpc.discover answers would be ~4 MiB; the agent's answers may take 1 MiB.
    images = agent.call("listImages", "default", {"includeIncomplete": True})
    discover = [{"jsonrpc": "2.0", "method": "rpc.discover", "id": i} for i in range(99)]
    create = {"jsonrpc": "2.0", "method": "createVirtualDisk", "params": ["default", 64 * MiB],
              "id": "create"}
    c = agent.client(timeout=30)
    try:
        status, data = c.post(json.dumps(discover + [create]).encode())
    finally:
        c.close()
    assert status == 200 and MiB // 2 < len(data) < MiB + 100 * 400, len(data)
    answer = strict(data)
    assert [a["id"] for a in answer] == list(range(99)) + ["create"]
    results = [a for a in answer if "result" in a]
    errors = [a for a in answer if "error" in a]
    assert answer[:len(results)] == results and 10 < len(results) < 30, len(results)
    assert all(r["result"]["methods"] for r in results)
    crossing = errors[0]["error"]
    assert crossing["code"] == -32001 and "was carried out" in crossing["message"], crossing
    assert all(e["error"]["code"] == -32001 and "not carried out" in e["error"]["message"]
               for e in errors[1:])
    # The create after the limit was not carried out.
    assert agent.call("listImages", "default", {"includeIncomplete": True}) == images

    # One answer over the limit: listImages of disks with large userData. Below the limit the
    # same (large, encoded on a thread in pieces) answer is exact.
    pad = {"pad": "z" * 60_000, "n": [1.5, -2, None, True, "\u00e9\U0001f600"]}
    disks = [r["imageId"] for r in images]
    for i in range(10):
        d = agent.call("createVirtualDisk", "default", 64 * MiB, None, {**pad, "i": i})
        settle(agent.call, "default", d)
        disks.append(d)
    rows = agent.call("listImages", "default")
    assert sorted(r["imageId"] for r in rows) == sorted(disks)
    assert all(r["userData"] == {**pad, "i": r["userData"]["i"]} for r in rows if r["userData"])
    for i in range(10, 20):
        d = agent.call("createVirtualDisk", "default", 64 * MiB, None, {**pad, "i": i})
        settle(agent.call, "default", d)
    status, answer = post(agent, json.dumps({"jsonrpc": "2.0", "method": "listImages",
                                             "params": ["default"], "id": 5}))
    assert status == 200 and answer["id"] == 5 and answer["error"]["code"] == -32001
    assert "max_response_bytes" in answer["error"]["message"]


ODD_IDS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E999"]
ODD_METHODS: list[Any] = [
    {}, {"a": 1}, {"nested": {"deeper": [1, {"x": None}]}}, [], ["getHostInfo"],
    [[["getHostInfo"]]], 7, 1.5, None, True, "getHostInfo\u0000", "\ud800", "get\udfffHostInfo",
]


def test_odd_ids_and_methods_get_invalid_request_and_never_break_a_batch(agent: Agent) -> None:
    for odd in ODD_IDS:
        body = '{"jsonrpc": "2.0", "method": "getHostInfo", "id": ' + odd + "}"
        status, answer = post(agent, body)
        assert status == 200, (odd, status)
        assert answer["error"]["code"] == -32600 and answer["id"] is None, (odd, answer)
        assert "finite" in answer["error"]["message"], answer
    for method in ODD_METHODS:
        status, answer = post(agent, json.dumps({"jsonrpc": "2.0", "method": method, "id": 3}))
        assert status == 200, (method, status)
        assert answer["error"]["code"] == -32600 and answer["id"] is None, (method, answer)
    for rid in ({"a": 1}, [1], True, "\ud800x"):
        status, answer = post(agent, json.dumps({"jsonrpc": "2.0", "method": "getHostInfo",
                                                 "id": rid}))
        assert answer["error"]["code"] == -32600 and answer["id"] is None, (rid, answer)

    # In one batch, every request gets its own answer.
    parts = ['{"jsonrpc": "2.0", "method": "getHostInfo", "id": "first"}']
    parts += ['{"jsonrpc": "2.0", "method": "getHostInfo", "id": ' + odd + "}" for odd in ODD_IDS]
    parts += [json.dumps({"jsonrpc": "2.0", "method": m, "id": 1}) for m in ODD_METHODS]
    parts += ['{"jsonrpc": "2.0", "method": "getHostInfo", "id": "last"}']
    status, answer = post(agent, "[" + ", ".join(parts) + "]")
    assert status == 200 and len(answer) == len(parts)
    assert answer[0]["id"] == "first" and answer[0]["result"]["hostID"] == 1
    assert answer[-1]["id"] == "last" and answer[-1]["result"]["hostID"] == 1
    assert all(a["error"]["code"] == -32600 and a["id"] is None for a in answer[1:-1])


def test_nul_bytes_lone_surrogates_and_nan_in_params_are_refused(agent: Agent) -> None:
    disk = agent.call("createVirtualDisk", "default", 64 * MiB)
    settle(agent.call, "default", disk)
    # settle() can return between the create's last two steps (seen on a loaded machine):
    # wait for its journal to go, or the comparison below would see the seal, not a change.
    journal = os.path.join(agent.root, "journal")
    deadline = time.monotonic() + 30
    while os.listdir(journal):
        assert time.monotonic() < deadline, os.listdir(journal)
        time.sleep(0.05)
    before = snapshot_tree(agent.root)
    cases: list[tuple[str, str, str]] = [
        ("createVirtualDisk", json.dumps({"targetRepoId": "default", "size": 64 * MiB,
                                          "userData": {"k": "a\u0000b"}}), "'userData'['k']"),
        ("createVirtualDisk", json.dumps({"targetRepoId": "default", "size": 64 * MiB,
                                          "userData": {"k": ["ok", "\ud800"]}}),
         "'userData'['k'][1]"),
        ("createVirtualDisk", json.dumps({"targetRepoId": "default", "size": 64 * MiB,
                                          "userData": {"\udc00": 1}}), "'userData'"),
        ("createVirtualDisk", '{"targetRepoId": "default", "size": 67108864, '
                              '"userData": {"k": NaN}}', "'userData'['k']"),
        ("createVirtualDisk", '{"targetRepoId": "default", "size": 67108864, '
                              '"userData": {"k": 1e400}}', "'userData'['k']"),
        ("createVirtualDisk", json.dumps(["def\u0000ault", 64 * MiB]), "'targetRepoId'"),
        ("setImageUserData", json.dumps(["default", disk, {"x": "\ud83d"}]), "'userData'"),
        ("connectStorageRepository",
         json.dumps(["other", "localfs-1.0", {"path": agent.root + "\u0000/x"}]),
         "'connectionParameters'"),
        ("getImageStatus", json.dumps(["default\udfff", disk]), "'repositoryId'"),
    ]
    for method, params, needle in cases:
        body = f'{{"jsonrpc": "2.0", "method": "{method}", "params": {params}, "id": 1}}'
        status, answer = post(agent, body)
        assert status == 200 and answer["id"] == 1, (method, params, answer)
        assert answer["error"]["code"] == -32602, (method, params, answer)
        assert needle in answer["error"]["message"], (method, params, answer)
    assert snapshot_tree(agent.root) == before
    info = agent.call("getImageInfo", "default", disk)
    assert info["userData"] == {}
    assert {r["repoId"] for r in agent.call("listStorageRepositories")} == {"default"}
    # A method name with them is no method at all.
    status, answer = post(agent, '{"jsonrpc": "2.0", "method": "getHostInfo\\u0000", "id": 2}')
    assert answer["error"]["code"] in (-32600, -32601) and "result" not in answer


def test_answers_encoded_in_pieces_are_the_same_bytes() -> None:
    # In-process: the thread's piecewise encoding gives exactly what one json.dumps gives, and
    # stops at the limit instead of building the rest.
    from rpc import apidoc, encoding

    rows = [{"imageId": str(i), "userData": {"pad": "p" * 3000, "x": [1.5, None, "\u00e9"]},
             7: True} for i in range(400)]
    for obj in ([apidoc.document()] * 5, {"result": rows, "id": 1}, rows, "s" * 100_000, []):
        expected = encoding.encode(obj)
        chunks = encoding.in_pieces(obj, len(expected))
        assert chunks is not None and b"".join(chunks) == expected
        assert len(chunks) > 1 or len(expected) < 2 * encoding.PIECE_BYTES
        assert encoding.in_pieces(obj, len(expected) - 1) is None
    for bad in ([{"a": float("nan")}] * 3000, [{"b": "\ud800" * 100}] * 3000):
        with pytest.raises(ValueError):
            encoding.in_pieces(bad, 1 << 30)
