"""The checker and the fixes on real qcow2 chains: merge, optimize, chain faults, clean.

Each fix is checked by the bytes every image reads afterwards, and by the next check not
proposing it again.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from agent import errors, fileio
from tests import qemu
from tests.conftest import FORMATS, Engine, engine_pool

MiB = qemu.MiB


@pytest.fixture(params=FORMATS)
def repo_format(request: pytest.FixtureRequest) -> str:
    """This suite runs on every format (tests/conftest.py FORMATS)."""
    return str(request.param)


@pytest.fixture
def shallow(request: pytest.FixtureRequest, tmp_path: Any, repo_format: str
            ) -> Iterator[Engine]:
    """An engine whose chains count as deep from 4 layers on."""
    e = Engine(str(tmp_path), max_chain_depth=3, repo_format=repo_format,
               pool=engine_pool(request, repo_format))
    yield e
    e.api.close()


def fixes(e: Engine, repo: str = "r1", **options: Any) -> list[dict[str, Any]]:
    return e.call("checkStorageRepository", repo, options)  # type: ignore[no-any-return]


def converge(e: Engine, repo: str = "r1") -> None:
    """Run proposed fixes one at a time, checking again after each, until nothing is left;
    every fix must finish."""
    order = {"mend": 0, "merge": 1, "optimize": 2, "clean": 3}
    for _ in range(20):
        found = [f for f in fixes(e, repo) if not f.get("manual")]
        if not found:
            return
        f = min(found, key=lambda f: order[f["type"]])
        e.call("fixStorageRepository", repo, f)
        for image_id in f["imageIds"]:
            try:
                st = e.settle(repo, image_id)
            except errors.ImageNotFound:
                continue  # a removed image, reclaimed by clean
            assert st["last_error"] is None, st
    raise AssertionError(f"did not converge: {fixes(e, repo)}")


def volume_files(e: Engine, repo: str = "r1") -> list[str]:
    return sorted(f for f in os.listdir(os.path.join(e.roots[repo], "volumes"))
                  if not f.endswith(".json"))


def snapshot(e: Engine, disk: str, repo: str = "r1") -> str:
    s = e.call("createSnapshot", repo, disk)
    assert e.settle(repo, s)["status"] == "optimized"
    return str(s)


def disk(e: Engine, size: int = 64 * MiB, repo: str = "r1") -> str:
    d = e.call("createVirtualDisk", repo, size)
    assert e.settle(repo, d)["status"] == "optimized"
    return str(d)


def test_merge_by_commit_folds_a_small_top_into_the_removed_snapshot(engine: Engine) -> None:
    d = disk(engine)
    qemu.write(engine.path("r1", d), 0x11, 0, 16 * MiB)
    s = snapshot(engine, d)
    qemu.write(engine.path("r1", d), 0x22, 0, MiB)  # a small top: commit writes less
    engine.call("removeImage", "r1", s)
    [merge] = fixes(engine)
    assert merge["type"] == "merge" and merge["imageIds"] == [s, d]
    assert "commit" in merge["description"]
    engine.call("fixStorageRepository", "r1", merge)
    assert engine.settle("r1", d)["status"] == "optimized"
    assert engine.call("getImageInfo", "r1", d)["chain"] == [d]
    path = engine.path("r1", d)
    assert qemu.reads(path, 0x22, 0, MiB) and qemu.reads(path, 0x11, MiB, 15 * MiB)
    [clean] = fixes(engine)  # the old top, nothing needs it now
    assert clean["type"] == "clean"
    engine.call("fixStorageRepository", "r1", clean)
    assert fixes(engine) == []
    assert volume_files(engine) == [os.path.basename(path)]
    assert qemu.check_clean(path)


def test_merge_by_rebase_when_the_snapshot_holds_less(engine: Engine) -> None:
    d = disk(engine)
    qemu.write(engine.path("r1", d), 0x11, 0, MiB)
    s = snapshot(engine, d)
    qemu.write(engine.path("r1", d), 0x22, 2 * MiB, 16 * MiB)  # a big top: rebase writes less
    top = engine.path("r1", d)
    engine.call("removeImage", "r1", s)
    [merge] = fixes(engine)
    assert "rebase" in merge["description"]
    engine.call("fixStorageRepository", "r1", merge)
    assert engine.settle("r1", d)["status"] == "optimized"
    assert engine.path("r1", d) == top  # the disk kept its volume, now standing alone
    assert "backing-filename" not in qemu.info(top)
    assert qemu.reads(top, 0x11, 0, MiB) and qemu.reads(top, 0x22, 2 * MiB, 16 * MiB)
    converge(engine)
    assert volume_files(engine) == [os.path.basename(top)]


def test_merge_into_a_snapshot_that_has_dependants(engine: Engine) -> None:
    d = disk(engine)
    qemu.write(engine.path("r1", d), 0x11, 0, 4 * MiB)
    s1 = snapshot(engine, d)
    qemu.write(engine.path("r1", d), 0x22, MiB, MiB)
    s2 = snapshot(engine, d)
    qemu.write(engine.path("r1", d), 0x33, 2 * MiB, MiB)
    engine.call("removeImage", "r1", s1)
    [merge] = fixes(engine)
    assert merge["imageIds"] == [s1, s2] and "rebase" in merge["description"]
    converge(engine)
    assert engine.call("getImageInfo", "r1", s2)["chain"] == [s2]
    assert engine.call("getImageInfo", "r1", d)["chain"] == [d, s2]
    p = engine.path("r1", d)
    assert qemu.reads(p, 0x11, 0, MiB) and qemu.reads(p, 0x22, MiB, MiB)
    assert qemu.reads(p, 0x33, 2 * MiB, MiB) and qemu.reads(p, 0x11, 3 * MiB, MiB)
    p2 = engine.path("r1", s2)
    assert qemu.reads(p2, 0x22, MiB, MiB) and qemu.reads(p2, 0, 2 * MiB, MiB) is False
    assert len(volume_files(engine)) == 2


def test_status_polled_through_merges_never_says_broken(engine: Engine) -> None:
    """getImageStatus and getImageInfo read a chain's records one by one while the fix relinks
    and seals it: a layer's record read before the relink, the fix's journal after the seal,
    once made the disk look broken for a moment (seen on GlusterFS, where those reads are slow:
    about 1 merge in 10). Every state they report is the disk degraded under its merge, then
    optimized."""
    for i in range(8):
        d = disk(engine)
        qemu.write(engine.path("r1", d), 0x11, 0, MiB)
        s = snapshot(engine, d)
        qemu.write(engine.path("r1", d), 0x22, 2 * MiB, 8 * MiB)
        engine.call("removeImage", "r1", s)
        [merge] = fixes(engine, types=["merge"])
        engine.call("fixStorageRepository", "r1", merge)
        while True:
            st = engine.call("getImageStatus", "r1", d)
            info = engine.call("getImageInfo", "r1", d)
            assert "chainError" not in info, (i, info)
            assert st["status"] in ("degraded", "optimized") and st["last_error"] is None, (i, st)
            if not st["running"] and st["status"] == "optimized":
                break
        engine.call("removeImage", "r1", d)


def test_clean_reclaims_the_lease_areas_of_images_gone_and_nothing_else(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every image of a shared repository has a 1 MiB lease area. Clean deletes those of
    images that are gone (no record, no journal) once nobody used them for LEASE_GRACE;
    never one a record names, one that is held, or a file that only looks like one."""
    from agent.fix import clean
    from agent.repo import leases

    keep = disk(engine)
    gone = disk(engine)
    snap = snapshot(engine, gone)
    engine.call("removeImage", "r1", gone)
    engine.call("removeImage", "r1", snap)
    converge(engine)  # within the grace: the areas stay
    area_dir = os.path.join(engine.roots["r1"], "leases")
    if engine.format == "localfs-1.0":
        assert not os.path.exists(area_dir)  # no leases on a local repository
        return
    for image_id in (keep, gone, snap):
        assert os.path.isfile(os.path.join(area_dir, f"{image_id}.lease")), image_id

    space = engine.api.host.connection("r1").repo.membership.space
    held = "00000000-0000-4000-8000-000000000001"  # a lease held here, of no image
    hold = space.acquire({held: leases.Mode.EXCLUSIVE}, "the test")
    planted = os.path.join(area_dir, "not-an-id.lease")
    with open(planted, "wb") as f:
        f.write(b"x")
    os.symlink(os.path.join(area_dir, f"{keep}.lease"),
               os.path.join(area_dir, "00000000-0000-4000-8000-000000000002.lease"))
    monkeypatch.setattr(clean, "LEASE_GRACE", 0.0)
    [fix] = [f for f in fixes(engine) if f["type"] == "clean"]
    assert "2 lease area(s) of images gone" in fix["description"], fix
    engine.call("fixStorageRepository", "r1", fix)
    left = sorted(os.listdir(area_dir))
    assert left == sorted(["ids", "repository.lease", f"{keep}.lease", f"{held}.lease",
                           "not-an-id.lease", "00000000-0000-4000-8000-000000000002.lease"])
    # The held one goes once it is let go; the disk kept works, and a new image gets an area.
    hold.release()
    converge(engine)
    assert f"{held}.lease" not in os.listdir(area_dir)
    qemu.write(engine.path("r1", keep), 0x44, 0, MiB)
    s2 = snapshot(engine, keep)
    assert os.path.isfile(os.path.join(area_dir, f"{s2}.lease"))
    assert qemu.reads(engine.path("r1", s2), 0x44, 0, MiB)


def test_no_merge_while_the_dependant_is_prepared(engine: Engine) -> None:
    d = disk(engine)
    s = snapshot(engine, d)
    engine.call("removeImage", "r1", s)
    engine.call("prepareImage", "r1", d)
    assert fixes(engine) == []
    engine.call("teardownImage", "r1", d)
    assert [f["type"] for f in fixes(engine)] == ["merge"]


def test_deep_chain_is_degraded_and_optimize_flattens_it(shallow: Engine) -> None:
    e = shallow
    d = disk(e)
    for i in range(4):
        qemu.write(e.path("r1", d), 0x10 + i, i * MiB, MiB)
        e.settle("r1", e.call("createSnapshot", "r1", d))
    assert e.call("getImageInfo", "r1", d)["depth"] == 5
    assert e.call("getImageStatus", "r1", d)["status"] == "degraded"
    found = fixes(e, types=["optimize"])
    assert {f["imageIds"][0] for f in found} >= {d}
    [mine] = [f for f in found if f["imageIds"] == [d]]
    e.call("fixStorageRepository", "r1", mine)
    assert e.settle("r1", d)["status"] == "optimized"
    assert e.call("getImageInfo", "r1", d)["depth"] == 2
    p = e.path("r1", d)
    for i in range(4):
        assert qemu.reads(p, 0x10 + i, i * MiB, MiB)
    assert not [f for f in fixes(e, types=["optimize"]) if f["imageIds"] == [d]]


def test_deep_check_finds_and_repairs_leaks(engine: Engine) -> None:
    d = disk(engine)
    qemu.write(engine.path("r1", d), 0x11, 0, MiB)
    path = engine.path("r1", d)
    qemu.leak_a_cluster(path)
    assert not qemu.check_clean(path)
    assert fixes(engine) == []  # a plain check reads metadata only
    [leak] = fixes(engine, deep=True)
    assert leak["type"] == "optimize" and "leaks 1 cluster" in leak["description"]
    engine.call("fixStorageRepository", "r1", leak)
    assert engine.settle("r1", d)["status"] == "optimized"
    assert qemu.check_clean(path) and qemu.reads(path, 0x11, 0, MiB)
    assert fixes(engine, deep=True) == []


def test_backing_named_by_absolute_path_is_relinked(engine: Engine) -> None:
    d = disk(engine)
    qemu.write(engine.path("r1", d), 0x11, 0, MiB)
    s = snapshot(engine, d)
    top, base = engine.path("r1", d), engine.path("r1", s)
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", base, "-F", "qcow2", top],
                   check=True)
    [mend] = fixes(engine)
    assert mend["type"] == "mend" and not mend.get("manual") and "re-point" in mend["description"]
    engine.call("fixStorageRepository", "r1", mend)
    assert qemu.info(top)["backing-filename"] == os.path.basename(base)
    assert qemu.reads(top, 0x11, 0, MiB)
    assert fixes(engine) == []


def test_faults_a_person_must_decide_are_reported_not_run(engine: Engine) -> None:
    d = disk(engine)
    s = snapshot(engine, d)
    other = disk(engine)
    top = engine.path("r1", d)
    # The top names another volume than the records say: which chain is right?
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b",
                    os.path.basename(engine.path("r1", other)), "-F", "qcow2", top], check=True)
    [finding] = fixes(engine)
    assert finding["manual"] and "a person must decide" in finding["description"]
    with pytest.raises(errors.ImageBroken):
        engine.call("fixStorageRepository", "r1", finding)
    assert qemu.info(top)["backing-filename"] == os.path.basename(engine.path("r1", other))
    # A missing record below the top: unknown parent, broken.
    snap_vol = os.path.basename(engine.path("r1", s)).split(".")[0]
    record = os.path.join(engine.roots["r1"], "volumes", f"{snap_vol}.json")
    saved = fileio.read_json(record)
    os.unlink(record)
    st = engine.call("getImageStatus", "r1", d)
    assert st["status"] == "broken" and "unknown parent" in st["last_error"]
    assert any(f.get("manual") and "unknown parent" in f["description"] for f in fixes(engine))
    fileio.write_json(record, saved)


def test_check_types_narrow_the_answer(engine: Engine) -> None:
    d = disk(engine)
    s = snapshot(engine, d)
    x = disk(engine)
    engine.call("removeImage", "r1", s)
    engine.call("removeImage", "r1", x)
    assert sorted(f["type"] for f in fixes(engine)) == ["clean", "merge"]
    assert [f["type"] for f in fixes(engine, types=["clean"])] == ["clean"]
    assert [f["type"] for f in fixes(engine, types=["merge"])] == ["merge"]
    assert fixes(engine, types=["optimize", "mend"]) == []


def test_a_copy_whose_source_is_gone_waits_and_completes_when_it_is_back(engine: Engine) -> None:
    d = disk(engine, repo="r2")
    qemu.write(engine.path("r2", d), 0x5C, 0, 2 * MiB)
    s = snapshot(engine, d, repo="r2")
    c = engine.call("copyImage", "r1", s, None, {}, {"AutoFix": False})
    engine.call("disconnectStorageRepository", "r2")
    [mend] = fixes(engine)
    assert mend["imageIds"] == [c] and "not in any connected repository" in mend["description"]
    engine.call("fixStorageRepository", "r1", mend)
    st = engine.settle("r1", c)
    assert st["status"] == "broken" and "not in any connected repository" in st["last_error"]
    [again] = fixes(engine)  # reported until the image is removed, or the source is back
    assert again["type"] == "mend"
    engine.call("connectStorageRepository", "r2", engine.format, engine.params["r2"])
    converge(engine)
    assert engine.settle("r1", c)["status"] == "optimized"
    assert qemu.reads(engine.path("r1", c), 0x5C, 0, 2 * MiB)


def test_a_backing_volume_in_another_repository_is_brought_home(engine: Engine) -> None:
    d2 = disk(engine, repo="r2")
    qemu.write(engine.path("r2", d2), 0x21, 0, 4 * MiB)
    s2 = snapshot(engine, d2, repo="r2")
    d = disk(engine)  # in r1, blank, then made to lean on s2's volume in r2
    top = engine.path("r1", d)
    qemu.write(top, 0x31, MiB, MiB)
    qemu.lean_on(top, engine.path("r2", s2), s2)

    st = engine.call("getImageStatus", "r1", d)
    assert st["status"] == "degraded", st
    prep = engine.call("prepareImage", "r1", d)
    engine.call("teardownImage", "r1", d)
    assert prep["chain"][1]["path"].startswith(engine.roots["r2"])
    # r2 must keep what r1 leans on, even once the snapshot there is removed.
    engine.call("removeImage", "r2", s2)
    assert fixes(engine, "r2") == [] or all(f["type"] != "merge" for f in fixes(engine, "r2"))
    for f in fixes(engine, "r2", types=["clean"]):
        engine.call("fixStorageRepository", "r2", f)
    assert os.path.exists(engine.path("r1", d))
    assert qemu.reads(top, 0x21, 0, MiB) and qemu.reads(top, 0x31, MiB, MiB)

    [home] = [f for f in fixes(engine) if f["type"] == "optimize"]
    assert "another repository" in home["description"]
    engine.call("fixStorageRepository", "r1", home)
    assert engine.settle("r1", d)["status"] == "optimized"
    chain = engine.call("prepareImage", "r1", d)["chain"]
    engine.call("teardownImage", "r1", d)
    assert all(link["path"].startswith(engine.roots["r1"]) for link in chain)
    assert qemu.reads(top, 0x21, 0, MiB) and qemu.reads(top, 0x31, MiB, MiB)
    assert qemu.reads(top, 0x21, 2 * MiB, 2 * MiB) and qemu.check_clean(top)
    assert fixes(engine) == []
    # Now nothing leans on r2: its clean reclaims the removed snapshot's bytes.
    converge(engine, "r2")
    assert len([f for f in os.listdir(os.path.join(engine.roots["r2"], "volumes"))
                if f.endswith(".qcow2")]) == 1  # d2's own top


def test_no_merge_into_a_volume_an_unfinished_create_stands_on(engine: Engine) -> None:
    d = disk(engine)
    qemu.write(engine.path("r1", d), 0x11, 0, 8 * MiB)
    s = snapshot(engine, d)
    qemu.write(engine.path("r1", d), 0x22, 0, MiB)
    x = engine.call("createVirtualDisk", "r1", 64 * MiB, s, {}, {"AutoFix": False})
    engine.call("removeImage", "r1", s)
    assert not [f for f in fixes(engine) if f["type"] == "merge"]
    converge(engine)
    assert qemu.reads(engine.path("r1", x), 0x11, 0, 8 * MiB)
    assert qemu.reads(engine.path("r1", d), 0x22, 0, MiB)


def test_a_snapshot_a_commit_has_written_into_is_never_revived(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    d = disk(engine, repo="r2")
    qemu.write(engine.path("r2", d), 0x11, 0, 8 * MiB)
    s = snapshot(engine, d, repo="r2")
    engine.call("copyImage", "r1", s)
    engine.settle("r1", s)
    d1 = engine.call("createVirtualDisk", "r1", 64 * MiB, s)
    engine.settle("r1", d1)
    qemu.write(engine.path("r1", d1), 0x22, 0, MiB)
    engine.call("removeImage", "r1", s)
    [merge] = fixes(engine)
    assert "commit" in merge["description"]
    # The commit is committed but never runs here (as if the host died in its first step).
    monkeypatch.setattr(engine.api.runner, "submit", lambda repo, op_id: None)
    engine.call("fixStorageRepository", "r1", merge)
    monkeypatch.undo()
    engine.call("prepareImage", "r1", d1)  # a consumer makes the idle fix give way
    engine.call("teardownImage", "r1", d1)
    with pytest.raises(errors.ImageBusy):
        engine.call("copyImage", "r1", s, None, {}, {"imageHints": {s: "r2"}})


def test_a_fix_with_only_metadata_left_finishes_before_its_image_goes(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    d = disk(engine)
    s = snapshot(engine, d)
    engine.call("removeImage", "r1", s)
    [merge] = fixes(engine)
    monkeypatch.setattr(engine.api.runner, "submit", lambda repo, op_id: None)
    engine.call("fixStorageRepository", "r1", merge)
    monkeypatch.undo()
    repo = engine.api.host.connection("r1").repo
    op = repo.get_operation(repo.get_image(d).fix_id)
    op.step = 1  # as if the host died after the data step
    repo.put_operation(op)
    with pytest.raises(errors.ImageBusy):
        engine.call("removeImage", "r1", d)
    converge(engine)
    engine.call("removeImage", "r1", d)


def test_a_fix_never_starts_on_an_image_prepared_while_it_was_checked(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.fix import check

    d = disk(engine)
    s = snapshot(engine, d)
    engine.call("removeImage", "r1", s)
    [merge] = fixes(engine)
    real = check.Checker.check
    landed: list[bool] = []

    def check_then_prepare(self: check.Checker, *a: Any, **k: Any) -> Any:
        found = real(self, *a, **k)
        if not landed:  # a consumer lands between the first look and the claim
            landed.append(True)
            engine.api.images.prepare("r1", d)
        return found

    monkeypatch.setattr(check.Checker, "check", check_then_prepare)
    with pytest.raises(errors.StaleFix):
        engine.call("fixStorageRepository", "r1", merge)
    monkeypatch.undo()
    assert engine.call("getImageInfo", "r1", d)["chain"] == [d, s]


def test_the_same_merge_sent_again_after_a_consumer_wrote_is_stale(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry, or a second client, sends the merge it was given once more while a check that
    began before the first one ended still sees it: it must not run again over what a consumer
    wrote since (a commit run twice folds the old top over it)."""
    from agent.fix import check

    d = disk(engine)
    qemu.write(engine.path("r1", d), 0x11, 0, 16 * MiB)
    s = snapshot(engine, d)
    qemu.write(engine.path("r1", d), 0x22, 0, MiB)
    engine.call("removeImage", "r1", s)
    [merge] = fixes(engine)
    assert "commit" in merge["description"]
    stale = engine.api._checker("r1").check()  # what a slow check derived before the merge
    engine.call("fixStorageRepository", "r1", merge)
    engine.settle("r1", d)
    qemu.write(engine.path("r1", d), 0x33, 0, MiB)  # the consumer goes on writing
    real = check.Checker.check
    looks: list[bool] = []

    def slow_first_look(self: check.Checker, *a: Any, **k: Any) -> Any:
        if not looks:  # the second sender's look began before the first merge ended
            looks.append(True)
            return stale
        return real(self, *a, **k)

    monkeypatch.setattr(check.Checker, "check", slow_first_look)
    with pytest.raises(errors.StaleFix):
        engine.call("fixStorageRepository", "r1", merge)
    monkeypatch.undo()
    assert qemu.reads(engine.path("r1", d), 0x33, 0, MiB)
    assert qemu.reads(engine.path("r1", d), 0x11, MiB, 15 * MiB)
    converge(engine)
    assert qemu.reads(engine.path("r1", d), 0x33, 0, MiB)


def test_a_fix_must_come_back_whole(engine: Engine) -> None:
    """Every field of a proposal is part of it: one changed, or one left out, and it is not the
    fix the checker proposed."""
    d = disk(engine)
    s = snapshot(engine, d)
    engine.call("removeImage", "r1", s)
    [merge] = fixes(engine)
    for field, value in (("description", merge["description"] + " please"),
                         ("imageIds", [d]), ("imageIds", [d, s]), ("type", "optimize")):
        with pytest.raises(errors.StaleFix):
            engine.call("fixStorageRepository", "r1", {**merge, field: value})
    assert engine.call("getImageInfo", "r1", d)["chain"] == [d, s]
    engine.call("fixStorageRepository", "r1", merge)
    assert engine.settle("r1", d)["last_error"] is None
    assert engine.call("getImageInfo", "r1", d)["chain"] == [d]


def test_applying_one_fix_looks_only_at_what_it_touches(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leak repair derived again before it runs checks its own volume with qemu-img, not the
    volume of every image (a deep check of the whole repository per applied fix)."""
    from agent import qemuimg

    leaky = []
    for _ in range(4):
        d = disk(engine)
        qemu.write(engine.path("r1", d), 0x11, 0, MiB)
        qemu.leak_a_cluster(engine.path("r1", d))
        leaky.append(d)
    found = [f for f in fixes(engine, deep=True) if "leaks" in f["description"]]
    assert sorted(i for f in found for i in f["imageIds"]) == sorted(leaky)
    checked: list[str] = []
    real = qemuimg.check

    def counting(path: str, *a: Any, **k: Any) -> Any:
        if k.get("repair") is None:
            checked.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(qemuimg, "check", counting)
    engine.call("fixStorageRepository", "r1", found[0])
    assert len(checked) == 2, checked  # its volume: before the claim, and again under it
    assert engine.settle("r1", found[0]["imageIds"][0])["last_error"] is None
