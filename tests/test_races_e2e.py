"""Races between the calls that claim images, against the real daemon over its socket (issue 9).

Each scenario races two (or more) calls, each from its own client thread on its own connection,
many times, with seeded random timing: every side sleeps a random 0..X ms first
(``random.Random(seed)``). Whatever the interleaving, every call ends in success or a clear
domain error (never -32603, never a hang: every call has a timeout), and afterwards:

- every image reads the bytes it must (qemu-io, through its whole chain), at once and after
  the checker converged: fixes applied one at a time, waiting for what each starts, until
  checkStorageRepository proposes nothing, and a deep check finds nothing either;
- every volume file passes ``qemu-img check``, has a record (and every record a file), and no
  journal is left;
- every image left can be prepared, torn down and removed, and clean then reclaims everything;
- the daemon logged no internal error.

``STRATA_STRESS=N`` runs N times as many seeds (``make stress``). A seed that ever failed is
kept as a named regression case in the scenario's seed list.

The merge races (cases 1-3 of the issue) were seen on a repository where a check takes a while:
a fix was derived by one check and started after it, and what happened to its images in between
went unseen. Their repository (``Slow``) holds FILLERS other disks, so that a check there takes
tens of milliseconds, and the other side comes at a random moment around that check (its delay
is drawn in units of the check's own time, measured each iteration). The other cases need no
such help. ``STRATA_RACE_DEBUG=1`` (with ``-s``) prints each side's timing and outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from agent import repo as formats
from rpc import transport
from tests import qemu
from tests.conftest import (
    FORMATS,
    Daemon,
    GlusterPool,
    assert_nothing_mounted_under,
    engine_pool,
    shared_params,
    wait_joined,
)

pytestmark = [pytest.mark.e2e, pytest.mark.one_daemon]
MiB = qemu.MiB
SIZE = 64 * MiB
STRESS = max(1, int(os.environ.get("STRATA_STRESS", "1")))
FILLERS = 1600  # disks in the repository of the merge races (Slow)
# The same on a shared repository, where each disk made is slower (it gets its lease area
# too), and on a remote one, where each record read is a round trip: fewer make a check as
# slow, and making 1600 there takes minutes.
SHARED_FILLERS = 200
REMOTE_FILLERS = 40
CALL_TIMEOUT = 60.0
DEBUG = bool(os.environ.get("STRATA_RACE_DEBUG"))
ORDER = {"mend": 0, "merge": 1, "optimize": 2, "clean": 3}

IMAGE_NOT_FOUND, IMAGE_BUSY, NO_OPERATION, STALE_FIX = 1200, 1201, 1204, 1400
NOT_ANSWERING = 1106  # RepositoryUnavailable: a call that outlasted the agent's wait
INTERNAL = -32603
NOTHING: frozenset[Any] = frozenset()


# Formats whose every record read is a network round trip: an iteration there takes several
# times as long as on localfs (posixfs-1.0 here is a local XFS: as fast as localfs).
REMOTE_FORMATS = frozenset({"glusterfs-1.0"})


class Seeds(list[int]):
    """A scenario's seeds: its regression seeds, then n (times STRATA_STRESS) more. On a
    remote file system it runs its regression seeds and the first third of the others
    (``make stress`` runs more)."""

    def __init__(self, n: int, regressions: Iterable[int] = ()) -> None:
        self.kept = list(regressions)
        self.n = n
        super().__init__([*self.kept, *range(1, 1 + n * STRESS)])

    def on(self, repo_format: str) -> list[int]:
        if repo_format not in REMOTE_FORMATS:
            return list(self)
        return [*self.kept, *range(1, 1 + max(3, self.n // 3) * STRESS)]


def seeds(n: int, regressions: Iterable[int] = ()) -> Seeds:
    return Seeds(n, regressions)


def budget(seconds: float) -> pytest.MarkDecorator:
    """A test's time limit, grown with STRATA_STRESS."""
    return pytest.mark.timeout(60 + seconds * STRESS)


# -- outcomes and races -------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    ok: bool
    result: Any = None
    code: int | None = None
    message: str = ""

    def __repr__(self) -> str:
        return "ok" if self.ok else f"error {self.code}: {self.message[:200]}"


def attempt(c: transport.Client, method: str, *args: Any) -> Outcome:
    try:
        return Outcome(True, c.call(method, *args))
    except transport.RemoteError as e:
        return Outcome(False, code=e.code, message=e.message)


def allowed(what: str, o: Outcome, *codes: int) -> None:
    """A side of a race ends in success or in one of the domain errors that make sense."""
    assert o.ok or o.code in codes, f"{what}: {o!r}"


Side = Callable[[transport.Client], Outcome]


Delay = float | tuple[float, float]  # a side's random delay: 0..X ms, or lo..hi ms


def race(d: Daemon, rng: random.Random, delay: Delay | list[Delay], *sides: Side
         ) -> list[Outcome]:
    """Run the sides at once, each on its own thread and connection, each after its random
    delay (one for all sides, or one each); none may take over CALL_TIMEOUT."""
    bounds = delay if isinstance(delay, list) else [delay] * len(sides)
    delays = [rng.uniform(*b) if isinstance(b, tuple) else rng.uniform(0.0, b) for b in bounds]
    clients = [transport.Client(socket_path=d.socket, timeout=CALL_TIMEOUT) for _ in sides]
    out: list[Outcome | None] = [None] * len(sides)
    crashed: list[BaseException] = []
    t0 = time.monotonic()
    try:
        for c in clients:
            c.call("getHostInfo")  # connected before the start: the delays are the only skew
        barrier = threading.Barrier(len(sides))

        def run(i: int) -> None:
            try:
                barrier.wait(10)
                time.sleep(delays[i] / 1000)
                out[i] = sides[i](clients[i])
                if DEBUG:
                    print(f"side {i} after {delays[i]:.0f} ms, done at "
                          f"{(time.monotonic() - t0) * 1000:.0f} ms: {out[i]}"[:160])
            except BaseException as e:  # reported below, with the other sides' outcomes
                crashed.append(e)

        threads = [threading.Thread(target=run, args=(i,), daemon=True)
                   for i in range(len(sides))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CALL_TIMEOUT + 10)
        assert not any(t.is_alive() for t in threads), f"a call hung: {out}"
    finally:
        for c in clients:
            c.close()
    assert not crashed, f"a side failed: {crashed!r}; outcomes {out}"
    done = [o for o in out if o is not None]
    assert len(done) == len(sides)
    for o in done:
        assert o.code != INTERNAL, f"an internal error: {o!r}"
    return done


# -- the daemon and its repositories --------------------------------------------------------------


class Host:
    """The real daemon, fresh repositories on it, and what earlier iterations left verified.
    Its repositories are of ``repo_format``; an iteration's repositories, emptied after it,
    serve the next one (a shared repository costs a lockspace join and a mount to make)."""

    def __init__(self, tmp: str, repo_format: str = "localfs-1.0",
                 pool: GlusterPool | None = None) -> None:
        self.tmp = tmp
        self.format = repo_format
        self.pool = pool
        self.d = Daemon(os.path.join(tmp, "dev"), per_test=False)  # the module's: stop()
        self.d.start()
        self.roots: dict[str, str] = {}
        self.spare: list[str] = []  # connected and empty
        self._n = 0
        # Images and volumes made and verified before (the fillers; earlier iterations' images
        # kept in a slow repository): no race touches them, so they are not read again.
        self.known: set[str] = set()
        self.known_volumes: set[str] = set()
        self.slow: set[str] = set()  # repositories not deep-checked after every iteration

    def call(self, method: str, *args: Any) -> Any:
        c = transport.Client(socket_path=self.d.socket, timeout=CALL_TIMEOUT)
        try:
            return c.call(method, *args)
        finally:
            c.close()

    def repository(self, prefix: str) -> str:
        """A new empty repository (a spare one for an iteration's ``r`` repositories)."""
        if prefix == "r" and self.spare:
            return self.spare.pop()
        self._n += 1
        name = f"{prefix}{self._n}"
        # Volumes of the session's pool by a name of their own (the in-process suites use
        # r1 and r2 of the same pool).
        params = shared_params(self.format, self.tmp, f"races-{name}", self.pool)
        options = {} if self.format == "localfs-1.0" else {"ioTimeout": 1}
        self.call("formatStorageRepository", self.format, params, options)
        self.call("connectStorageRepository", name, self.format, params)
        wait_joined(lambda r: self.call("getStorageRepositoryInfo", r), name)
        self.roots[name] = params["path"] if self.format == "localfs-1.0" else \
            formats.FORMATS[self.format].location(params, os.path.join(self.d.dir, "run"))
        return name

    def give_back(self, name: str) -> None:
        """An iteration's repository, emptied: the next iteration's."""
        self.spare.append(name)

    def disconnect(self, name: str) -> None:
        self.call("disconnectStorageRepository", name, {"force": True})
        del self.roots[name]

    def keep(self, repo: str) -> None:
        """What a repository holds now was verified: later iterations leave it be."""
        self.known |= {i["imageId"] for i in self.call("listImages", repo)}
        self.known_volumes |= volume_files(self.roots[repo])[1]

    def log_errors(self) -> list[str]:
        with open(self.d.log, errors="replace") as f:
            return [line for line in f if "event=internal_error" in line
                    or "event=op_crashed" in line or "Traceback" in line]

    def stop(self) -> None:
        try:
            if self.d.proc is not None and self.d.proc.poll() is None:
                assert self.d.stop() == 0, self.d.read_log()
        finally:
            assert_nothing_mounted_under(self.d.dir)


@pytest.fixture(scope="module", params=[
    # Each format's races on one worker (make test's pytest-xdist): they share this daemon.
    pytest.param(f, marks=pytest.mark.xdist_group(f"races-{f}")) for f in FORMATS])
def host(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Host]:
    """The daemon of every race, its repositories of one format (tests/conftest.py FORMATS)."""
    repo_format = str(request.param)
    h = Host(str(tmp_path_factory.mktemp("races")), repo_format,
             engine_pool(request, repo_format))
    try:
        yield h
    finally:
        h.stop()
    assert h.log_errors() == [], h.log_errors()[:20]


def settle(h: Host, repo: str, image_id: str, timeout: float = 60.0) -> dict[str, Any] | None:
    """Wait until nothing runs on the image (None: it is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s: dict[str, Any] = h.call("getImageStatus", repo, image_id)
        except transport.RemoteError as e:
            assert e.code == IMAGE_NOT_FOUND, e
            return None
        if not s["running"] and (
            s["status"] != "broken" or s["last_error"] or s["operation"] is None
        ):
            return s
        assert time.monotonic() < deadline, f"image {image_id} did not settle: {s}"
        time.sleep(0.01)


def converge(h: Host, repos: Iterable[str]) -> None:
    """Apply the proposed fixes one at a time (in the safe order), waiting for what each one
    starts, until no repository proposes anything. A finding for a person, or a fix that
    fails, means the repository cannot converge."""
    repos = list(repos)
    for _ in range(40):
        left = False
        for repo in repos:
            found = h.call("checkStorageRepository", repo)
            manual = [f for f in found if f.get("manual")]
            assert not manual, f"{repo}: a finding the checker cannot fix: {manual}"
            if not found:
                continue
            left = True
            f = min(found, key=lambda f: ORDER[f["type"]])
            try:
                h.call("fixStorageRepository", repo, f)
            except transport.RemoteError as e:
                assert e.code in (IMAGE_BUSY, STALE_FIX), e  # something still finishing
                time.sleep(0.02)
                break
            for image_id in f["imageIds"]:
                s = settle(h, repo, image_id)
                assert s is None or s["last_error"] is None, (f, s)
            break
        if not left:
            return
    left_over = {r: h.call("checkStorageRepository", r) for r in repos}
    raise AssertionError(f"did not converge: {left_over}")


def volume_files(root: str) -> tuple[set[str], set[str]]:
    """(volume ids that have a data file, volume ids that have a record)."""
    files = os.listdir(os.path.join(root, "volumes"))
    data = {f.split(".")[0] for f in files if not f.endswith(".json")}
    records = {f.split(".")[0] for f in files if f.endswith(".json")}
    return data, records


def check_files(h: Host, repo: str) -> None:
    """Every volume file is whole and named by a record, every record has its file, and no
    journal is left over."""
    root = h.roots[repo]
    data, records = volume_files(root)
    assert data == records, f"{repo}: volume files and records differ: {sorted(data ^ records)}"
    for f in os.listdir(os.path.join(root, "volumes")):
        if f.endswith(".qcow2") and f.split(".")[0] not in h.known_volumes:
            assert qemu.check_clean(os.path.join(root, "volumes", f)), (repo, f)
    assert os.listdir(os.path.join(root, "journal")) == [], repo


Expect = dict[str, list[qemu.Layout]]  # image id -> what it may read (any one of these)


def reads(h: Host, repo: str, image_id: str, *layouts: qemu.Layout) -> str:
    """Prepare the image, check that it reads one of the layouts whole, tear it down; its
    top volume's path."""
    info = h.call("prepareImage", repo, image_id)
    try:
        assert any(qemu.reads_layout(info["path"], layout) for layout in layouts), \
            f"{repo}: image {image_id} does not read what it must ({layouts})"
    finally:
        h.call("teardownImage", repo, image_id)
    return str(info["path"])


def verify(h: Host, expect: dict[str, Expect],
           may_go: Iterable[tuple[str, str]] = NOTHING) -> None:
    """After a race: every image settles, the repositories converge, every expected image is
    usable and reads its bytes (those in ``may_go`` may be gone instead), nothing else is
    there, and the files are whole. (A slow repository is deep-checked once, at the end: a
    deep check reads every filler's volume.)"""
    for repo, images in expect.items():
        for image_id in images:
            settle(h, repo, image_id)
    converge(h, expect)
    gone = set(may_go)
    for repo, images in expect.items():
        listed = {i["imageId"]: i for i in h.call("listImages", repo)}
        for image_id, layouts in images.items():
            if image_id not in listed:
                assert (repo, image_id) in gone, f"{repo}: image {image_id} is gone"
                continue
            assert listed[image_id]["status"] == "optimized", listed[image_id]
            reads(h, repo, image_id, *layouts)
        unknown = set(listed) - set(images) - h.known
        assert not unknown, f"{repo}: images nobody asked for: {unknown}"
        if repo not in h.slow:
            assert h.call("checkStorageRepository", repo, {"deep": True}) == [], repo
        check_files(h, repo)


def empty(h: Host, repos: Iterable[str], keep: Iterable[str] = NOTHING) -> None:
    """Remove every image but ``keep`` (each must be removable now) and converge: no volume may
    be left but theirs."""
    repos, keep = list(repos), set(keep)
    for repo in repos:
        for img in h.call("listImages", repo):
            if img["imageId"] not in keep:
                h.call("removeImage", repo, img["imageId"])
    converge(h, repos)
    for repo in repos:
        data, records = volume_files(h.roots[repo])
        assert data == records, (repo, sorted(data ^ records))
        left = {i["imageId"] for i in h.call("listImages", repo, {"includeIncomplete": True})}
        assert left == keep & left, f"{repo}: images left: {left - keep}"
        if not keep:
            assert not data, f"{repo}: volumes left after removing everything: {data}"


class Fresh:
    """Repositories made for one iteration: emptied (every image removable, nothing left)
    and disconnected after it."""

    def __init__(self, h: Host, n: int) -> None:
        self.h = h
        self.names = [h.repository("r") for _ in range(n)]

    def __enter__(self) -> list[str]:
        return self.names

    def __exit__(self, kind: object, *exc: object) -> None:
        emptied = False
        try:
            if kind is None:
                empty(self.h, self.names)
                emptied = True
        finally:
            for name in self.names:
                if emptied:
                    self.h.give_back(name)
                else:  # whatever a failed iteration left stays out of the next one's way
                    self.h.disconnect(name)


class Slow:
    """A repository where a check takes a while: FILLERS other disks, made once per module.
    The images of earlier iterations stay (verified; removed at the end of each test)."""

    def __init__(self, h: Host) -> None:
        self.h = h
        self.name = ""
        self.fillers: set[str] = set()
        self.reset()

    def reset(self) -> None:
        """A new one (when a failed iteration left the old one in a state it cannot leave)."""
        if self.name:
            self.h.disconnect(self.name)
        self.name = self.h.repository("slow")
        made: list[str] = []

        def make(n: int) -> None:
            c = transport.Client(socket_path=self.h.d.socket, timeout=CALL_TIMEOUT)
            try:
                made.extend(c.call("createVirtualDisk", self.name, SIZE) for _ in range(n))
            finally:
                c.close()

        n = FILLERS if self.h.format == "localfs-1.0" else \
            REMOTE_FILLERS if self.h.format in REMOTE_FORMATS else SHARED_FILLERS
        threads = [threading.Thread(target=make, args=(n // 2,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for image_id in made:
            settle(self.h, self.name, image_id)
        self.fillers = set(made)
        self.h.keep(self.name)
        self.h.slow.add(self.name)

    def empty(self) -> None:
        """At the end of a test: every image its iterations left can be removed, and clean
        reclaims them."""
        empty(self.h, [self.name], self.fillers)
        assert volume_files(self.h.roots[self.name])[1] <= self.h.known_volumes

    def deep_check(self) -> None:
        """Once, at the end (it reads every filler's volume): a deep check finds nothing.
        Converged once more first: on a shared repository a clean leaves what changed while
        it scanned to the next one (DESIGN.md), and the last iteration's clean may have been
        that scan. A deep check of 1600 fillers may outlast the agent's 30 s for a call (it
        answers RepositoryUnavailable and goes on): asked again until it answers."""
        converge(self.h, [self.name])
        deadline = time.monotonic() + 300
        while True:
            try:
                found = self.h.call("checkStorageRepository", self.name, {"deep": True})
                break
            except transport.RemoteError as e:
                assert e.code == NOT_ANSWERING and time.monotonic() < deadline, e
                time.sleep(30)  # the unanswered check goes on: not a second one beside it
        assert found == []


def tally(*outcomes: Outcome) -> str:
    """What the sides of one race ended in, for the summary: ok, or an error's code."""
    return "/".join("ok" if o.ok else str(o.code) for o in outcomes)


def run_seeds(h: Host, name: str, seed_list: Seeds, iteration: Callable[[int], str],
              after_failure: Callable[[], None] = lambda: None) -> None:
    """Every seed (of the host's format), even after one failed (to count them); then fail,
    naming the seeds. Prints how often each combination of outcomes came up (that the races
    do interleave)."""
    seed_list = seed_list.on(h.format)
    failed: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    started = time.monotonic()
    for seed in seed_list:
        errors_before = len(h.log_errors())
        try:
            combo = iteration(seed)
            seen[combo] = seen.get(combo, 0) + 1
            new = h.log_errors()[errors_before:]
            assert not new, f"internal errors in the daemon's log: {new[:5]}"
        except (AssertionError, transport.RemoteError) as e:
            failed.append((seed, f"{e.__class__.__name__}: {str(e)[:600]}"))
            if DEBUG:
                traceback.print_exc()
            with contextlib.suppress(AssertionError, transport.RemoteError):
                after_failure()
    report = (f"{name}: {len(failed)} of {len(seed_list)} iterations failed "
              f"({time.monotonic() - started:.1f} s); outcomes {seen}")
    print(report)
    assert not failed, report + "".join(f"\n  seed {s}: {m}" for s, m in failed)


# -- building blocks ----------------------------------------------------------------------------


def disk(h: Host, repo: str, layout: qemu.Layout) -> str:
    d: str = h.call("createVirtualDisk", repo, SIZE)
    settle(h, repo, d)
    write(h, repo, d, layout)
    return d


def write(h: Host, repo: str, image_id: str, layout: qemu.Layout) -> None:
    if not layout:
        return
    info = h.call("prepareImage", repo, image_id)
    try:
        for pattern, off, length in layout:
            qemu.write(info["path"], pattern, off, length)
    finally:
        h.call("teardownImage", repo, image_id)


def snapshot(h: Host, repo: str, disk_id: str) -> str:
    s: str = h.call("createSnapshot", repo, disk_id)
    st = settle(h, repo, s)
    assert st is not None and st["status"] == "optimized", st
    return s


def over(*layers: qemu.Layout) -> qemu.Layout:
    """What a chain reads: later layers over earlier ones (ranges cut where they overlap)."""
    out: qemu.Layout = []
    for layer in layers:
        for pattern, off, length in layer:
            end = off + length
            cut: qemu.Layout = []
            for p, o, n in out:
                if o + n <= off or o >= end:
                    cut.append((p, o, n))
                    continue
                if o < off:
                    cut.append((p, o, off - o))
                if o + n > end:
                    cut.append((p, end, o + n - end))
            out = [*cut, (pattern, off, length)]
    return sorted(out, key=lambda x: x[1])


def merge_fix(h: Host, repo: str, folded: str, target: str, how: str) -> dict[str, Any]:
    """The merge fix that folds ``folded`` into ``target`` (by ``how``: commit or rebase)."""
    found = [f for f in h.call("checkStorageRepository", repo, {"types": ["merge"]})
             if f["imageIds"] == [folded, target]]
    assert len(found) == 1 and how in found[0]["description"], found
    return found[0]  # type: ignore[no-any-return]


def consumer(repo: str, image_id: str, layout: qemu.Layout, wrote: list[str],
             patience: float = 30.0) -> Side:
    """A consumer that prepares the image as soon as it may (ImageBusy: it waits and asks
    again), writes ``layout`` through the path it got, and tears it down."""

    def side(c: transport.Client) -> Outcome:
        deadline = time.monotonic() + patience
        while True:
            p = attempt(c, "prepareImage", repo, image_id)
            if p.ok:
                break
            allowed("prepareImage", p, IMAGE_BUSY)
            assert time.monotonic() < deadline, p
            time.sleep(0.002)
        try:
            for pattern, off, length in layout:
                qemu.write(p.result["path"], pattern, off, length)
            wrote.append(image_id)
        finally:
            c.call("teardownImage", repo, image_id)
        return p

    return side


def then(*steps: Side) -> Side:
    """Several calls one after the other on one side; its outcome is the first call's."""

    def side(c: transport.Client) -> Outcome:
        outcomes = [step(c) for step in steps]
        return outcomes[0]

    return side


def call_side(method: str, *args: Any) -> Side:
    return lambda c: attempt(c, method, *args)


@pytest.fixture(scope="module")
def slow(host: Host) -> Slow:
    """The repository of the merge races; its deep check is the module's last test
    (``test_the_merge_races_leave_their_repository_sound``)."""
    return Slow(host)


def fix_starts(h: Host, image_id: str) -> int:
    """How many fixes the daemon started on an image so far (its log says each)."""
    with open(h.d.log, errors="replace") as f:
        return sum(1 for line in f if "event=fix_started" in line and f"image={image_id}" in line)


# -- 1. the same merge fix twice ------------------------------------------------------------------

SAME_FIX_TWICE = seeds(30)


def folded_disk(h: Host, r: str, base: qemu.Layout, top: qemu.Layout,
                then: Callable[[str], None] = lambda _snap: None,
                ) -> tuple[str, str, dict[str, Any], float]:
    """A disk over a removed snapshot: (disk, snapshot, the merge fix, how long the check that
    proposed it took, in ms). ``then``: done with the snapshot before the disk writes ``top``."""
    d = disk(h, r, base)
    s = snapshot(h, r, d)
    then(s)
    write(h, r, d, top)
    h.call("removeImage", r, s)
    started = time.monotonic()
    fix = merge_fix(h, r, s, d, "commit")
    return d, s, fix, (time.monotonic() - started) * 1000


@budget(200)  # the first of these makes the fillers, too
def test_the_same_merge_fix_twice_never_runs_twice(host: Host, slow: Slow) -> None:
    """A merge fix sent twice, a little apart (two clients, or a retry), while a consumer writes
    to the disk as soon as the first has run: the second is refused (StaleFix, or ImageBusy
    while the first runs) and the write is kept. Before the claim model, the second
    merge-by-commit ran again after the first and wrote the old top over the consumer's
    write."""
    base, top, mine = [(0x11, 0, 4 * MiB)], [(0x22, 0, 256 << 10)], [(0x33, 0, 128 << 10)]

    def iteration(seed: int) -> str:
        rng = random.Random(seed)
        r = slow.name
        d, _, fix, check_ms = folded_disk(host, r, base, top)
        started = fix_starts(host, d)
        wrote: list[str] = []
        # The retry comes around the end of the first one's check: where the old code derived
        # the fix again from a state the first was about to change.
        first, again = race(host.d, rng, [10, (1.4 * check_ms, 2.1 * check_ms)],
                            then(call_side("fixStorageRepository", r, fix),
                                 consumer(r, d, mine, wrote)),
                            call_side("fixStorageRepository", r, fix))
        for o in (first, again):
            allowed("fixStorageRepository", o, STALE_FIX, IMAGE_BUSY)
        assert wrote == [d]
        settle(host, r, d)
        want = over(base, top, mine)
        reads(host, r, d, want)  # at once, before any other fix could hide a miss
        assert fix_starts(host, d) - started <= 1, (first, again)
        verify(host, {r: {d: [want]}})
        host.keep(r)
        return tally(first, again)

    run_seeds(host, "same merge fix twice", SAME_FIX_TWICE, iteration, slow.reset)
    slow.empty()


# -- 2. a merge racing a copy that revives the snapshot it folds ----------------------------------

MERGE_VS_REVIVE = seeds(12)


@budget(200)  # the first of these makes the fillers, too
def test_a_merge_racing_a_copy_that_revives_its_snapshot(host: Host, slow: Slow) -> None:
    """The snapshot a merge folds was removed here but has a copy elsewhere, and is copied
    back (imageHints pointing there) while the merge fix is sent. Never both: the snapshot,
    if it is back, reads its own bytes and not the disk's newer ones, and never shares the
    disk's top volume. Before the claim model both succeeded: the merge committed the disk's
    top into the "immutable" snapshot."""
    base, top = [(0x11, 0, 4 * MiB)], [(0x22, 0, 256 << 10)]

    def iteration(seed: int) -> str:
        rng = random.Random(seed)
        r = slow.name
        with Fresh(host, 1) as [elsewhere]:
            def copied_elsewhere(snap: str) -> None:
                host.call("copyImage", elsewhere, snap)
                settle(host, elsewhere, snap)

            d, s, fix, check_ms = folded_disk(host, r, base, top, copied_elsewhere)
            # The copy comes while the merge's check runs, or just after it.
            merged, copied = race(
                host.d, rng, [10, 1.2 * check_ms],
                call_side("fixStorageRepository", r, fix),
                call_side("copyImage", r, s, None, {}, {"imageHints": {s: elsewhere}}))
            allowed("fixStorageRepository", merged, STALE_FIX, IMAGE_BUSY)
            allowed("copyImage", copied, IMAGE_BUSY)

            def separate() -> None:
                if copied.ok:
                    # Revived in place, or, when the merge sealed first (the copy waited for
                    # its finishing claim, then found the snapshot folded away), copied anew
                    # from elsewhere: listed once that copy's operation is done (seed 8).
                    settle(host, r, s)
                listed = {i["imageId"] for i in host.call("listImages", r)}
                assert (s in listed) == copied.ok, (listed, copied)
                mine = reads(host, r, d, over(base, top))
                if s in listed:
                    theirs = reads(host, r, s, base)
                    assert theirs != mine, "the snapshot shares the disk's top volume"

            settle(host, r, d)
            separate()  # at once
            verify(host, {r: {d: [over(base, top)], s: [base]}, elsewhere: {s: [base]}},
                   may_go=[] if copied.ok else [(r, s)])
            separate()
        host.keep(r)
        return tally(merged, copied)

    run_seeds(host, "merge vs revive", MERGE_VS_REVIVE, iteration, slow.reset)
    slow.empty()


# -- 3. a merge racing a snapshot of its disk ------------------------------------------------------

MERGE_VS_SNAPSHOT = seeds(12)


@budget(200)  # the first of these makes the fillers, too
def test_a_merge_racing_a_snapshot_of_its_disk(host: Host, slow: Slow) -> None:
    """A merge fix and a createSnapshot of its disk at once: one goes first, the other is
    refused or waits; never a merge that fails past its first step (before the claim model it
    did, and from then on prepareImage and removeImage answered ImageBusy for good). After
    the race the checker converges, every image can be prepared and removed, and reads the
    disk's bytes of the moment."""
    base, top = [(0x11, 0, 4 * MiB)], [(0x22, 0, 1 * MiB)]

    def iteration(seed: int) -> str:
        rng = random.Random(seed)
        r = slow.name
        d, _, fix, check_ms = folded_disk(host, r, base, top)
        # The snapshot comes while the merge's check runs (where the old code failed), or
        # just after, while the merge starts.
        merged, snapped = race(host.d, rng, [10, 1.2 * check_ms],
                               call_side("fixStorageRepository", r, fix),
                               call_side("createSnapshot", r, d))
        allowed("fixStorageRepository", merged, STALE_FIX, IMAGE_BUSY)
        allowed("createSnapshot", snapped, IMAGE_BUSY)
        want = over(base, top)
        images = {d: [want]}
        if snapped.ok:
            images[snapped.result] = [want]
        for image_id in images:
            s = settle(host, r, image_id)
            assert s is not None and s["last_error"] is None, s
        for image_id in images:
            reads(host, r, image_id, want)  # at once: usable, and right
        verify(host, {r: images})
        host.keep(r)
        return tally(merged, snapped)

    run_seeds(host, "merge vs snapshot", MERGE_VS_SNAPSHOT, iteration, slow.reset)
    slow.empty()


# -- 4. a copy racing the removal of its source ---------------------------------------------------

COPY_VS_REMOVE = seeds(16)


@budget(120)
def test_a_copy_racing_the_removal_of_its_source(host: Host) -> None:
    """copyImage of a snapshot into another repository while the snapshot is removed: the
    removal waits for the copy (ImageBusy while it runs) or comes first (the copy: not found).
    Never both with a copy left broken: before the claim model both succeeded most of the
    time, the copy stayed broken for good and the checker never converged."""
    base = [(0x11, 0, 8 * MiB)]  # enough that the copy's data step takes a while

    def iteration(seed: int) -> str:
        rng = random.Random(seed)
        with Fresh(host, 2) as [a, b]:
            d = disk(host, a, base)
            s = snapshot(host, a, d)
            # Both at (nearly) the same moment: the old code checked the source and committed
            # the copy under two different locks, and a removal slipped in between.
            copied, removed = race(host.d, rng, 4,
                                   call_side("copyImage", b, s),
                                   call_side("removeImage", a, s))
            allowed("copyImage", copied, IMAGE_NOT_FOUND)
            allowed("removeImage", removed, IMAGE_BUSY)
            assert copied.ok or removed.ok, (copied, removed)
            gone = ([(a, s)] if removed.ok else []) + ([] if copied.ok else [(b, s)])
            verify(host, {a: {d: [base], s: [base]}, b: {s: [base]}}, may_go=gone)
            if not copied.ok:
                incomplete = host.call("listImages", b, {"includeIncomplete": True})
                assert incomplete == [], incomplete
        return tally(copied, removed)

    run_seeds(host, "copy vs remove", COPY_VS_REMOVE, iteration)


# -- 5. the other calls that claim, pairwise ------------------------------------------------------

PAIRS = seeds(10)


@budget(80)
def test_prepare_racing_remove(host: Host) -> None:
    """Exactly one wins: a prepared image cannot be removed, a removed one cannot be
    prepared."""
    base, mine = [(0x11, 0, 2 * MiB)], [(0x44, 0, 64 << 10)]

    def iteration(seed: int) -> str:
        rng = random.Random(seed)
        with Fresh(host, 1) as [a]:
            d = disk(host, a, base)
            prepared, removed = race(host.d, rng, 30, call_side("prepareImage", a, d),
                                     call_side("removeImage", a, d))
            allowed("prepareImage", prepared, IMAGE_NOT_FOUND)
            allowed("removeImage", removed, IMAGE_BUSY)
            assert prepared.ok != removed.ok, (prepared, removed)
            want = base
            if prepared.ok:
                for pattern, off, length in mine:  # the consumer it was handed to writes
                    qemu.write(prepared.result["path"], pattern, off, length)
                host.call("teardownImage", a, d)
                want = over(base, mine)
            verify(host, {a: {d: [want]}}, may_go=[(a, d)] if removed.ok else [])
        return tally(prepared, removed)

    run_seeds(host, "prepare vs remove", PAIRS, iteration)


@budget(80)
def test_prepare_racing_the_merge_fix(host: Host) -> None:
    """A consumer asks for the disk while its merge fix is sent: it gets the disk when no fix
    rewrites its layers (a fix idle in its first step gives way), or waits; whatever it writes
    is kept."""
    base, top, mine = [(0x11, 0, 4 * MiB)], [(0x22, 0, 1 * MiB)], [(0x55, 0, 128 << 10)]

    def iteration(seed: int) -> str:
        rng = random.Random(seed)
        with Fresh(host, 1) as [a]:
            d, _, fix, _ = folded_disk(host, a, base, top)
            wrote: list[str] = []
            merged, _ = race(host.d, rng, [10, 40], call_side("fixStorageRepository", a, fix),
                             consumer(a, d, mine, wrote))
            allowed("fixStorageRepository", merged, STALE_FIX, IMAGE_BUSY)
            assert wrote == [d]
            want = over(base, top, mine)
            settle(host, a, d)
            reads(host, a, d, want)
            verify(host, {a: {d: [want]}})
        return tally(merged)

    run_seeds(host, "prepare vs merge", PAIRS, iteration)


@budget(80)
def test_teardown_racing_create_snapshot(host: Host) -> None:
    """A snapshot of a disk being torn down: taken after the teardown (reading what the
    consumer wrote), or refused while it is prepared."""
    base, mine = [(0x11, 0, 2 * MiB)], [(0x66, MiB, 128 << 10)]

    def iteration(seed: int) -> str:
        rng = random.Random(seed)
        with Fresh(host, 1) as [a]:
            d = disk(host, a, base)
            info = host.call("prepareImage", a, d)
            for pattern, off, length in mine:
                qemu.write(info["path"], pattern, off, length)
            torn, snapped = race(host.d, rng, 30, call_side("teardownImage", a, d),
                                 call_side("createSnapshot", a, d))
            assert torn.ok, torn
            allowed("createSnapshot", snapped, IMAGE_BUSY)
            want = over(base, mine)
            images = {d: [want]}
            if snapped.ok:
                images[snapped.result] = [want]
            verify(host, {a: images})
        return tally(torn, snapped)

    run_seeds(host, "teardown vs snapshot", PAIRS, iteration)


def pending_copy(h: Host, a: str, b: str, base: qemu.Layout) -> tuple[str, str, dict[str, Any]]:
    """A snapshot in ``a``, and its copy to ``b`` committed but not started (AutoFix false):
    (disk, snapshot, the copy's mend fix)."""
    d = disk(h, a, base)
    s = snapshot(h, a, d)
    assert h.call("copyImage", b, s, None, {}, {"AutoFix": False}) == s
    [mend] = [f for f in h.call("checkStorageRepository", b) if f["type"] == "mend"]
    assert mend["imageIds"] == [s], mend
    return d, s, mend


@budget(80)
def test_stop_operation_racing_a_mend_fix(host: Host) -> None:
    """stopOperation while the copy's mend fix starts it: stopped before it runs (the mend is
    stale), or stopped while it runs, or too late to stop (NoOperation); the copy still ends
    whole once the checker converges."""
    base = [(0x11, 0, 8 * MiB)]

    def iteration(seed: int) -> str:
        rng = random.Random(seed)
        with Fresh(host, 2) as [a, b]:
            d, s, mend = pending_copy(host, a, b, base)
            stopped, mended = race(host.d, rng, 40, call_side("stopOperation", b, s),
                                   call_side("fixStorageRepository", b, mend))
            allowed("stopOperation", stopped, NO_OPERATION, IMAGE_BUSY)
            allowed("fixStorageRepository", mended, STALE_FIX, IMAGE_BUSY)
            verify(host, {a: {d: [base], s: [base]}, b: {s: [base]}})
        return tally(stopped, mended)

    run_seeds(host, "stop vs mend", PAIRS, iteration)


@budget(80)
def test_remove_racing_a_mend_fix(host: Host) -> None:
    """removeImage of a copy while its mend fix starts it: removed (the mend is stale, or the
    copy is stopped and removed), or refused while it runs; never a copy that is removed and
    yet written, nor one left half made."""
    base = [(0x11, 0, 8 * MiB)]

    def iteration(seed: int) -> str:
        rng = random.Random(seed)
        with Fresh(host, 2) as [a, b]:
            d, s, mend = pending_copy(host, a, b, base)
            removed, mended = race(host.d, rng, 40, call_side("removeImage", b, s),
                                   call_side("fixStorageRepository", b, mend))
            allowed("removeImage", removed, IMAGE_BUSY)
            allowed("fixStorageRepository", mended, STALE_FIX, IMAGE_BUSY)
            verify(host, {a: {d: [base], s: [base]}, b: {s: [base]}},
                   may_go=[(b, s)] if removed.ok else [])
            if removed.ok:
                assert host.call("listImages", b, {"includeIncomplete": True}) == []
        return tally(removed, mended)

    run_seeds(host, "remove vs mend", PAIRS, iteration)


@budget(80)
def test_two_snapshots_of_one_disk_at_once(host: Host) -> None:
    """Two createSnapshot of one disk, and a consumer writing to it, at once: snapshots that
    both succeed were taken one after the other; each reads the disk's bytes of the moment it
    was taken (before or after the write, never a mix), and the disk keeps the write."""
    base, mine = [(0x11, 0, 2 * MiB)], [(0x77, 512 << 10, 256 << 10)]

    def iteration(seed: int) -> str:
        rng = random.Random(seed)
        with Fresh(host, 1) as [a]:
            d = disk(host, a, base)
            wrote: list[str] = []
            one, two, _ = race(host.d, rng, 30, call_side("createSnapshot", a, d),
                               call_side("createSnapshot", a, d),
                               consumer(a, d, mine, wrote))
            for o in (one, two):
                allowed("createSnapshot", o, IMAGE_BUSY)
            assert wrote == [d]
            images = {d: [over(base, mine)]}
            for o in (one, two):
                if o.ok:
                    images[o.result] = [base, over(base, mine)]
            verify(host, {a: images})
        return tally(one, two)

    run_seeds(host, "two snapshots", PAIRS, iteration)


@budget(80)
def test_remove_racing_the_merge_fix(host: Host) -> None:
    """The disk a merge fix folds into is removed as the fix is sent: removed first (the fix
    is stale), or the fix goes first (the removal stops it while its first step keeps every
    byte whole, or waits for what is left); either way nothing is left half done."""
    base, top = [(0x11, 0, 4 * MiB)], [(0x22, 0, 1 * MiB)]

    def iteration(seed: int) -> str:
        rng = random.Random(seed)
        with Fresh(host, 1) as [a]:
            d, _, fix, _ = folded_disk(host, a, base, top)
            merged, removed = race(host.d, rng, 40, call_side("fixStorageRepository", a, fix),
                                   call_side("removeImage", a, d))
            allowed("fixStorageRepository", merged, STALE_FIX, IMAGE_BUSY, IMAGE_NOT_FOUND)
            allowed("removeImage", removed, IMAGE_BUSY)
            verify(host, {a: {d: [over(base, top)]}}, may_go=[(a, d)] if removed.ok else [])
        return tally(merged, removed)

    run_seeds(host, "remove vs merge", PAIRS, iteration)


@budget(80)
def test_a_merge_a_snapshot_and_a_consumer_at_once(host: Host) -> None:
    """A merge fix, a createSnapshot of its disk and a consumer of the disk, all at once: the
    consumer's write is kept, and a snapshot reads the disk's bytes from before or after it,
    never a mix."""
    base, top, mine = [(0x11, 0, 4 * MiB)], [(0x22, 0, 1 * MiB)], [(0x88, 0, 128 << 10)]

    def iteration(seed: int) -> str:
        rng = random.Random(seed)
        with Fresh(host, 1) as [a]:
            d, _, fix, _ = folded_disk(host, a, base, top)
            wrote: list[str] = []
            merged, snapped, _ = race(host.d, rng, 40,
                                      call_side("fixStorageRepository", a, fix),
                                      call_side("createSnapshot", a, d),
                                      consumer(a, d, mine, wrote))
            allowed("fixStorageRepository", merged, STALE_FIX, IMAGE_BUSY)
            allowed("createSnapshot", snapped, IMAGE_BUSY)
            assert wrote == [d]
            images = {d: [over(base, top, mine)]}
            if snapped.ok:
                images[snapped.result] = [over(base, top), over(base, top, mine)]
            verify(host, {a: images})
        return tally(merged, snapped)

    run_seeds(host, "merge, snapshot and consumer", PAIRS, iteration)


# Its own test, last in the module, with a budget of its own: a deep check reads every one of
# the 1,600 fillers' volumes (serially), which in a module fixture's teardown counted against
# the budget of whichever race test ran last (CI, 2026-12-01: "Timeout (>140.0s)" twice).
@budget(300)
def test_the_merge_races_leave_their_repository_sound(slow: Slow) -> None:
    slow.deep_check()
