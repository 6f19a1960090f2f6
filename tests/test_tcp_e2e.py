"""TCP: TLS with client-certificate verification, and plain TCP only on loopback when asked."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from typing import Any

import pytest

from rpc import transport
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_certs(d: str) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with openssl."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext + "\n" if ext else "basicConstraints=CA:FALSE\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return {n: os.path.join(d, n) for n in os.listdir(d)}


def start(tmp: str, rpc_section: str) -> tuple[subprocess.Popen[bytes], str]:
    sock = os.path.join(tmp, "agent.sock")
    conf = os.path.join(tmp, "agent.conf")
    with open(conf, "w") as f:
        f.write(f"[rpc]\nsocket = {sock}\n{rpc_section}\n[agent]\nstate_dir = {tmp}/state\n")
    proc = subprocess.Popen([sys.executable, "-m", "rpc.main", "--config", conf],
                            env={**os.environ, "PYTHONPATH": ROOT},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, sock


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    assert proc.wait(30) == 0


# openssl makes the test CA and certificates; Debian installs it by default, and a machine
# without it cannot run this test, only skip it.
@pytest.mark.skipif(not os.path.exists("/usr/bin/openssl"), reason="openssl is not installed")
def test_tls_requires_a_client_certificate(tmp_path: Any) -> None:
    certs = make_certs(str(tmp_path))
    port = free_port()
    proc, _ = start(str(tmp_path), f"tcp_address = 127.0.0.1\ntcp_port = {port}\n"
                    f"tls_cert = {certs['server.pem']}\ntls_key = {certs['server.key']}\n"
                    f"tls_ca = {certs['ca.pem']}\n")
    try:
        ctx = ssl.create_default_context(cafile=certs["ca.pem"])
        ctx.load_cert_chain(certs["client.pem"], certs["client.key"])
        c = transport.Client(address=("127.0.0.1", port), tls=ctx)
        assert c.call("getHostInfo")["hostID"] == 1
        c.close()

        anonymous = ssl.create_default_context(cafile=certs["ca.pem"])
        c = transport.Client(address=("127.0.0.1", port), tls=anonymous)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            c.call("getHostInfo")
        c.close()
    finally:
        stop(proc)


def test_plain_tcp_only_when_asked_and_on_loopback(tmp_path: Any) -> None:
    port = free_port()
    proc, _ = start(str(tmp_path), f"tcp_address = 127.0.0.1\ntcp_port = {port}\n"
                    "plain_tcp = true\n")
    try:
        c = transport.Client(address=("127.0.0.1", port))
        assert c.call("getHostInfo")["hostID"] == 1
        c.close()
    finally:
        stop(proc)
    bad = tmp_path / "bad"
    bad.mkdir()
    conf = bad / "agent.conf"
    conf.write_text(f"[rpc]\nsocket = {bad}/s\ntcp_address = 0.0.0.0\nplain_tcp = true\n")
    r = subprocess.run([sys.executable, "-m", "rpc.main", "--config", str(conf)],
                       env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "loopback" in r.stderr
    assert "Traceback" not in r.stderr
