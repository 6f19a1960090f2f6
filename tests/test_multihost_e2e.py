"""Several hosts on one glusterfs-1.0 repository, real everywhere: a real GlusterFS volume, one
real sanlock daemon and one real strata-agent per simulated host (tests/cluster.py), every call
over the agents' own sockets, every byte checked with qemu-io/qemu-img through the paths each
host sees (its own FUSE mount, reached through ``Host.path``).

What the issue asks of the claim model across hosts (issue 10, "Multi-host tests"):

- two hosts racing for one image: at most one writer at a time; the loser gets ``LeaseHeld``
  naming the winner (or, once the winner's intent is journaled, ``ImageBusy`` naming its
  operation); the chain stays whole and no host's check proposes a mend;
- an operation running on one host: the other host's changes of its images fail at once with
  ``LeaseHeld``, its ``getImageStatus`` says ``runningOn`` that host and its check shows the
  operation as ``running``;
- ``prepareImage`` on a shared repository holds the image's lease for the consumer;
- a host joining and leaving while others work;
- clean on one host while another makes, prepares and copies images.

The takeover tests (a host killed, its storage cut, a frozen host) are elsewhere: they wait for
sanlock to declare a host dead (~70 s each). Nothing here waits for a host death.

Race seeds: every race draws its delays from ``random.Random(seed)``; a seed that ever failed
joins the scenario's REGRESSION list. ``STRATA_STRESS=N`` runs N times as many seeds.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from rpc import transport
from tests import cluster, conftest, gluster, qemu

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.root,
              pytest.mark.xdist_group("cluster")]

REPO = cluster.REPO_ID
MiB = qemu.MiB
STRESS = max(1, int(os.environ.get("STRATA_STRESS", "1")))
CALL_TIMEOUT = 60.0

IMAGE_NOT_FOUND, IMAGE_BUSY, STALE_FIX = 1200, 1201, 1400
LOCKSPACE_NOT_JOINED, LEASE_HELD = 1110, 1301


@pytest.fixture(autouse=True)
def _needs_gluster() -> None:
    reason = gluster.missing()
    if reason:
        pytest.skip(reason)
    if not cluster.has_driver():
        pytest.skip(f"the agent has no {cluster.REPO_FORMAT} repository format")


@pytest.fixture
def shared(cluster_hosts: Any, gluster_volume: gluster.Volume
           ) -> Callable[[int], list[cluster.Host]]:
    """``shared(n)``: n hosts with the module's volume connected as ``shared`` (io_timeout 1),
    each joined to its lockspace."""
    def make(n: int) -> list[cluster.Host]:
        hosts: list[cluster.Host] = cluster_hosts(n)
        cluster.connect_repository(hosts, gluster_volume, io_timeout=1)
        return hosts
    return make


def seeds(n: int, regressions: tuple[int, ...] = ()) -> list[int]:
    return [*regressions, *range(1, 1 + n * STRESS)]


# -- calls and their outcomes -------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """One call as its client saw it: the result, or the JSON-RPC error (code, data.name, the
    rest of data), and when it was sent and answered (monotonic seconds)."""

    ok: bool
    result: Any = None
    code: int | None = None
    name: str | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    message: str = ""
    t0: float = 0.0
    t1: float = 0.0

    def __repr__(self) -> str:
        return "ok" if self.ok else f"{self.name} ({self.code}) {self.data}: {self.message[:300]}"


def attempt(c: transport.Client, method: str, *args: Any) -> Outcome:
    t0 = time.monotonic()
    try:
        result = c.call(method, *args)
    except transport.RemoteError as e:
        data = dict(e.data or {})
        return Outcome(False, code=e.code, name=data.pop("name", None), data=data,
                       message=e.message, t0=t0, t1=time.monotonic())
    return Outcome(True, result, t0=t0, t1=time.monotonic())


def client(h: cluster.Host) -> transport.Client:
    return transport.Client(socket_path=h.socket, timeout=CALL_TIMEOUT)


def lease_held_by(o: Outcome, host_id: int) -> bool:
    """LeaseHeld naming ``host_id`` as a live host. (sanlock says "unknown" of a host until it
    has seen that host renew since it joined itself: a few seconds after a connect.)"""
    return (not o.ok and o.code == LEASE_HELD and o.name == "LeaseHeld"
            and o.data.get("hostId") == host_id
            and o.data.get("hostState") in ("live", "unknown"))


def assert_lease_held_by(o: Outcome, host_id: int, what: str) -> None:
    assert lease_held_by(o, host_id), f"{what}: expected LeaseHeld naming host {host_id}: {o!r}"


def race(rng: random.Random, max_delay_ms: float,
         *sides: tuple[cluster.Host, str, tuple[Any, ...]]) -> list[Outcome]:
    """The calls at once, each from its own thread on its own connection to its host, each
    after a random 0..max_delay_ms delay drawn from ``rng``."""
    delays = [rng.uniform(0, max_delay_ms) / 1000 for _ in sides]
    clients = [client(h) for h, _, _ in sides]
    out: list[Outcome | None] = [None] * len(sides)
    try:
        for c in clients:
            c.call("getHostInfo")  # connected before the start: the delays are the only skew
        barrier = threading.Barrier(len(sides))

        def run(i: int) -> None:
            barrier.wait(10)
            time.sleep(delays[i])
            _, method, args = sides[i]
            out[i] = attempt(clients[i], method, *args)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sides))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CALL_TIMEOUT + 10)
    finally:
        for c in clients:
            c.close()
    assert all(o is not None for o in out), f"a call did not return: {out}"
    return [o for o in out if o is not None]


# -- images and their bytes ---------------------------------------------------------------------


def settle(h: cluster.Host, image_id: str) -> dict[str, Any]:
    return conftest.settle(h.call, REPO, image_id, timeout=120)


def new_disk(h: cluster.Host, size: int, pattern: int, offset: int = 0,
             length: int = 1 * MiB) -> tuple[str, qemu.Layout]:
    """A disk made on ``h`` holding ``pattern`` at ``offset`` (written as a VM would, through
    the path prepareImage gave, in h's own mount)."""
    disk: str = h.call("createVirtualDisk", REPO, size)
    assert settle(h, disk)["status"] == "optimized"
    layout = [(pattern, offset, length)]
    write(h, disk, layout)
    return disk, layout


def write(h: cluster.Host, disk: str, layout: qemu.Layout) -> None:
    p = h.call("prepareImage", REPO, disk)
    try:
        for pattern, off, length in layout:
            qemu.write(h.path(p["path"]), pattern, off, length)
    finally:
        h.call("teardownImage", REPO, disk)


def reads(h: cluster.Host, image_id: str, layout: qemu.Layout) -> None:
    """``image_id`` reads ``layout`` on host ``h`` through its whole chain, and its top volume
    passes qemu-img check."""
    p = h.call("prepareImage", REPO, image_id)
    try:
        top = h.path(p["path"])
        assert qemu.reads_layout(top, layout), f"{image_id} on {h.name}: wrong bytes"
        assert qemu.check_clean(top), f"{image_id} on {h.name}: qemu-img check fails"
    finally:
        h.call("teardownImage", REPO, image_id)


def whole(hosts: list[cluster.Host], expected: dict[str, qemu.Layout],
          every_host: bool = True) -> None:
    """Every expected image is strong and optimized on every host and reads its bytes on every
    host (``every_host=False``: on one of them, in turn); every host lists exactly these
    images; no host's check proposes anything but clean fixes (no mend, no operation running
    anywhere, no finding)."""
    for n, h in enumerate(hosts):
        listed = {i["imageId"] for i in h.call("listImages", REPO)}
        assert listed == set(expected), (h.name, listed ^ set(expected))
        for i, (image_id, layout) in enumerate(sorted(expected.items())):
            info = h.call("getImageInfo", REPO, image_id)
            assert info["status"] == "optimized" and info["strong"], (h.name, info)
            assert "chainError" not in info, info
            if every_host or i % len(hosts) == n:
                reads(h, image_id, layout)
        not_clean = [f for f in h.call("checkStorageRepository", REPO) if f["type"] != "clean"]
        assert not_clean == [], (h.name, not_clean)


def reclaim(h: cluster.Host, rounds: int = 10) -> int:
    """Apply every clean fix ``h``'s check proposes until there is none; how many ran."""
    ran = 0
    for _ in range(rounds):
        cleans = h.call("checkStorageRepository", REPO, {"types": ["clean"]})
        if not cleans:
            return ran
        for fix in cleans:
            h.call("fixStorageRepository", REPO, fix)
            ran += 1
    raise AssertionError(f"clean did not converge on {h.name}")


def repo_root(h: cluster.Host) -> str:
    """The repository's root as ``h`` sees it: its agent's FUSE mount under its run_dir."""
    mounts = [m for m in h.fuse_mounts() if m.startswith(h.run_dir)]
    assert len(mounts) == 1, mounts
    return h.path(mounts[0])


# -- 1. two hosts racing for one image ----------------------------------------------------------

# Seed 9, CI of 2026-12-01: the winner let its lease go between the loser's refusal and its
# look at the owners (the loser said LeaseHeld naming host 0); the loser now tries again.
SNAPSHOT_RACE_REGRESSIONS: tuple[int, ...] = (9,)


@pytest.mark.timeout(180)
def test_two_hosts_snapshotting_one_disk_at_once_never_both_write_it(shared: Any) -> None:
    h1, h2 = shared(2)
    hosts = {1: h1, 2: h2}
    expected: dict[str, qemu.Layout] = {}
    tally = {"one won, LeaseHeld": 0, "one won, ImageBusy": 0, "both, in turn": 0}
    for seed in seeds(10, SNAPSHOT_RACE_REGRESSIONS):
        rng = random.Random(seed)
        maker = hosts[rng.choice((1, 2))]
        disk, layout = new_disk(maker, 64 * MiB, 1 + seed % 250, seed * MiB)
        o1, o2 = race(rng, 40, (h1, "createSnapshot", (REPO, disk)),
                      (h2, "createSnapshot", (REPO, disk)))
        won = [i for i, o in ((1, o1), (2, o2)) if o.ok]
        assert won, f"seed {seed}: nobody won: {o1!r} / {o2!r}"
        for i in won:
            settle(hosts[i], disk)
        snaps = [o.result for o in (o1, o2) if o.ok]
        for s in snaps:
            assert settle(h1, s)["status"] == "optimized", f"seed {seed}"
        chain = h2.call("getImageInfo", REPO, disk)["chain"]
        if len(won) == 2:
            # Both in turn: the second snapshot stands on the first, never beside it.
            assert chain[0] == disk and sorted(chain[1:]) == sorted(snaps), (seed, chain)
            tally["both, in turn"] += 1
        else:
            winner, loser = (o1, o2) if o1.ok else (o2, o1)
            winner_id = won[0]
            assert chain == [disk, winner.result], (seed, chain)
            if loser.code == LEASE_HELD:
                assert_lease_held_by(loser, winner_id, f"seed {seed}")
                tally["one won, LeaseHeld"] += 1
            else:
                # The winner's intent was journaled already (between its call's lease and its
                # operation's): the loser read it under its own lease, naming it.
                assert loser.code == IMAGE_BUSY and winner.result in loser.message, \
                    f"seed {seed}: {loser!r}"
                tally["one won, ImageBusy"] += 1
        for s in snaps:
            expected[s] = layout
        expected[disk] = layout
        for h in (h1, h2):
            mends = [f for f in h.call("checkStorageRepository", REPO) if f["type"] != "clean"]
            assert mends == [], (seed, h.name, mends)
    print(f"snapshot race outcomes: {tally}")
    # The race was real: some seeds had both calls meet at the lease.
    assert tally["one won, LeaseHeld"] > 0, tally
    whole([h1, h2], expected)


def test_while_one_host_copies_a_disk_the_other_cannot_change_it_and_sees_it_running_there(
        shared: Any) -> None:
    h1, h2 = shared(2)
    disk: str = h1.call("createVirtualDisk", REPO, 1024 * MiB)
    settle(h1, disk)
    p = h1.call("prepareImage", REPO, disk)
    layout = qemu.fill(h1.path(p["path"]), 0.5, chunk=64 * MiB)
    h1.call("teardownImage", REPO, disk)
    copy: str = h1.call("copyImage", REPO, disk, None, {}, {"strategy": "performance"})
    deadline = time.monotonic() + 30
    while not (s := h1.call("getImageStatus", REPO, copy))["running"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    c2 = client(h2)
    try:
        # Every change of the copy (written by host 1) or of its source (read by host 1) is
        # refused at once, naming host 1: none of them waits for the copy.
        refused = {
            "createSnapshot of the source": attempt(c2, "createSnapshot", REPO, disk),
            "removeImage of the source": attempt(c2, "removeImage", REPO, disk),
            "prepareImage of the source": attempt(c2, "prepareImage", REPO, disk),
            "removeImage of the copy": attempt(c2, "removeImage", REPO, copy),
            "stopOperation of the copy": attempt(c2, "stopOperation", REPO, copy),
            "setImageUserData of the copy": attempt(c2, "setImageUserData", REPO, copy,
                                                    {"by": "host2"}),
        }
        status = attempt(c2, "getImageStatus", REPO, copy)
        check = attempt(c2, "checkStorageRepository", REPO)
    finally:
        c2.close()
    # All of that happened while host 1 still copied (so none of it waited for the copy).
    assert h1.call("getImageStatus", REPO, copy)["running"], "the copy ended too soon"
    for what, o in refused.items():
        assert_lease_held_by(o, 1, what)
    assert status.ok and status.result["status"] == "broken" and status.result["running"], status
    assert status.result["runningOn"]["hostId"] == 1, status.result
    assert status.result["runningOn"]["alive"] is True, status.result
    assert check.ok, check
    running = [f for f in check.result if copy in f["imageIds"]]
    assert [f["type"] for f in running] == ["running"], check.result
    assert running[0]["manual"] is True and running[0]["runningOn"]["hostId"] == 1, running
    assert not [f for f in check.result if f["type"] == "mend"], check.result

    assert settle(h1, copy)["status"] == "optimized"
    # The copy reads the source's bytes, on either host; nothing is left to mend anywhere.
    a, b = (h2.call("prepareImage", REPO, i)["path"] for i in (disk, copy))
    try:
        assert qemu.same_content(h2.path(a), h2.path(b))
    finally:
        for i in (disk, copy):
            h2.call("teardownImage", REPO, i)
    whole([h1, h2], {disk: layout, copy: layout})
    assert h2.call("getImageInfo", REPO, copy)["userData"] == {}


# -- 2. prepareImage on a shared repository ----------------------------------------------------


def test_a_disk_prepared_on_one_host_cannot_be_snapshotted_removed_or_merged_by_another(
        shared: Any) -> None:
    h1, h2 = shared(2)
    disk, first = new_disk(h1, 64 * MiB, 11, 0)
    old: str = h1.call("createSnapshot", REPO, disk)
    settle(h1, old)
    second = [(12, 8 * MiB, MiB)]
    write(h1, disk, second)
    h1.call("removeImage", REPO, old)  # a removed snapshot under one layer: a merge to do
    layout = first + second

    p = h1.call("prepareImage", REPO, disk)
    lease = p["lease"]
    info = h1.call("getStorageRepositoryInfo", REPO)
    assert lease["lockspace"] == info["repoUUID"] and lease["resource"] == disk, lease
    assert lease["mode"] == "shared" and lease["offset"] == 0, lease
    assert os.path.isfile(h1.path(lease["path"])), lease  # the area a VM's lease manager uses
    # The same area in host 2's own mount.
    name = os.path.relpath(lease["path"], h1.fuse_mounts()[0])
    assert os.path.isfile(os.path.join(repo_root(h2), name)), name
    # The consumer writes through host 1's mount.
    qemu.write(h1.path(p["path"]), 13, 16 * MiB, MiB)
    layout += [(13, 16 * MiB, MiB)]

    # On host 2, every writer of the disk meets host 1's lease before it reads the disk's
    # record (a claim takes the leases first): LeaseHeld naming host 1, the consumer's host,
    # rather than ImageBusy naming the consumer, which the record would say only after.
    merges = [f for f in h2.call("checkStorageRepository", REPO) if f["type"] == "merge"]
    c2 = client(h2)
    try:
        refused = {
            "createSnapshot": attempt(c2, "createSnapshot", REPO, disk),
            "removeImage": attempt(c2, "removeImage", REPO, disk),
            "prepareImage": attempt(c2, "prepareImage", REPO, disk),
            **{f"merge fix {i}": attempt(c2, "fixStorageRepository", REPO, f)
               for i, f in enumerate(merges)},
        }
    finally:
        c2.close()
    for what, o in refused.items():
        assert_lease_held_by(o, 1, what)
    assert h2.call("getImageInfo", REPO, disk)["chain"] == [disk, old], "nothing was merged"

    assert h1.call("teardownImage", REPO, disk) == {"changed": True}
    # Once torn down, host 2 can: merge the removed snapshot away, snapshot, remove.
    merges = [f for f in h2.call("checkStorageRepository", REPO) if f["type"] == "merge"]
    assert len(merges) == 1 and merges[0]["imageIds"][0] in (disk, old), merges
    h2.call("fixStorageRepository", REPO, merges[0])
    assert settle(h2, disk)["status"] == "optimized"
    assert h2.call("getImageInfo", REPO, disk)["chain"] == [disk]
    snap: str = h2.call("createSnapshot", REPO, disk)
    settle(h2, snap)
    whole([h1, h2], {disk: layout, snap: layout})
    h2.call("removeImage", REPO, disk)
    reclaim(h2)
    whole([h1, h2], {snap: layout})



# -- 3. a host joining and leaving while others work ---------------------------------------------


def wait_lockspace(h: cluster.Host, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (ls := h.call("getStorageRepositoryInfo", REPO)["lockspace"])["state"] != state:
        assert ls["state"] != "failed" and time.monotonic() < deadline, ls
        time.sleep(0.1)


def work(h: cluster.Host, n: int, expected: dict[str, qemu.Layout]) -> tuple[str, str, str]:
    """One round of a host's work: a disk with data, a snapshot of it, a copy of the disk."""
    disk, layout = new_disk(h, 16 * MiB, 1 + (h.id * 37 + n) % 250, (n % 8) * MiB)
    snap: str = h.call("createSnapshot", REPO, disk)
    settle(h, snap)
    copy: str = h.call("copyImage", REPO, disk)
    assert settle(h, copy)["status"] == "optimized"
    expected.update({disk: layout, snap: layout, copy: layout})
    return disk, snap, copy


def test_a_host_joins_works_leaves_and_joins_again_while_two_others_work(
        shared: Any, cluster_hosts: Any, gluster_volume: gluster.Volume) -> None:
    h1, h2 = shared(2)
    # A VM's disk on host 1 throughout: another host's consumer never keeps host 3 from
    # leaving (its disconnect counted every prepared image of the repository, refusing with
    # ImageBusy whenever host 1 or 2 had one prepared).
    held, held_layout = new_disk(h1, 16 * MiB, 77)
    h1.call("prepareImage", REPO, held)
    expected: dict[str, qemu.Layout] = {}
    lock = threading.Lock()
    stop = threading.Event()
    rounds = {1: 0, 2: 0}
    crashed: list[str] = []

    def loop(h: cluster.Host) -> None:
        try:
            while not stop.is_set() or rounds[h.id] < 2:
                made: dict[str, qemu.Layout] = {}
                work(h, rounds[h.id], made)  # any error fails the test: none is expected
                with lock:
                    expected.update(made)
                rounds[h.id] += 1
        except Exception as e:
            crashed.append(f"{h.name} round {rounds[h.id]}: {e!r}")

    workers = [threading.Thread(target=loop, args=(h,)) for h in (h1, h2)]
    for t in workers:
        t.start()
    try:
        (h3,) = cluster_hosts(1)
        mine: dict[str, qemu.Layout] = {}
        for joins in range(2):
            h3.call("connectStorageRepository", REPO, cluster.REPO_FORMAT,
                    gluster_volume.params, {})
            # Joining: reads work, changes are refused at once, saying so.
            assert h3.call("getStorageRepositoryInfo", REPO)["lockspace"]["state"] == "joining"
            h3.call("listImages", REPO)
            early = attempt(h3.client(), "createVirtualDisk", REPO, 16 * MiB)
            assert early.code == LOCKSPACE_NOT_JOINED and early.name == "LockspaceNotJoined", \
                early
            assert early.data.get("state") == "joining", early
            wait_lockspace(h3, "joined")
            work(h3, joins, mine)
            if joins == 0:
                h3.call("disconnectStorageRepository", REPO)
                assert h3.call("listStorageRepositories") == []
    finally:
        stop.set()
        for t in workers:
            t.join(300)
    assert crashed == [], crashed
    assert min(rounds.values()) >= 2, rounds
    h1.call("teardownImage", REPO, held)
    expected[held] = held_layout
    expected.update(mine)
    whole([h1, h2, h3], expected, every_host=False)


# -- 4. clean on one host while another makes, prepares and copies images ------------------------


def test_clean_on_one_host_never_takes_what_another_host_makes_prepares_or_copies(
        shared: Any) -> None:
    h1, h2 = shared(2)
    expected: dict[str, qemu.Layout] = {}
    removed: list[str] = []
    stop = threading.Event()
    cleaner: dict[str, Any] = {"ran": 0, "refused": [], "error": None}

    def clean_loop() -> None:
        c = client(h1)
        try:
            while not stop.is_set():
                for fix in c.call("checkStorageRepository", REPO, {"types": ["clean"]}):
                    o = attempt(c, "fixStorageRepository", REPO, fix)
                    if o.ok:
                        cleaner["ran"] += 1
                    elif o.code in (STALE_FIX, LEASE_HELD, IMAGE_BUSY):
                        cleaner["refused"].append(o)  # documented: the state moved, or busy
                    else:
                        raise AssertionError(f"clean fix failed: {o!r}")
        except Exception as e:
            cleaner["error"] = repr(e)
        finally:
            c.close()

    t = threading.Thread(target=clean_loop)
    t.start()
    try:
        # A prepared disk held by its consumer (host 2) through all of it.
        vm, vm_layout = new_disk(h2, 16 * MiB, 99)
        vm_path = h2.path(h2.call("prepareImage", REPO, vm)["path"])
        for n in range(4):
            _, snap, _ = work(h2, n, expected)
            thin: str = h2.call("createVirtualDisk", REPO, 16 * MiB, snap)  # thin on it
            settle(h2, thin)
            expected[thin] = expected[snap]
            qemu.write(vm_path, 100 + n, (n + 1) * MiB, MiB)  # the consumer writes on
            vm_layout = vm_layout + [(100 + n, (n + 1) * MiB, MiB)]
            gone, _ = new_disk(h2, 16 * MiB, 200 + n)
            h2.call("removeImage", REPO, gone)  # something for clean to reclaim meanwhile
            removed.append(gone)
    finally:
        stop.set()
        t.join(120)
    assert cleaner["error"] is None, cleaner
    assert cleaner["ran"] > 0, cleaner  # clean really ran while host 2 worked
    # Nothing host 2 made or prepared was taken: every byte there, on both hosts.
    assert qemu.reads_layout(vm_path, vm_layout)
    h2.call("teardownImage", REPO, vm)
    expected[vm] = vm_layout
    whole([h1, h2], expected, every_host=False)
    # No journal left behind, and a final clean (host 2 idle) reclaims every removed image.
    reclaim(h1)
    for h in (h1, h2):
        assert os.listdir(os.path.join(repo_root(h), "journal")) == []
        assert h.call("checkStorageRepository", REPO) == []
        for gone in removed:
            o = attempt(h.client(), "getImageInfo", REPO, gone)
            assert o.code == IMAGE_NOT_FOUND, o
        names = set(os.listdir(os.path.join(repo_root(h), "images")))
        assert names == {f"{i}.json" for i in expected}, names
    whole([h1, h2], expected, every_host=False)


# -- 5. what one host lists of another host's changes -------------------------------------------


@pytest.mark.timeout(240)
def test_a_listing_on_one_host_shows_every_change_another_host_made_at_once(shared: Any) -> None:
    """Host 1 answers its listings and counts from the records it keeps in memory
    (agent/repo/recordcache.py); host 2 creates, renames user data and removes, at seeded
    random intervals. Every change host 2 made before host 1's call is in that call's answer:
    no lag for what Strata writes (DESIGN.md, "Scale")."""
    h1, h2 = shared(2)
    c1, c2 = client(h1), client(h2)
    try:
        for seed in seeds(3):
            rng = random.Random(1100 + seed)
            mine: dict[str, dict[str, Any]] = {
                i["imageId"]: i["userData"] for i in c1.call("listImages", REPO)}
            for step in range(12):
                what = rng.choice(["create", "user", "remove"] if mine else ["create"])
                if what == "create":
                    d = c2.call("createVirtualDisk", REPO, 16 * MiB, None, {"s": step})
                    settle(h2, d)
                    mine[d] = {"s": step}
                elif what == "user":
                    d = rng.choice(sorted(mine))
                    mine[d] = {"s": step, "seed": seed}
                    c2.call("setImageUserData", REPO, d, mine[d])
                else:
                    d = rng.choice(sorted(mine))
                    c2.call("removeImage", REPO, d)
                    del mine[d]
                time.sleep(rng.uniform(0, 0.3))
                got = {i["imageId"]: i["userData"] for i in c1.call("listImages", REPO)}
                assert got == mine, f"seed {seed} step {step} ({what})"
                counts = c1.call("getStorageRepositoryInfo", REPO)["images"]
                assert counts["disk"] + counts["snapshot"] == len(mine), (seed, step, counts)
            for d in list(mine):
                c2.call("removeImage", REPO, d)
    finally:
        c1.close()
        c2.close()
