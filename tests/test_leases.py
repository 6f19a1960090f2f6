"""The sanlock side of claims (agent/repo/leases.py, agent/repo/lockspace.py), against real sanlock
daemons: this test process's (host 1) and, for a second host, another daemon with a helper
process of its own (a lease belongs to the process that registered)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from agent import errors
from agent.repo import leases, lockspace
from tests import sanlockd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IO = 1


@pytest.fixture
def area(tmp_path: Any, sanlock_daemon: sanlockd.Daemon) -> tuple[str, str]:
    root = str(tmp_path / "repo")
    os.makedirs(root)
    repo_uuid = str(uuid.uuid4())
    leases.format_areas(root, repo_uuid, IO)
    return root, repo_uuid


def wait_state(m: lockspace.Membership, state: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = m.state()
        if s["state"] == state:
            return s
        assert time.monotonic() < deadline, f"lockspace still {s}, not {state}"
        time.sleep(0.1)


@pytest.fixture
def joined(area: tuple[str, str]) -> Iterator[lockspace.Membership]:
    root, repo_uuid = area
    lost: list[str] = []
    m = lockspace.Membership(leases.Lockspace(root, repo_uuid, 1, IO), lost.append)
    m.start()
    try:
        wait_state(m, "joined")
        yield m
    finally:
        m.stop()


def test_areas_are_written_once_and_never_again(area: tuple[str, str],
                                                 joined: lockspace.Membership) -> None:
    root, repo_uuid = area
    ids = leases.area_path(root, leases.LOCKSPACE_FILE)
    assert os.path.getsize(ids) == leases.AREA
    held = joined.space.acquire({leases.REPOSITORY_LEASE: leases.Mode.EXCLUSIVE}, "a test")
    path = leases.area_path(root, leases.REPOSITORY_LEASE)
    with open(path, "rb") as f:
        before = f.read()
    st = os.stat(path)
    # Formatting or making the lease again must not touch an area someone may hold.
    leases.format_areas(root, repo_uuid, IO)
    assert leases.write_lease(root, repo_uuid, leases.REPOSITORY_LEASE) is False
    with open(path, "rb") as f:
        assert f.read() == before
    assert os.stat(path).st_ino == st.st_ino
    assert held.valid()
    held.release()
    assert not [n for n in os.listdir(os.path.join(root, leases.LEASES)) if n.endswith(".tmp")]


def test_claims_before_joining_are_refused_and_reads_of_state_tell_why(
        area: tuple[str, str]) -> None:
    root, repo_uuid = area
    m = lockspace.Membership(leases.Lockspace(root, repo_uuid, 1, IO), lambda why: None)
    assert m.state()["state"] == "joining"
    with pytest.raises(errors.LockspaceNotJoined) as e:
        m.require_joined("a createVirtualDisk call")
    assert "still joining" in e.value.message
    m.start()
    try:
        s = wait_state(m, "joined")
        assert s["hostId"] == 1 and s["ioTimeout"] == IO
        m.require_joined("a createVirtualDisk call")
    finally:
        m.stop()


def test_leases_are_counted_per_host_and_released_with_the_last_owner(
        joined: lockspace.Membership) -> None:
    image = str(uuid.uuid4())
    a = joined.space.acquire({image: leases.Mode.SHARED}, "reader a")
    b = joined.space.acquire({image: leases.Mode.SHARED}, "reader b")
    assert a.valid() and b.valid()
    assert [o.host_id for o in joined.space.owners(image)] == [1]
    with pytest.raises(errors.ImageBusy):
        joined.space.acquire({image: leases.Mode.EXCLUSIVE}, "a writer")
    a.release()
    assert b.valid()
    assert joined.space.owners(image)
    b.release()
    assert joined.space.owners(image) == []
    # Now free for a writer; every acquire moves the version on (the journal's fencing token).
    v1 = joined.space.acquire({image: leases.Mode.EXCLUSIVE}, "writer 1")
    first = v1.versions()[image]
    v1.release()
    v2 = joined.space.acquire({image: leases.Mode.EXCLUSIVE}, "writer 2")
    assert v2.versions()[image] > first
    v2.release()


def test_a_lost_lockspace_invalidates_what_was_held(joined: lockspace.Membership) -> None:
    image = str(uuid.uuid4())
    held = joined.space.acquire({image: leases.Mode.EXCLUSIVE}, "an operation")
    assert held.valid()
    joined.space.drop()  # what a loss does: every registration closed
    assert not held.valid()
    # The daemon let the lease go with the registration.
    deadline = time.monotonic() + 5
    while joined.space.owners(image) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert joined.space.owners(image) == []


# Host 2 of these tests: its own process and sanlock daemon, joined, once it knows host 1 lives.
HOST2_JOIN = textwrap.dedent("""
    import json, os, sys, time
    from agent import errors
    from agent.repo import leases, lockspace
    root, repo_uuid, image = sys.argv[1:4]
    m = lockspace.Membership(leases.Lockspace(root, repo_uuid, 2, 1), lambda why: None)
    m.start()
    while m.state()["state"] != "joined":
        time.sleep(0.1)
    # Just joined, sanlock does not know yet whether the other hosts live ("unknown"): a
    # lease held then is refused too, never acquired blindly. Wait until it knows.
    deadline = time.monotonic() + 20
    while any(o.state == "unknown" for o in m.space.owners(image)) and time.monotonic() < deadline:
        time.sleep(0.2)
""")
HOST2_ACQUIRE = textwrap.dedent("""
    try:
        m.space.acquire({image: leases.Mode.EXCLUSIVE}, "host 2's call")
        print(json.dumps({"acquired": True}))
    except errors.Error as e:
        print(json.dumps({"error": e.name, "data": e.data, "message": e.message}))
    m.stop()
""")
HOST2 = HOST2_JOIN + HOST2_ACQUIRE


def test_another_host_gets_lease_held_naming_the_holder(
        tmp_path: Any, area: tuple[str, str], joined: lockspace.Membership) -> None:
    root, repo_uuid = area
    image = str(uuid.uuid4())
    held = joined.space.acquire({image: leases.Mode.EXCLUSIVE}, "host 1's operation")
    with sanlockd.running(str(tmp_path / "host2"), "host2") as d2:
        r = subprocess.run([sys.executable, "-c", HOST2, root, repo_uuid, image],
                           env={**os.environ, **d2.env, "PYTHONPATH": ROOT},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.splitlines()[-1])
        assert out["error"] == "LeaseHeld", out
        assert out["data"]["hostId"] == 1 and out["data"]["hostState"] == "live"
        assert "held by host 1" in out["message"]
        held.release()
        r = subprocess.run([sys.executable, "-c", HOST2, root, repo_uuid, image],
                           env={**os.environ, **d2.env, "PYTHONPATH": ROOT},
                           capture_output=True, text=True, timeout=60)
        assert json.loads(r.stdout.splitlines()[-1]) == {"acquired": True}, r.stderr


HOST2_FREED = HOST2_JOIN + textwrap.dedent("""
    looking, released = sys.argv[4:6]
    # The timing of the race, made certain: the look before the claim is skipped (so sanlock
    # itself refuses), and host 1 lets the lease go after that refusal, before host 2 looks
    # at who holds it.
    m.space._refuse_if_held = lambda resource, what: None
    real_owners = m.space.owners
    def owners(resource):
        if not os.path.exists(looking):
            open(looking, "w").close()
            while not os.path.exists(released):
                time.sleep(0.05)
        return real_owners(resource)
    m.space.owners = owners
""") + HOST2_ACQUIRE


def test_a_lease_let_go_between_a_refusal_and_the_look_is_taken_on_a_second_try(
        tmp_path: Any, area: tuple[str, str], joined: lockspace.Membership) -> None:
    """Regression (CI, 2026-12-01): the loser of a race said LeaseHeld naming host 0, because
    the winner had let the lease go by the time the loser read its owners."""
    root, repo_uuid = area
    image = str(uuid.uuid4())
    looking, released = str(tmp_path / "looking"), str(tmp_path / "released")
    held = joined.space.acquire({image: leases.Mode.EXCLUSIVE}, "host 1's operation")
    with sanlockd.running(str(tmp_path / "host2"), "host2") as d2:
        p = subprocess.Popen([sys.executable, "-c", HOST2_FREED, root, repo_uuid, image,
                              looking, released],
                             env={**os.environ, **d2.env, "PYTHONPATH": ROOT},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 40
            while not os.path.exists(looking):
                assert p.poll() is None and time.monotonic() < deadline, p.stderr
                time.sleep(0.05)
            held.release()
            open(released, "w").close()
            out, err = p.communicate(timeout=40)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, err
        assert json.loads(out.splitlines()[-1]) == {"acquired": True}, (out, err)
