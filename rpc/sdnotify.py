"""systemd's readiness protocol (sd_notify(3)) without libsystemd: a datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``); False when not under systemd or when sending failed."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        # An abstract socket: the name starts with a NUL byte instead of "@".
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        # Unset, or a kind we do not speak (systemd 253+ also offers vsock:CID:PORT for VMs).
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as e:
        # Failing to notify must not kill the agent; systemd will report the start timeout.
        log.warning("sd_notify failed state=%r socket=%r error=%r", state, address, str(e))
        return False
    return True
