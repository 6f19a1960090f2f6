"""Fixtures: the engine in-process on real repositories, and the real daemon on its socket."""

from __future__ import annotations

import contextlib
import http.client
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent import api as agent_api
from rpc import transport
from tests import cluster, gluster, process, qemu, sanlockd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settle(call: Any, repo: str, image_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """Poll getImageStatus until nothing runs on the image: it is usable, or broken for a
    reason (an error, or an operation nobody runs)."""
    deadline = time.monotonic() + timeout
    while True:
        s: dict[str, Any] = call("getImageStatus", repo, image_id)
        if not s["running"] and (
            s["status"] != "broken" or s["last_error"] or s["operation"] is None
        ):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"image {image_id} did not settle: {s}")
        time.sleep(0.05)


# The formats the functional suites run on (the ``repo_format`` fixture of a test module that
# runs on all of them): localfs, a shared format on a file system the agent mounts itself, and
# a real GlusterFS volume per repository (nfs-1.0 cannot mount here: tests/test_formats.py).
FORMATS = ("localfs-1.0", "posixfs-1.0", "glusterfs-1.0")
# How a call looks when the agent dies while answering it: no answer, or half of one. An
# operation runs in the background once its intent is durable, so a crash point in it can
# beat the answer out of the process.
CUT_SHORT = (ConnectionError, http.client.HTTPException)
SHARED_SLOWER = 3  # how much longer a suite's time limits are on a shared format
LOOP_GIB = 4  # each repository's loop-mounted XFS for posixfs-1.0: sparse, room for the suites


class GlusterPool:
    """Real GlusterFS volumes for the in-process suites, one per repository name, made once per
    test session (a volume takes seconds to start) and emptied for each test."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.volumes: dict[str, gluster.Volume] = {}

    def fresh(self, name: str) -> gluster.Volume:
        v = self.volumes.get(name)
        if v is None:
            v = gluster.Volume(os.path.join(self.base, name), size_gib=LOOP_GIB)
            self.volumes[name] = v
            v.start()
        else:
            v.wipe()
        return v

    def stop(self) -> None:
        for v in self.volumes.values():
            v.stop()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(v.image)


def shared_params(repo_format: str, base: str, name: str,
                  pool: GlusterPool | None = None) -> dict[str, Any]:
    """The connectionParameters of repository ``name`` of a test in ``base``."""
    if repo_format == "localfs-1.0":
        return {"path": os.path.join(base, name)}
    if repo_format == "posixfs-1.0":
        # A file system of its own (XFS with reflink, on a loop device the mount sets up and
        # the unmount frees): the agent mounts it at connect and unmounts it at disconnect.
        if os.geteuid() != 0:
            pytest.skip("posixfs-1.0 over a loop-mounted XFS needs root")
        image = os.path.join(base, f"{name}.xfs")
        with open(image, "wb") as f:
            f.truncate(LOOP_GIB << 30)
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", image], check=True,
                       capture_output=True)
        return {"spec": image, "vfsType": "xfs", "mountOptions": "loop"}
    if repo_format == "glusterfs-1.0":
        assert pool is not None, "glusterfs-1.0 repositories come from the gluster_pool fixture"
        return dict(pool.fresh(name).params)
    raise AssertionError(f"no test repository for {repo_format}")


class Engine:
    """The agent's API in-process, with two connected repositories ``r1`` and ``r2`` of format
    ``repo_format`` (their roots in ``roots``, their parameters in ``params``)."""

    def __init__(self, base: str, max_chain_depth: int = 10,
                 repo_format: str = "localfs-1.0", pool: GlusterPool | None = None) -> None:
        self.base = base
        self.format = repo_format
        self.api = agent_api.Api(1, 2, os.path.join(base, "state"), max_chain_depth)
        self.roots: dict[str, str] = {}
        self.params: dict[str, dict[str, Any]] = {}
        try:
            for name in ("r1", "r2"):
                params = shared_params(repo_format, base, name, pool)
                options = {} if repo_format == "localfs-1.0" else {"ioTimeout": 1}
                self.api.formatStorageRepository(repo_format, params, options)
                self.api.connectStorageRepository(name, repo_format, params, {})
                self.roots[name] = self.api.host.connection(name).repo.root
                self.params[name] = params
            for name in self.roots:
                wait_joined(self.api.getStorageRepositoryInfo, name)
        except BaseException:
            self.api.close()  # unmounts what was mounted
            raise

    def call(self, method: str, *args: Any) -> Any:
        fn = getattr(self.api, method)
        defaults: dict[str, Any] = {"options": {}, "userData": {}}
        params = list(inspect.signature(fn).parameters)
        full = list(args) + [defaults.get(p) for p in params[len(args):]]
        return fn(*full)

    def settle(self, repo: str, image_id: str) -> dict[str, Any]:
        return settle(self.call, repo, image_id)

    def path(self, repo: str, image_id: str) -> str:
        """The image's top volume path (without keeping it prepared)."""
        p: str = self.api.prepareImage(repo, image_id, {})["path"]
        self.api.teardownImage(repo, image_id, {})
        return p


def wait_joined(info: Any, repo_id: str, timeout: float = 30.0) -> None:
    """Wait until this host has joined a shared repository's lockspace (2·ioTimeout+1 s after
    connecting; data-changing calls are refused until then). A local one has none."""
    deadline = time.monotonic() + timeout
    while True:
        state = info(repo_id)["lockspace"]
        if state["state"] in ("joined", "local"):
            return
        assert time.monotonic() < deadline, f"{repo_id} did not join its lockspace: {state}"
        time.sleep(0.1)


@pytest.fixture(scope="session")
def sanlock_daemon(tmp_path_factory: Any) -> Iterator[sanlockd.Daemon]:
    """This test process's own sanlock daemon (host 1 of every shared repository the in-process
    tests make). libsanlock reads SANLOCK_RUN_DIR once, at its first call, so the variable is
    set here before any, for the whole session; daemons started later inherit it."""
    d = sanlockd.Daemon(str(tmp_path_factory.mktemp("sanlock")), "host1")
    d.start()
    os.environ.update(d.env)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def repo_format() -> str:
    """The format of the engine's repositories; a module that runs on every format overrides
    this fixture with one parametrized over FORMATS."""
    return "localfs-1.0"


@pytest.fixture(scope="session")
def gluster_pool(tmp_path_factory: Any) -> Iterator[GlusterPool]:
    reason = gluster.missing()
    if reason:
        # Only where a volume cannot run at all (not root, no /dev/fuse, the Debian packages
        # make test installs missing): the reason names which.
        pytest.skip(reason)
    pool = GlusterPool(str(tmp_path_factory.mktemp("gluster-pool")))
    try:
        yield pool
    finally:
        pool.stop()


def engine_pool(request: pytest.FixtureRequest, repo_format: str) -> GlusterPool | None:
    """What an Engine of ``repo_format`` needs besides its directory: the sanlock daemon its
    shared repositories take leases from, and for glusterfs-1.0 the volumes."""
    if repo_format == "localfs-1.0":
        return None
    request.getfixturevalue("sanlock_daemon")
    if repo_format == "glusterfs-1.0":
        pool: GlusterPool = request.getfixturevalue("gluster_pool")
        return pool
    return None


@pytest.fixture
def engine(request: pytest.FixtureRequest, tmp_path: Any, repo_format: str) -> Iterator[Engine]:
    e = Engine(str(tmp_path), repo_format=repo_format, pool=engine_pool(request, repo_format))
    yield e
    e.api.close()
    if repo_format != "localfs-1.0":
        assert_nothing_mounted_under(str(tmp_path))


def assert_nothing_mounted_under(path: str) -> None:
    with open("/proc/self/mounts") as f:
        left = [line.split()[1] for line in f if line.split()[1].startswith(path + "/")]
    assert left == [], f"still mounted: {left}"


STARTED: list[Daemon] = []  # the Daemons of the running test


@pytest.fixture(autouse=True)
def daemons_stopped() -> Iterator[None]:
    """Every Daemon a test made is stopped when it ends, even when it failed midway (SIGTERM:
    the agent unmounts what it mounted; SIGKILL if it does not go)."""
    STARTED.clear()
    yield
    for d in STARTED:
        if d.proc is not None:
            process.terminate(d.proc)
    STARTED.clear()


class Daemon:
    """The real strata-agent in --dev mode, as a child process. ``resume=False`` starts it with
    --no-resume: interrupted operations then wait for a mend fix (the tests of that path)."""

    def __init__(self, directory: str, env: dict[str, str] | None = None,
                 resume: bool = True, per_test: bool = True) -> None:
        self.dir = directory
        self.socket = os.path.join(directory, "agent.sock")
        self.env = env or {}
        self.resume = resume
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = os.path.join(directory, "agent.log")
        if per_test:  # stopped at the end of the test whatever happens (daemons_stopped)
            STARTED.append(self)

    def start(self, timeout: float = 20.0) -> None:
        os.makedirs(self.dir, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": ROOT, **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rpc.main", "--dev", self.dir,
                 *([] if self.resume else ["--no-resume"])],
                stdout=log, stderr=log, env=env,
            )
        proc = self.proc
        if not transport.wait_for_socket(self.socket, timeout, lambda: proc.poll() is None):
            raise AssertionError(f"agent did not listen (exit {proc.poll()}): {self.read_log()}")

    def read_log(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()[-4000:]

    def client(self) -> transport.Client:
        return transport.Client(socket_path=self.socket)

    def call(self, method: str, *args: Any, **params: Any) -> Any:
        return transport.call_once(self.socket, method, *args, **params)

    def path(self, repo: str, image_id: str) -> str:
        """The image's top volume path (prepared and torn down again at once)."""
        p: str = self.call("prepareImage", repo, image_id)["path"]
        self.call("teardownImage", repo, image_id)
        return p

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        return self.proc.returncode


def source_snapshot(d: Daemon, tmp_path: Any, gib: float) -> tuple[str, qemu.Layout]:
    """A snapshot holding ``gib`` GiB of patterned data in 'default', and a second repository
    'r2' to copy it to: the starting point of the copy crash tests."""
    params = {"path": str(tmp_path / "r2")}
    d.call("formatStorageRepository", "localfs-1.0", params)
    d.call("connectStorageRepository", "r2", "localfs-1.0", params)
    disk = d.call("createVirtualDisk", "default", 2 * qemu.GiB)
    settle(d.call, "default", disk)
    layout = qemu.fill(d.path("default", disk), gib)
    snap: str = d.call("createSnapshot", "default", disk)
    assert settle(d.call, "default", snap)["status"] == "optimized"
    return snap, layout


@pytest.fixture
def daemon(tmp_path: Any) -> Iterator[Daemon]:
    d = Daemon(str(tmp_path / "dev"))
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        assert d.stop() == 0, d.read_log()


@pytest.fixture(scope="module")
def gluster_volume(tmp_path_factory: Any) -> Iterator[gluster.Volume]:
    """A real GlusterFS volume, shared by the tests of one module (it takes seconds to make)."""
    reason = gluster.missing()
    if reason:
        pytest.skip(reason)
    v = gluster.Volume(str(tmp_path_factory.mktemp("gluster")))
    v.start()
    yield v
    v.stop()
    os.unlink(v.image)  # sparse, but 20 GiB to a reader; the logs stay for a failed run


@pytest.fixture
def cluster_hosts(gluster_volume: gluster.Volume, tmp_path: Any) -> Iterator[Any]:
    """``make(n, agents=True, mount=False)``: n more simulated hosts on ``gluster_volume``
    (emptied for this test), all stopped at the end of the test even when it fails."""
    gluster_volume.wipe()
    made: list[cluster.Host] = []

    def make(n: int = 2, agents: bool = True, mount: bool = False) -> list[cluster.Host]:
        hosts = [cluster.Host(str(tmp_path), len(made) + i, gluster_volume)
                 for i in range(1, n + 1)]
        for h in hosts:
            made.append(h)
            h.start(agent=agents, mount=mount)
        return hosts

    yield make
    errors = []
    for h in made:
        try:
            h.stop()
        except Exception as e:  # every host still goes down
            errors.append(f"{h.name}: {e}")
    assert not errors, errors


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``make test`` runs the suite on several workers (pytest-xdist, --dist loadgroup). The
    multi-host tests (marked ``xdist_group("cluster")`` where they are written: xdist reads
    the groups before this hook runs) run one after another on one worker, as each brings up
    its own hosts, whose sanlock daemons renew every io_timeout (1 s), and a takeover test
    measures sanlock's own timings; so do each format's tests of a module with one daemon per
    format (``one_daemon``). Those long groups go first, so that no worker starts one when the
    others are nearly done."""
    for item in items:
        params = getattr(item, "callspec", None)
        fmt = params.params.get("host", "") if params is not None else ""
        timeout = item.get_closest_marker("timeout")
        if item.get_closest_marker("one_daemon") is not None and fmt not in (
                "", "localfs-1.0") and timeout is not None and timeout.args:
            # A hang detector, not a speed target: everything is slower on a shared
            # repository (a record read is a round trip; a new image writes a lease area).
            item.add_marker(pytest.mark.timeout(SHARED_SLOWER * float(timeout.args[0])),
                            append=False)
    items.sort(key=lambda i: 0 if i.get_closest_marker("cluster") is not None
               else 1 if i.get_closest_marker("one_daemon") is not None else 2)
