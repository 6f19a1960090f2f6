"""Crash at every step of every operation and fix, restart, converge: nothing is lost.

For each named crash point (``agent.crashpoint``), the real daemon runs with the test-only hook
set, builds a small repository through the API, and starts the operation that reaches the point;
the daemon ``_exit``s there as a power cut would. A daemon without the hook, which takes up at
start what was running (resume_on_start, the default), then runs check and fix until only clean
is left, runs clean, and the test checks:

- every image that was usable before reads the same bytes (qemu-io pattern reads);
- the image under operation is complete with the right bytes, or was removed;
- ``qemu-img check`` is clean on every volume file;
- the check proposes nothing more, and no file is left that no record names.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent import crashpoint
from agent import repo as formats
from agent.image import operations
from tests import qemu
from tests.conftest import (
    CUT_SHORT,
    FORMATS,
    Daemon,
    GlusterPool,
    assert_nothing_mounted_under,
    engine_pool,
    settle,
    shared_params,
    wait_joined,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MiB = qemu.MiB
Expect = dict[str, list[tuple[int, int, int]]]  # image id -> (pattern, offset, length)


@pytest.fixture(params=FORMATS)
def repo_format(request: pytest.FixtureRequest) -> str:
    """The crash matrix runs on every format (tests/conftest.py FORMATS)."""
    return str(request.param)


class Scene:
    """A daemon with two repositories and the bytes every image should read.

    A scenario builds its state, then calls ``arm()`` right before the call that reaches the
    crash point, so that building does not crash.
    """

    def __init__(self, d: Daemon, base: str, arm_file: str, repo_format: str = "localfs-1.0",
                 pool: GlusterPool | None = None) -> None:
        self.d = d
        self.arm_file = arm_file
        self.unnamed: list[tuple[int, int, int]] | None = None
        self.expect: Expect = {}
        self.format = repo_format
        # The repository the scenarios work in, and a second one to copy to. On localfs the
        # first is --dev's own; a shared format's two are mounted by the daemon, and joined.
        self.main, self.other = ("default", "r2") if repo_format == "localfs-1.0" \
            else ("s1", "s2")
        self.params: dict[str, dict[str, Any]] = {}
        self.roots: dict[str, str] = {}
        if repo_format == "localfs-1.0":
            self.roots["default"] = os.path.join(d.dir, "repos", "default")
        for name in ([self.other] if repo_format == "localfs-1.0" else [self.main, self.other]):
            params = shared_params(repo_format, base, name, pool)
            options = {} if repo_format == "localfs-1.0" else {"ioTimeout": 1}
            d.call("formatStorageRepository", repo_format, params, options)
            d.call("connectStorageRepository", name, repo_format, params)
            self.params[name] = params
            self.roots[name] = params["path"] if repo_format == "localfs-1.0" else \
                formats.FORMATS[repo_format].location(params, os.path.join(d.dir, "run"))
        for name in self.roots:
            wait_joined(lambda r: d.call("getStorageRepositoryInfo", r), name)

    def arm(self) -> None:
        with open(self.arm_file, "w"):
            pass

    def trigger(self, writes: list[tuple[int, int, int]], method: str, *args: Any,
                same_id: str | None = None) -> None:
        """Arm, make the call that reaches the crash point, and expect ``writes`` in the image
        it makes. The crash may beat the answer: then the id is found after the restart,
        as a client that lost the answer would find it (listImages includeIncomplete)."""
        self.arm()
        try:
            image = self.d.call(method, *args)
        except CUT_SHORT:
            if same_id is not None:
                self.expect[same_id] = writes  # a snapshot's copy keeps its id
            else:
                self.unnamed = writes
            return
        self.expect[image] = writes

    def name_unnamed(self, repos: list[str]) -> None:
        if self.unnamed is None:
            return
        known = set(self.expect)
        new = {i["imageId"] for repo in repos
               for i in self.d.call("listImages", repo, {"includeIncomplete": True})} - known
        assert len(new) == 1, new
        self.expect[new.pop()] = self.unnamed

    def path(self, image: str, repo: str | None = None) -> str:
        return self.d.path(repo or self.main, image)

    def disk(self, *writes: tuple[int, int, int], repo: str | None = None,
             size: int = 32 * MiB) -> str:
        repo = repo or self.main
        image: str = self.d.call("createVirtualDisk", repo, size)
        assert settle(self.d.call, repo, image)["status"] == "optimized"
        self.expect[image] = []
        self.write(image, *writes, repo=repo)
        return image

    def write(self, image: str, *writes: tuple[int, int, int], repo: str | None = None) -> None:
        repo = repo or self.main
        p = self.path(image, repo)
        for pattern, off, length in writes:
            qemu.write(p, pattern, off, length)
        self.expect[image] = _overlay(self.expect[image], list(writes))

    def snapshot(self, disk: str, repo: str | None = None) -> str:
        repo = repo or self.main
        snap: str = self.d.call("createSnapshot", repo, disk)
        settle(self.d.call, repo, snap)
        self.expect[snap] = list(self.expect[disk])
        return snap

    def fix(self, kind: str, repo: str | None = None, deep: bool = False) -> None:
        """Arm, and run the first proposed fix of that kind."""
        repo = repo or self.main
        found = [f for f in self.d.call("checkStorageRepository", repo, {"deep": deep})
                 if f["type"] == kind]
        assert found, f"no {kind} fix proposed"
        self.arm()
        # The crash may come before the answer: clean runs inside the call, and a fix's
        # operation may start and reach its crash point before the call has answered.
        with contextlib.suppress(*CUT_SHORT):
            self.d.call("fixStorageRepository", repo, found[0])


    def remove(self, image: str, repo: str | None = None) -> None:
        repo = repo or self.main
        self.d.call("removeImage", repo, image)
        self.expect.pop(image)


def _overlay(old: list[tuple[int, int, int]],
             new: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Expected reads after writing ``new`` over ``old``: MiB-granular, as the tests write."""
    by_mib: dict[int, int] = {}
    for pattern, off, length in old + new:
        for m in range(off // MiB, (off + length) // MiB):
            by_mib[m] = pattern
    return [(p, m * MiB, MiB) for m, p in sorted(by_mib.items())]


# -- scenarios: each builds state, then starts what reaches the crash point -------------------

def create_blank(s: Scene) -> None:
    s.disk((0x11, 0, MiB))
    s.trigger([], "createVirtualDisk", s.main, 16 * MiB)


def create_thin(s: Scene) -> None:
    d = s.disk((0x11, 0, 2 * MiB))
    snap = s.snapshot(d)
    s.trigger(list(s.expect[snap]), "createVirtualDisk", s.main, 32 * MiB, snap)


def create_performance(s: Scene) -> None:
    d = s.disk((0x11, 0, 2 * MiB))
    snap = s.snapshot(d)
    s.trigger(list(s.expect[snap]), "createVirtualDisk", s.main, 32 * MiB, snap, {},
              {"strategy": "performance"})


def snapshot(s: Scene) -> None:
    d = s.disk((0x11, 0, 2 * MiB))
    s.trigger(list(s.expect[d]), "createSnapshot", s.main, d)


def copy_full(s: Scene) -> None:
    d = s.disk((0x11, 0, 2 * MiB))
    s.write(d, (0x22, MiB, MiB))
    snap = s.snapshot(d)
    s.trigger(list(s.expect[snap]), "copyImage", s.other, snap, same_id=snap)


def copy_with_base(s: Scene) -> None:
    d = s.disk((0x11, 0, 4 * MiB))
    s1 = s.snapshot(d)
    s.d.call("copyImage", s.other, s1)
    settle(s.d.call, s.other, s1)
    s.write(d, (0x33, MiB, MiB))
    s2 = s.snapshot(d)
    s.trigger(list(s.expect[s2]), "copyImage", s.other, s2, s1, same_id=s2)


def merge_commit(s: Scene) -> None:
    d = s.disk((0x11, 0, 8 * MiB))
    snap = s.snapshot(d)
    s.write(d, (0x22, 0, MiB))
    s.remove(snap)
    s.fix("merge")


def merge_rebase(s: Scene) -> None:
    d = s.disk((0x11, 0, MiB))
    snap = s.snapshot(d)
    s.write(d, (0x22, 2 * MiB, 8 * MiB))
    s.remove(snap)
    s.fix("merge")


def flatten(s: Scene) -> None:
    d = s.disk((0x10, 0, MiB))
    for i in range(10):  # depth 11: beyond the default max_chain_depth of 10
        s.snapshot(d)
        s.write(d, (0x20 + i, (i % 4) * MiB, MiB))
    s.fix("optimize")


def repair(s: Scene) -> None:
    d = s.disk((0x11, 0, MiB))
    qemu.leak_a_cluster(s.path(d))
    s.fix("optimize", deep=True)


def localize(s: Scene) -> None:
    d2 = s.disk((0x21, 0, 2 * MiB), repo=s.other)
    s2 = s.snapshot(d2, repo=s.other)
    d = s.disk((0x31, MiB, MiB))
    qemu.lean_on(s.path(d), s.path(s2, s.other), s2)
    s.expect[d] = _overlay(s.expect[s2], [(0x31, MiB, MiB)])
    s.fix("optimize")


def clean(s: Scene) -> None:
    keep = s.disk((0x11, 0, MiB))
    snap = s.snapshot(keep)
    gone = s.disk((0x22, 0, MiB))
    s.snapshot(gone)
    s.write(keep, (0x33, MiB, MiB))
    s.remove(gone)
    pending = s.d.call("copyImage", s.other, snap, None, {}, {"AutoFix": False})
    s.d.call("removeImage", s.other, pending)  # an aborted journal and its repo's clean
    s.fix("clean")


SCENARIOS: dict[str, list[Callable[[Scene], None]]] = {
    "createVirtualDisk": [create_blank, create_thin, create_performance],
    "createSnapshot": [snapshot],
    "copyImage": [copy_full, copy_with_base],
    "mergeCommit": [merge_commit],
    "mergeRebase": [merge_rebase],
    "optimizeChain": [flatten],
    "repairLeaks": [repair],
    "optimizeBacking": [localize],
    "clean": [clean],
}


def all_points() -> list[tuple[str, str]]:
    points = [(kind.value, name) for kind, steps in operations.STEPS.items()
              for name, _ in steps]
    return points + [("clean", p) for p in crashpoint.CLEAN_POINTS]


def rebasing_kinds() -> list[str]:
    return [kind.value for kind, steps in operations.STEPS.items()
            if any(fn is operations.rebase_in_place for _, fn in steps)]


CASES = [(f"{k}:{step}", scenario) for k, step in all_points() for scenario in SCENARIOS[k]]


def test_every_crash_point_has_a_scenario() -> None:
    kinds = {k for k, _ in all_points()}
    assert kinds == set(SCENARIOS), "a new operation kind needs a crash scenario"


ORDER = {"mend": 0, "merge": 1, "optimize": 2, "clean": 3}


def wait_idle(d: Daemon, repo: str, timeout: float = 120.0) -> None:
    """Until nothing runs on any image of the repository: what the agent took up again at
    start is not proposed as a fix while it runs, and must end before the check says done."""
    deadline = time.monotonic() + timeout
    for image in d.call("listImages", repo, {"includeIncomplete": True}):
        while d.call("getImageStatus", repo, image["imageId"])["running"]:
            assert time.monotonic() < deadline, f"image {image['imageId']} still runs"
            time.sleep(0.05)


def converge(d: Daemon, repo: str) -> None:
    """Apply fixes one at a time, in the safe order, checking again after each (a fix changes
    what is left to do), until only findings for a person, or nothing, are left."""
    for _ in range(40):
        wait_idle(d, repo)
        found = [f for f in d.call("checkStorageRepository", repo) if not f.get("manual")]
        if not found:
            return
        f = min(found, key=lambda f: ORDER[f["type"]])
        d.call("fixStorageRepository", repo, f)
        for image in f["imageIds"]:
            _settle_if_exists(d, repo, image)
    raise AssertionError(d.call("checkStorageRepository", repo))


def _settle_if_exists(d: Daemon, repo: str, image: str) -> None:
    try:
        st = settle(d.call, repo, image)
    except Exception as e:  # removed meanwhile: its bytes are clean's business
        assert "ImageNotFound" in repr(getattr(e, "data", e)) or "not in repository" in str(e)
        return
    assert st["last_error"] is None, st


def verify(d: Daemon, expect: Expect, roots: dict[str, str]) -> None:
    for repo, root in roots.items():
        listed = {i["imageId"]: i for i in d.call("listImages", repo)}
        for image, writes in expect.items():
            if image not in listed:
                continue
            assert listed[image]["status"] == "optimized", listed[image]
            info = d.call("prepareImage", repo, image)
            d.call("teardownImage", repo, image)
            for pattern, off, length in writes:
                assert qemu.reads(info["path"], pattern, off, length), (repo, image, off)
        assert d.call("checkStorageRepository", repo, {"deep": True}) == []
        vol_dir = os.path.join(root, "volumes")
        files = os.listdir(vol_dir)
        data = {f.split(".")[0] for f in files if f.endswith(".qcow2")}
        records = {f.split(".")[0] for f in files if f.endswith(".json")}
        assert data == records, (sorted(data ^ records), files)
        for f in files:
            if f.endswith(".qcow2"):
                r = subprocess.run(["qemu-img", "check", "-q", os.path.join(vol_dir, f)],
                                   capture_output=True, text=True)
                assert r.returncode == 0, (f, r.stdout, r.stderr)
        assert not os.listdir(os.path.join(root, "journal"))
    # Every image the scenario expects to exist is somewhere, whole.
    found = {i["imageId"] for repo in roots for i in d.call("listImages", repo)}
    missing = set(expect) - found
    assert not missing, missing


@pytest.mark.parametrize(("point", "scenario"), CASES,
                         ids=[f"{p}-{s.__name__}" for p, s in CASES])
def test_crash_then_converge(request: pytest.FixtureRequest, tmp_path: Any, repo_format: str,
                             point: str, scenario: Callable[[Scene], None]) -> None:
    arm = str(tmp_path / "armed")
    pool = engine_pool(request, repo_format)
    d = Daemon(str(tmp_path / "dev"),
               env={"STRATA_TEST_CRASH_AT": point, "STRATA_TEST_CRASH_ARM": arm})
    d.start()
    try:
        s = Scene(d, str(tmp_path), arm, repo_format, pool)
        scenario(s)
        assert d.proc is not None
        try:
            code = d.proc.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{point} was never reached: {d.read_log()}") from None
        assert code == crashpoint.EXIT_CODE, d.read_log()

        d.env = {}
        d.start()  # a shared repository's mount and lockspace outlived the crash: taken again
        for name in s.roots:
            wait_joined(lambda r: d.call("getStorageRepositoryInfo", r), name)
        s.name_unnamed(list(s.roots))
        for repo in s.roots:
            converge(d, repo)
        verify(d, s.expect, s.roots)
        assert d.stop() == 0
    finally:
        stop_and_unmount(d)
    assert_nothing_mounted_under(d.dir)


def stop_and_unmount(d: Daemon) -> None:
    """A daemon a failed test left running is stopped (it unmounts what it mounted); what a
    crashed one left mounted is unmounted."""
    if d.proc is not None and d.proc.poll() is None:
        d.stop()
    with open("/proc/self/mounts") as f:
        left = [line.split()[1] for line in f if line.split()[1].startswith(d.dir + "/")]
    for target in reversed(left):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


REBASES = {"mergeRebase": merge_rebase, "optimizeChain": flatten, "optimizeBacking": localize}


def test_every_rebase_has_a_cut_header_scenario() -> None:
    assert set(REBASES) == set(rebasing_kinds())


def _cut_rebase(tmp_path: Any, kind: str, scenario: Callable[[Scene], None] | None = None
                ) -> tuple[Daemon, Scene, dict[str, Any]]:
    """The state a rebase fix cut right after qemu-img wrote its header leaves: qemu-img rebase
    copies the clusters, writes the new backing into the layer's header, and only then flushes
    its refcounts and L2 tables (qemu 7.2, seen with strace). Made here for real: the agent
    dies as the rebase step starts (journaled, qemu-img not started); then the same qemu-img
    rebase the agent runs is killed at its first fdatasync, by strace's fault injection, after
    the header is written and before the L2 tables are. Returns the stopped daemon, the scene
    and the fix's journal."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (make test installs it)")
    arm = str(tmp_path / "armed")
    # Not taken up at start: these tests look at the state the cut left, before any mend.
    d = Daemon(str(tmp_path / "dev"),
               env={"STRATA_TEST_CRASH_AT": f"{kind}:rebase", "STRATA_TEST_CRASH_ARM": arm},
               resume=False)
    d.start()
    s = Scene(d, str(tmp_path), arm)
    (scenario or REBASES[kind])(s)
    assert d.proc is not None and d.proc.wait(60) == crashpoint.EXIT_CODE, d.read_log()
    root = os.path.join(d.dir, "repos", "default")
    [name] = os.listdir(os.path.join(root, "journal"))
    with open(os.path.join(root, "journal", name)) as f:
        op: dict[str, Any] = json.load(f)
    params = op["params"]
    layer = os.path.join(root, "volumes", f"{params['rewrites']}.qcow2")
    parent = params["new_parent_volume_id"]
    new = f"{parent}.qcow2" if parent else ""
    backing = ["-b", new, "-F", "qcow2"] if parent else ["-b", ""]
    cut = subprocess.run([strace, "-f", "-o", os.devnull, "-e", "inject=fdatasync:signal=KILL",
                          "qemu-img", "rebase", "-t", "none", "-T", "none", "-f", "qcow2",
                          *backing, layer], capture_output=True, text=True)
    assert cut.returncode != 0, cut  # killed, not finished
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", layer],
                                     capture_output=True, text=True, check=True).stdout)
    assert info.get("backing-filename", "") == new, info  # the header moved: the hazard
    d.env = {}
    return d, s, op


def _converge_and_verify(d: Daemon, s: Scene) -> None:
    for repo in s.roots:
        converge(d, repo)
    verify(d, s.expect, s.roots)
    assert d.stop() == 0


@pytest.mark.parametrize("kind", sorted(REBASES))
def test_a_rebase_cut_after_qemu_img_wrote_its_header_is_done_again(tmp_path: Any,
                                                                    kind: str) -> None:
    """The mend resumes the fix: the layer must read its bytes, and the old backing must not
    be cleaned away before it does. (optimizeBacking's new backing is a full copy of the old
    one, so its cut header loses nothing: that case checks the shortcut it keeps.)"""
    d, s, _ = _cut_rebase(tmp_path, kind)
    d.start()
    _converge_and_verify(d, s)


@pytest.mark.parametrize("kind", ["mergeRebase", "optimizeChain"])
def test_a_consumer_before_the_mend_reads_the_bytes_a_cut_rebase_left(tmp_path: Any,
                                                                      kind: str) -> None:
    """A VM started after the host came back, before anyone runs the mend: prepareImage drops
    the idle fix, and the chain it hands out must read every byte (the layer is pointed back
    at its old backing first)."""
    d, s, op = _cut_rebase(tmp_path, kind)
    d.start()
    image = op["image_id"]
    path = d.call("prepareImage", "default", image)["path"]
    try:
        assert qemu.reads_layout(path, s.expect[image])
    finally:
        d.call("teardownImage", "default", image)
    assert os.listdir(os.path.join(d.dir, "repos", "default", "journal")) == []
    _converge_and_verify(d, s)


def _merge_under_a_snapshot(s: Scene) -> None:
    """A merge by rebase whose rewritten layer is a snapshot's volume that a disk reads
    through: removing that snapshot leaves the layer in use."""
    d = s.disk((0x11, 0, MiB))
    gone = s.snapshot(d)
    s.write(d, (0x22, 2 * MiB, 2 * MiB))
    s.snapshot(d)  # the merge rewrites this one's volume, which d's top stands on
    s.write(d, (0x33, 6 * MiB, MiB))
    s.remove(gone)
    s.fix("merge")


@pytest.mark.parametrize("how", ["removeImage", "an older agent's removal"])
def test_a_layer_a_cut_rebase_left_is_put_back_when_its_fix_is_dropped_by_a_removal(
        tmp_path: Any, how: str) -> None:
    """The fix's own image is removed while the layer it rewrites stays in use by a disk. The
    layer is put back on its old backing before the fix goes: by removeImage itself, or (an
    image record an older agent left without its fix, the journal still there) by the clean
    that deletes the orphaned journal. The disk must read every byte at once, before any
    other fix (a merge proposed again would heal the layer too, and hide a miss)."""
    d, s, op = _cut_rebase(tmp_path, "mergeRebase", _merge_under_a_snapshot)
    snap = op["image_id"]
    if how == "removeImage":
        d.start()
        d.call("removeImage", "default", snap)
    else:
        record = os.path.join(d.dir, "repos", "default", "images", f"{snap}.json")
        with open(record) as f:
            image = json.load(f)
        image.update(removed=True, strong=False, fix_id=None)
        with open(record, "w") as f:
            json.dump(image, f)
        d.start()
        [clean] = d.call("checkStorageRepository", "default", {"types": ["clean"]})
        d.call("fixStorageRepository", "default", clean)
        assert os.listdir(os.path.join(d.dir, "repos", "default", "journal")) == []
    s.expect.pop(snap)
    [disk] = s.expect
    path = d.call("prepareImage", "default", disk)["path"]
    try:
        assert qemu.reads_layout(path, s.expect[disk])
    finally:
        d.call("teardownImage", "default", disk)
    _converge_and_verify(d, s)
