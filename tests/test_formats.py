"""The shared formats: what they mount and where, what they refuse before mounting anything, what
format records, and that disconnecting (or stopping the agent) unmounts.

posixfs-1.0 runs for real on a loop-mounted XFS image and on a bind of a directory. nfs-1.0: this
machine has no NFS client in its kernel (``mount -t nfs`` fails with "No such device"), so its
tests go up to the mount: the parameters and options checked, the mount attempted and failing
with a clear error, nothing left mounted. glusterfs-1.0: its mount options here; its volume
check on the client graphs a real GlusterFS 10 client printed (``.meta/graphs/active/volfile``).
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from agent import api as agent_api
from agent import errors
from agent.repo import contract, glusterfs, mounted, nfs
from rpc import clihelp
from tests.conftest import (
    Daemon,
    assert_nothing_mounted_under,
    settle,
    shared_params,
    wait_joined,
)

GIB = 1 << 30


def mounts_under(path: str) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(path + "/")]


def mount_points(run_dir: str) -> list[str]:
    """What is left in run_dir/mnt but the lock files (kept: see mounted.py)."""
    return [n for n in os.listdir(os.path.join(run_dir, "mnt")) if not n.endswith(".lock")]


@pytest.fixture
def api(tmp_path: Any, sanlock_daemon: Any) -> Any:
    # Shared formats write sanlock areas at format and join the lockspace at connect.
    a = agent_api.Api(1, 2, str(tmp_path / "state"))
    yield a
    a.close()
    assert_nothing_mounted_under(str(tmp_path))


def test_posixfs_formats_in_a_mount_of_its_own_and_records_the_io_timeout(
        api: Any, tmp_path: Any) -> None:
    params = shared_params("posixfs-1.0", str(tmp_path), "x")
    api.formatStorageRepository("posixfs-1.0", params, {"ioTimeout": 3})
    assert mounts_under(str(tmp_path)) == []  # formatting mounted, wrote and unmounted
    assert mount_points(str(tmp_path / "state" / "run")) == []
    # What format wrote is on the file system itself.
    check = tmp_path / "check"
    check.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", params["spec"], str(check)], check=True)
    try:
        meta = json.loads((check / "repository.json").read_text())
        assert sorted(os.listdir(check)) == ["images", "journal", "leases", "repository.json",
                                             "volumes"]
        # The lockspace and the repository lease, whole, before repository.json named them.
        assert sorted(os.listdir(check / "leases")) == ["ids", "repository.lease"]
        assert all(os.path.getsize(check / "leases" / n) == 1 << 20
                   for n in ("ids", "repository.lease"))
    finally:
        subprocess.run(["umount", str(check)], check=True)
    assert meta["format"] == "posixfs-1.0" and meta["ioTimeout"] == 3

    info = api.connectStorageRepository("p", "posixfs-1.0", params, {})
    assert info["repoUUID"] == meta["uuid"]
    assert {"thin", "snapshot", "copy", "merge", "shared", "reflink", "direct-io"} \
        <= set(info["capabilities"])
    repo = api.host.connection("p").repo
    assert repo.shared and repo.io_timeout == 3
    assert isinstance(repo, contract.Repository)
    [mnt] = mounts_under(str(tmp_path))
    assert os.path.dirname(mnt) == str(tmp_path / "state" / "run" / "mnt")
    assert os.path.basename(mnt).startswith("posixfs-1.0-") and repo.root == mnt
    # The same parameters again: the same connection (no second mount).
    assert not api.connectStorageRepository("p", "posixfs-1.0", params, {})["changed"]
    assert mounts_under(str(tmp_path)) == [mnt]

    # Joining the lockspace takes 2·ioTimeout+1 s: until then reads work, changes are refused.
    assert api.getStorageRepositoryInfo("p")["lockspace"]["state"] == "joining"
    with pytest.raises(errors.LockspaceNotJoined, match="still joining"):
        api.createVirtualDisk("p", 64 << 20, None, {}, {})
    assert api.listImages("p", {}) == []
    wait_joined(api.getStorageRepositoryInfo, "p")
    assert api.getStorageRepositoryInfo("p")["lockspace"]["hostId"] == 1
    d = api.createVirtualDisk("p", 64 << 20, None, {}, {})
    assert settle(lambda m, *a: getattr(api, m)(*a), "p", d)["status"] == "optimized"
    api.disconnectStorageRepository("p", {})
    assert mounts_under(str(tmp_path)) == [] and not os.path.exists(mnt)
    # And back: the image is on the file system, not in the mount point.
    api.connectStorageRepository("p", "posixfs-1.0", params, {})
    assert [i["imageId"] for i in api.listImages("p", {})] == [d]


def test_a_bind_of_a_shared_directory(api: Any, tmp_path: Any) -> None:
    shared = tmp_path / "already-shared"
    shared.mkdir()
    # Formatted without options: sanlock's io_timeout is the default, recorded for every host.
    default = tmp_path / "default-io"
    default.mkdir()
    api.formatStorageRepository("posixfs-1.0", {"spec": str(default), "vfsType": "none",
                                                "mountOptions": "bind"}, {})
    meta = json.loads((default / "repository.json").read_text())
    assert meta["format"] == "posixfs-1.0" and meta["ioTimeout"] == mounted.IO_TIMEOUT
    # (Joining at the default takes 2·10+1 s: the one used here is formatted with 1.)
    params = {"spec": str(shared), "vfsType": "none", "mountOptions": "bind"}
    api.formatStorageRepository("posixfs-1.0", params, {"ioTimeout": 1})
    api.connectStorageRepository("b", "posixfs-1.0", params, {})
    wait_joined(api.getStorageRepositoryInfo, "b")
    d = api.createVirtualDisk("b", 1 << 20, None, {}, {})
    assert os.path.exists(shared / "images" / f"{d}.json")
    # A second format finds it formatted, through a mount of its own, and leaves nothing.
    with pytest.raises(errors.RepositoryNotEmpty):
        api.formatStorageRepository("posixfs-1.0", params, {})
    assert len(mounts_under(str(tmp_path))) == 1


def test_the_same_repository_under_other_parameters_is_not_connected_twice(
        api: Any, tmp_path: Any) -> None:
    params = shared_params("posixfs-1.0", str(tmp_path), "x")
    api.formatStorageRepository("posixfs-1.0", params, {})
    api.connectStorageRepository("one", "posixfs-1.0", params, {})
    other = {**params, "mountOptions": "loop,noatime"}  # another mount point, the same FS
    with pytest.raises(errors.RepositoryAlreadyConnected, match="already connected as repoId "
                                                              "'one'"):
        api.connectStorageRepository("two", "posixfs-1.0", other, {})
    assert len(mounts_under(str(tmp_path))) == 1  # the second mount was let go


@pytest.mark.parametrize(("fmt", "params", "key"), [
    ("posixfs-1.0", {"vfsType": "xfs"}, "connectionParameters.spec"),
    ("posixfs-1.0", {"spec": "/dev/x", "vfsType": "xfs", "path": "/x"},
     "connectionParameters.path"),
    ("posixfs-1.0", {"spec": "-oremount", "vfsType": "xfs"}, "connectionParameters.spec"),
    ("posixfs-1.0", {"spec": "/x", "vfsType": "nfs"}, "connectionParameters.vfsType"),
    ("posixfs-1.0", {"spec": "/x", "vfsType": "xfs", "mountOptions": "loop,,ro"},
     "connectionParameters.mountOptions"),
    ("glusterfs-1.0", {"server": "h"}, "connectionParameters.volume"),
    ("glusterfs-1.0", {"server": 7, "volume": "v"}, "connectionParameters.server"),
    ("glusterfs-1.0", {"server": "h", "volume": "v", "mountOptions": "entry-timeout=1"},
     "connectionParameters.mountOptions"),
    ("nfs-1.0", {"server": "h", "export": "/e"}, "connectionParameters.version"),
    ("nfs-1.0", {"server": "h", "export": "/e", "version": "5"},
     "connectionParameters.version"),
    ("nfs-1.0", {"server": "h", "export": "/e", "version": "4.2", "mountOptions": "soft"},
     "connectionParameters.mountOptions"),
    ("localfs-1.0", {"server": "h", "path": "/x"}, "connectionParameters.server"),
])
def test_bad_parameters_are_refused_naming_the_key_and_nothing_is_touched(
        api: Any, tmp_path: Any, fmt: str, params: dict[str, Any], key: str) -> None:
    for call in (lambda: api.formatStorageRepository(fmt, params, {}),
                 lambda: api.connectStorageRepository("x", fmt, params, {})):
        with pytest.raises(errors.InvalidArgument) as e:
            call()
        assert e.value.data["param"] == key and e.value.message.startswith(f"{key}: ")
    assert not os.path.exists(tmp_path / "state" / "run")  # not even a mount point
    assert api.listStorageRepositories() == []


@pytest.mark.parametrize("value", [0, 61, "10", 1.5, True])
def test_io_timeout_is_whole_seconds_from_1_to_60(api: Any, tmp_path: Any, value: Any) -> None:
    params = {"spec": str(tmp_path), "vfsType": "none", "mountOptions": "bind"}
    with pytest.raises(errors.InvalidArgument, match="options.ioTimeout"):
        api.formatStorageRepository("posixfs-1.0", params, {"ioTimeout": value})
    assert not os.path.exists(tmp_path / "repository.json")


def test_a_local_repository_refuses_an_io_timeout(api: Any, tmp_path: Any) -> None:
    with pytest.raises(errors.InvalidArgument, match="options.ioTimeout is for the shared"):
        api.formatStorageRepository("localfs-1.0", {"path": str(tmp_path / "l")},
                                    {"ioTimeout": 5})
    assert not os.path.exists(tmp_path / "l")


def test_glusterfs_always_mounts_coherent_and_lets_the_admin_add_options() -> None:
    spec = glusterfs.GlusterRepository.mount_spec(
        {"server": "gl1", "volume": "vms", "mountOptions": "backup-volfile-servers=gl2:gl3,"
                                                           "entry-timeout=0"})
    assert spec.argv("/m") == [
        "mount", "-t", "glusterfs", "-o",
        "attribute-timeout=0,entry-timeout=0,negative-timeout=0,backup-volfile-servers=gl2:gl3",
        "gl1:/vms", "/m"]
    with pytest.raises(errors.InvalidArgument, match="'negative-timeout=5' is refused") as e:
        glusterfs.GlusterRepository.mount_spec(
            {"server": "gl1", "volume": "vms", "mountOptions": "negative-timeout=5"})
    assert e.value.data["option"] == "negative-timeout"


# A GlusterFS 10.3 client's graph (trimmed of its credentials) on a volume with the defaults
# but quick-read and open-behind off, then on one with all four options set as required.
DEFAULT_GRAPH = """\
volume strata-client-0
    type protocol/client
    option remote-host 127.0.0.2
end-volume

volume strata-dht
    type cluster/distribute
    subvolumes strata-client-0
end-volume

volume strata-write-behind
    type performance/write-behind
    option strict-O_DIRECT off
    subvolumes strata-dht
end-volume

volume strata-md-cache
    type performance/md-cache
    subvolumes strata-write-behind
end-volume

volume strata
    type debug/io-stats
    subvolumes strata-md-cache
end-volume
"""
COHERENT_GRAPH = DEFAULT_GRAPH.replace("strict-O_DIRECT off", "strict-O_DIRECT on").replace(
    """volume strata-md-cache
    type performance/md-cache
    subvolumes strata-write-behind
end-volume
""", "")


def test_the_glusterfs_volume_check_reads_the_client_graph() -> None:
    bad = glusterfs.unsafe_options(DEFAULT_GRAPH)
    assert [o.name for o in bad] == ["performance.stat-prefetch", "performance.strict-o-direct"]
    assert glusterfs.unsafe_options(COHERENT_GRAPH) == []
    with_quick_read = COHERENT_GRAPH + "volume q\n    type performance/quick-read\nend-volume\n"
    assert [o.name for o in glusterfs.unsafe_options(with_quick_read)] == [
        "performance.quick-read"]


def test_nfs_builds_the_safe_options_and_refuses_the_unsafe(tmp_path: Any) -> None:
    def spec(options: str = "", version: str = "4.2") -> mounted.MountSpec:
        params: dict[str, Any] = {"server": "filer", "export": "/vms", "version": version}
        if options:
            params["mountOptions"] = options
        nfs.NfsRepository.check_parameters(params)
        return nfs.NfsRepository.mount_spec(params)

    assert spec().argv("/m") == ["mount", "-t", "nfs", "-o",
                                 "hard,lookupcache=none,actimeo=0,vers=4.2", "filer:/vms", "/m"]
    assert spec("nolock,timeo=600,lookupcache=positive,vers=3", "3").options == (
        "hard", "actimeo=0", "vers=3", "nolock", "timeo=600", "lookupcache=positive")
    assert spec("noac").options == ("hard", "lookupcache=none", "vers=4.2", "noac")
    for bad, name in [("soft", "soft"), ("lookupcache=all", "lookupcache"),
                      ("actimeo=3", "actimeo"), ("acregmax=60", "acregmax"), ("ac", "ac"),
                      ("vers=3", "vers"), ("softreval", "softreval")]:
        with pytest.raises(errors.InvalidArgument) as e:
            spec(f"rsize=65536,{bad}")
        assert e.value.data["option"] == name, bad


def test_an_nfs_mount_that_fails_says_so_and_leaves_nothing(api: Any, tmp_path: Any) -> None:
    # No NFS in this machine's kernel: the mount fails (a kernel with NFS would fail too, at
    # once with retry=0, as nothing serves NFS on 127.0.0.1 here). Either way, nothing stays.
    params = {"server": "127.0.0.1", "export": "/nowhere", "version": "4.2",
              "mountOptions": "retry=0"}
    for call in (lambda: api.formatStorageRepository("nfs-1.0", params, {}),
                 lambda: api.connectStorageRepository("n", "nfs-1.0", params, {})):
        with pytest.raises(errors.RepositoryUnavailable, match="cannot mount 127.0.0.1:/nowhere "
                                                               r"\(nfs\) at .*: mount"):
            call()
        assert mounts_under(str(tmp_path)) == []
        assert mount_points(str(tmp_path / "state" / "run")) == []
    assert api.listStorageRepositories() == []


def test_the_cli_help_shows_each_formats_parameters() -> None:
    doc = clihelp.packaged_document()
    for method in ("connectStorageRepository", "formatStorageRepository"):
        text = clihelp.format_method_help(doc, clihelp.find_method(doc, method))
        for fmt, keys in (("glusterfs-1.0:", ("server", "volume", "mountOptions")),
                          ("posixfs-1.0:", ("spec", "vfsType")),
                          ("nfs-1.0:", ("export", "version")), ("localfs-1.0:", ("path",))):
            assert fmt in text
            block = text.split(fmt, 1)[1].split(":\n", 1)[0]
            assert all(k in block for k in keys), (fmt, block)
        assert "ioTimeout" in text


def test_the_daemon_refuses_bad_parameters_by_name_and_unmounts_when_it_stops(
        tmp_path: Any) -> None:
    d = Daemon(str(tmp_path / "agent"))
    d.start()
    try:
        c = d.client()
        with pytest.raises(Exception) as e:
            c.call("connectStorageRepository", "g", "glusterfs-1.0",
                   {"server": "h", "volume": "v", "bogus": 1})
        assert getattr(e.value, "code", None) == -32602
        assert "connectionParameters.bogus: unknown key" in str(e.value)
        c.close()
        params = shared_params("posixfs-1.0", str(tmp_path), "x")
        d.call("formatStorageRepository", "posixfs-1.0", params, {"ioTimeout": 1})
        d.call("connectStorageRepository", "x", "posixfs-1.0", params)
        [mnt] = mounts_under(str(tmp_path))
        assert mnt.startswith(str(tmp_path / "agent" / "run" / "mnt") + "/")  # --dev run_dir
    finally:
        assert d.stop() == 0
    assert mounts_under(str(tmp_path)) == []
