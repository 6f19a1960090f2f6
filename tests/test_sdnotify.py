from __future__ import annotations

import logging
import os
import pathlib
import socket
from collections.abc import Iterator

import pytest

from rpc import sdnotify


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    with sock:
        yield sock


def test_ready(
    tmp_path: pathlib.Path, receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert sdnotify.notify("READY=1") is True
    assert receiver.recv(4096) == b"READY=1"
    assert sdnotify.notify("STOPPING=1") is True
    assert receiver.recv(4096) == b"STOPPING=1"


def test_abstract_socket(receiver: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"strata-test-notify-{os.getpid()}-{id(receiver)}"
    receiver.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert sdnotify.notify("READY=1\nSTATUS=listening") is True
    assert receiver.recv(4096) == b"READY=1\nSTATUS=listening"


def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


def test_unsupported_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


def test_missing_socket_logs_and_returns_false(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, logger="rpc.sdnotify"):
        assert sdnotify.notify("READY=1") is False
    assert "sd_notify failed state='READY=1'" in caplog.text
