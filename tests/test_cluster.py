"""The multi-host harness itself, real everywhere: a GlusterFS volume (glusterd and its brick in a
private namespace), simulated hosts each with its own namespace, FUSE mount, sanlock daemon and
agent; and ``python -m tests.cluster up/down``."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from rpc import transport
from tests import cluster, conftest, gluster, namespace

pytestmark = [pytest.mark.root, pytest.mark.cluster, pytest.mark.xdist_group("cluster")]


@pytest.fixture(autouse=True)
def _needs_gluster() -> None:
    reason = gluster.missing()
    if reason:
        pytest.skip(reason)


def _tree(paths: tuple[str, ...]) -> list[str]:
    out = []
    for top in paths:
        for d, dirs, files in os.walk(top):
            out += [os.path.join(d, n) for n in dirs + files]
    return sorted(out)


def _mounts_anywhere(needle: str) -> list[str]:
    """Mount table lines naming ``needle`` in any process's namespace on the machine."""
    hits = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/mounts") as f:
                hits.update(line for line in f if needle in line)
        except OSError:
            continue
    return sorted(hits)


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def test_volume_comes_up_and_goes_down_leaving_no_process_mount_or_loop(tmp_path: Any) -> None:
    before = set(_tree(gluster.SYSTEM_DIRS))
    v = gluster.Volume(str(tmp_path / "g"), size_gib=2)
    v.start()
    try:
        servers = v.processes()
        assert v.ns is not None
        holder = v.ns.holder
        names = sorted(_read(f"/proc/{p}/comm").strip() for p in servers)
        assert names == ["glusterd", "glusterfsd"], names
        assert "Status: Started" in v.cli("volume", "info", v.name)
        info = v.cli("volume", "get", v.name, "all")
        for key, value in gluster.COHERENT_OPTIONS.items():
            assert any(line.split() == [key, value] for line in info.splitlines()), key
        assert _mounts_anywhere(v.brick_mount), "the brick is mounted in the volume's namespace"
        # ... and there alone: not here, not in a namespace made after it. (Only what is the
        # volume's: other tests, on other workers, mount and unmount here meanwhile.)
        assert v.dir not in _read("/proc/self/mounts")
        later = namespace.Namespace()
        try:
            assert v.brick_mount not in _read(f"/proc/{later.holder}/mounts")
        finally:
            later.close()
    finally:
        v.stop()
    for pid in [*servers, holder]:
        assert not namespace.alive(pid, None), pid
    assert not _mounts_anywhere(v.brick_mount)
    assert subprocess.run(["losetup", "-j", v.image], capture_output=True, text=True,
                          check=True).stdout == ""
    # What glusterd and its CLI write into the system's directories went to private ones (the
    # brick's socket, the CLI's geo-replication template) ...
    private = _tree((os.path.join(v.dir, "sys"),))
    assert any(p.endswith(".socket") for p in private), private
    assert any(p.endswith("gsyncd_template.conf") for p in private), private
    # ... and nothing of ours into the system's own (another glusterd may write there meanwhile).
    for path in set(_tree(gluster.SYSTEM_DIRS)) - before:
        assert str(tmp_path) not in path
        if os.path.isfile(path):
            assert str(tmp_path) not in _read(path), path
    v.stop()  # twice is harmless


def test_rename_over_on_one_host_is_read_at_once_on_another(cluster_hosts: Any) -> None:
    h1, h2 = cluster_hosts(2, agents=False, mount=True)
    assert h1.fuse_mounts() == [h1.mountpoint] and h2.fuse_mounts() == [h2.mountpoint]
    rnd = random.Random(10)
    record1 = h1.path(os.path.join(h1.mountpoint, "record"))
    record2 = h2.path(os.path.join(h2.mountpoint, "record"))
    for i in range(100):
        body = f"version {i} {rnd.random()}\n".encode() * rnd.randint(1, 300)
        tmp = record1 + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, record1)
        with open(record2, "rb") as f:
            assert f.read() == body, f"host2 read a stale record at try {i}"
        if i % 10 == 0:  # and the other way round
            with open(record2 + ".tmp", "wb") as f:
                f.write(body[::-1])
                f.flush()
                os.fsync(f.fileno())
            os.rename(record2 + ".tmp", record2)
            with open(record1, "rb") as f:
                assert f.read() == body[::-1]


ACQUIRE = textwrap.dedent("""
    import sanlock, sys
    lockspace, resource, leases, hold = sys.argv[1:5]
    fd = sanlock.register()
    try:
        sanlock.acquire(lockspace.encode(), resource.encode(), [(leases, 0)], slkfd=fd)
    except sanlock.SanlockException as e:
        print(e.errno, flush=True)
        sys.exit(0)
    print("acquired", flush=True)
    if hold == "hold":
        sys.stdin.read()  # the lease is ours until the test closes our stdin
""")


def test_two_hosts_share_a_lockspace_and_one_holds_a_lease_the_other_cannot_take(
        cluster_hosts: Any) -> None:
    h1, h2 = cluster_hosts(2, agents=False, mount=True)
    ids = os.path.join(h1.mountpoint, "ids")
    leases1 = os.path.join(h1.mountpoint, "leases")
    for name in ("ids", "leases"):
        with open(h1.path(os.path.join(h1.mountpoint, name)), "wb") as f:
            f.truncate(1 << 20)
    h1.run([cluster.SYSTEM_PYTHON, "-c",
            "import sanlock, sys; sanlock.write_lockspace(b'ls', sys.argv[1], iotimeout=1); "
            "sanlock.write_resource(b'ls', b'r1', [(sys.argv[2], 0)])", ids, leases1])
    # Both join at once (each takes 2 io_timeouts + 1 s), each through its own mount.
    joins = [h.popen([cluster.SYSTEM_PYTHON, "-c",
                      "import sanlock, sys; "
                      "sanlock.add_lockspace(b'ls', int(sys.argv[1]), sys.argv[2], iotimeout=1)",
                      str(h.id), os.path.join(h.mountpoint, "ids")],
                     stderr=subprocess.PIPE) for h in (h1, h2)]
    for j in joins:
        _, err = j.communicate(timeout=60)
        assert j.returncode == 0, err
    holder = h1.popen([cluster.SYSTEM_PYTHON, "-c", ACQUIRE, "ls", "r1", leases1, "hold"],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "acquired"
        leases2 = os.path.join(h2.mountpoint, "leases")
        r = h2.run([cluster.SYSTEM_PYTHON, "-c", ACQUIRE, "ls", "r1", leases2, "once"])
        assert r.stdout.strip() == "-243", r  # SANLK_ACQUIRE_IDLIVE: held by a live host
        holder.stdin.close()
        assert holder.wait(30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    # The holder's end freed the lease (its daemon lives on): host2 takes it now.
    deadline = time.monotonic() + 10
    while (r := h2.run([cluster.SYSTEM_PYTHON, "-c", ACQUIRE, "ls", "r1", leases2, "once"])
           ).stdout.strip() != "acquired":
        assert time.monotonic() < deadline, r
        time.sleep(0.2)


def test_a_host_whose_fuse_client_is_killed_fails_its_mount_while_another_carries_on(
        cluster_hosts: Any) -> None:
    h1, h2 = cluster_hosts(2, agents=False, mount=True)
    with open(h1.path(os.path.join(h1.mountpoint, "before")), "w") as f:
        f.write("shared")
    killed = h1.cut_storage()
    assert len(killed) == 1
    deadline = time.monotonic() + 10
    while namespace.alive(killed[0], None):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(OSError) as e:
        os.stat(h1.path(os.path.join(h1.mountpoint, "before")))
    # The kernel aborts the FUSE connection when its daemon dies: the first call in flight gets
    # ECONNABORTED, later ones ENOTCONN.
    assert e.value.errno in (errno.ECONNABORTED, errno.ENOTCONN, errno.EIO), e.value
    with pytest.raises(OSError) as e:
        os.stat(h1.path(os.path.join(h1.mountpoint, "before")))
    assert e.value.errno in (errno.ENOTCONN, errno.EIO), e.value
    with pytest.raises(OSError), open(h1.path(os.path.join(h1.mountpoint, "after-cut")),
                                      "w") as f:
        f.write("lost")
    # The other host reads and writes on.
    with open(h2.path(os.path.join(h2.mountpoint, "before"))) as f:
        assert f.read() == "shared"
    with open(h2.path(os.path.join(h2.mountpoint, "after")), "w") as f:
        f.write("still here")
    assert sorted(os.listdir(h2.path(h2.mountpoint))) == ["after", "before"]


def test_host_actions_freeze_thaw_kill_and_restart_reach_everything_the_host_runs(
        cluster_hosts: Any) -> None:
    h1, h2 = cluster_hosts(2, agents=True, mount=True)
    assert h1.call("listStorageRepositories") == [] and h2.call("listStorageRepositories") == []
    assert h1.sanlock is not None
    host1 = {h1.agent_pid, h1.sanlock.pid, *gluster.fuse_clients(h1.ns)}
    # A child of the agent (as its qemu-img would be) is the host's too.
    child = subprocess.Popen(h1.command(["sleep", "300"]))
    # nsenter enters the namespace, then execs: until then the child is not the host's yet.
    deadline = time.monotonic() + 10
    while child.pid not in h1.ns.pids():
        assert time.monotonic() < deadline, "the child never entered the host's namespace"
        time.sleep(0.01)
    try:
        frozen = set(h1.freeze())
        assert host1 | {child.pid} <= frozen
        assert {namespace.state(p) for p in frozen} == {"T"}
        c = transport.Client(socket_path=h1.socket, timeout=1)
        with pytest.raises(TimeoutError):
            c.call("listStorageRepositories")
        c.close()
        assert h2.call("listStorageRepositories") == []  # the other host answers
        h1.thaw()
        assert "T" not in {namespace.state(p) for p in frozen}
        assert h1.call("listStorageRepositories") == []

        h1.kill()
        for pid in host1 | {child.pid}:
            child.poll()
            assert not namespace.alive(pid, None), pid
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with pytest.raises(OSError):
        h1.call("listStorageRepositories")
    assert h2.call("listStorageRepositories") == []
    with open(h2.path(os.path.join(h2.mountpoint, "while-host1-was-down")), "w") as f:
        f.write("x")

    h1.config_extra = {"agent": {"resume_on_start": "false"}}
    h1.restart()
    assert h1.call("listStorageRepositories") == []
    assert "while-host1-was-down" in os.listdir(h1.path(h1.mountpoint))
    # The agent runs with the host's own configuration.
    shown = subprocess.run([sys.executable, "-m", "rpc.main", "--config", h1.config,
                            "--show-config"], capture_output=True, text=True, check=True,
                           env=h1.env, cwd=conftest.ROOT).stdout.splitlines()
    assert {"id = 1", f"socket = {h1.socket}", "resume_on_start = false"} <= set(shown), shown


def test_cluster_command_up_prints_each_socket_and_down_stops_everything(
        gluster_volume: gluster.Volume, tmp_path: Any) -> None:
    """Beside another volume (the module's): the command's glusterd takes the next address."""
    d = str(tmp_path / "c")
    env = {**os.environ, "PYTHONPATH": conftest.ROOT}
    up = subprocess.run([sys.executable, "-m", "tests.cluster", "up", "--hosts", "2", "--dir", d,
                         "--no-repository"], capture_output=True, text=True, env=env,
                        timeout=120, check=False)
    assert up.returncode == 0, up.stderr
    try:
        with open(os.path.join(d, cluster.STATE_FILE)) as f:
            state = json.load(f)
        assert state["volume"]["server"] != gluster_volume.server
        for i in (1, 2):
            sock = os.path.join(d, f"host{i}", "agent.sock")
            assert f"strata-client --socket {sock}" in up.stdout
            r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "strata-client"),
                                "--socket", sock, "--json", "listStorageRepositories"],
                               capture_output=True, text=True, check=False)
            assert r.returncode == 0 and json.loads(r.stdout) == [], r
        again = subprocess.run([sys.executable, "-m", "tests.cluster", "up", "--dir", d],
                               capture_output=True, text=True, env=env, check=False)
        assert again.returncode == 1 and "already up" in again.stderr
    finally:
        down = subprocess.run([sys.executable, "-m", "tests.cluster", "down", "--dir", d],
                              capture_output=True, text=True, env=env, timeout=120,
                              check=False)
    assert down.returncode == 0, down.stderr
    pids = [state["volume"]["glusterd"][0], state["volume"]["ns"]["holder"]]
    for h in state["hosts"]:
        pids += [h["agent"][0], h["sanlock"][0], h["ns"]["holder"]]
    for pid in pids:
        assert not namespace.alive(pid, None), pid
    assert not _mounts_anywhere(d)
    assert not os.path.exists(os.path.join(d, cluster.STATE_FILE))
    # The module's volume was not touched.
    assert "Status: Started" in gluster_volume.cli("volume", "info", gluster_volume.name)


@pytest.mark.skipif(not cluster.has_driver(), reason=f"the agent has no {cluster.REPO_FORMAT} "
                    "repository format yet (being written on another branch)")
def test_hosts_connect_one_glusterfs_repository_and_see_each_others_images(
        cluster_hosts: Any, gluster_volume: gluster.Volume) -> None:
    hosts = cluster_hosts(2)
    cluster.connect_repository(hosts, gluster_volume, io_timeout=1)
    for h in hosts:
        assert [r["repoId"] for r in h.call("listStorageRepositories")] == [cluster.REPO_ID]
    disk = hosts[0].call("createVirtualDisk", cluster.REPO_ID, 1 << 30)
    conftest.settle(hosts[0].call, cluster.REPO_ID, disk)
    assert hosts[1].call("getImageStatus", cluster.REPO_ID, disk)["status"] == "optimized"
