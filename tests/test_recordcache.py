"""What a listing answers from memory is what the records on storage say (agent/repo/recordcache.py,
agent/image/memo.py): every change Strata makes is seen by the very next call, on every format;
a record or a qcow2 header changed in place by something else is seen at the latest after
REVALIDATE, and at once by whatever reads it alone or decides under a claim."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from typing import Any

import pytest

from agent.image import memo, model
from agent.repo import layout, recordcache
from tests import qemu
from tests.conftest import FORMATS, Engine

MiB = qemu.MiB


@pytest.fixture(params=FORMATS)
def repo_format(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def quick_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records settle in 50 ms, not 2 s, so a test need not wait for the cache to trust them
    (the rule is the same, only the span)."""
    monkeypatch.setattr(recordcache, "SETTLED", 50_000_000)


def listed(e: Engine, repo: str = "r1") -> dict[str, dict[str, Any]]:
    return {i["imageId"]: i for i in e.call("listImages", repo, {"includeIncomplete": True})}


def disk(e: Engine, user_data: dict[str, Any] | None = None, repo: str = "r1") -> str:
    d = str(e.call("createVirtualDisk", repo, 16 * MiB, None, user_data or {}))
    assert e.settle(repo, d)["status"] == "optimized"
    return d


def test_every_change_strata_makes_is_in_the_next_listing(engine: Engine,
                                                           quick_settle: None) -> None:
    """Creates, user data changes, snapshots and removes in a seeded random order, at random
    short intervals, each followed at once by a listing and the repository's counts: the
    answers are always what the records say, never what a scan before kept."""
    rng = random.Random(1101)
    images: dict[str, dict[str, Any]] = {}
    for step in range(40):
        action = rng.choice(["create", "user", "user", "snapshot", "remove"] if images
                            else ["create"])
        if action == "create":
            d = disk(engine, {"n": step})
            images[d] = {"n": step}
        elif action == "user":
            d = rng.choice(sorted(images))
            images[d] = {"n": step, "pad": "x" * rng.randrange(3)}  # same size, or not
            engine.call("setImageUserData", "r1", d, images[d])
        elif action == "snapshot":
            disks = [i for i, v in listed(engine).items() if v["kind"] == "disk"]
            if not disks:
                continue
            s = str(engine.call("createSnapshot", "r1", rng.choice(disks)))
            engine.settle("r1", s)
            images[s] = {}
        else:
            d = rng.choice(sorted(images))
            engine.call("removeImage", "r1", d)
            del images[d]
        time.sleep(rng.uniform(0, 0.08))
        got = listed(engine)
        assert set(got) == set(images), f"step {step} ({action})"
        for i, want in images.items():
            if want:
                assert got[i]["userData"] == want, f"step {step} ({action}): {i}"
        counts = engine.call("getStorageRepositoryInfo", "r1")["images"]
        assert counts["disk"] + counts["snapshot"] == len(images), f"step {step}"


def test_a_record_edited_in_place_is_seen_within_the_bound_and_at_once_alone(
        engine: Engine, quick_settle: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Strata replaces records by renaming; an edit in place (another tool, a person) changes
    no directory, so a listing may answer from memory until REVALIDATE, but a read of the
    record alone and a fresh scan see it at once, and so does a listing after any other
    change in the directory."""
    monkeypatch.setattr(recordcache, "REVALIDATE", 1_500_000_000)
    d = disk(engine, {"who": "aaaa"})
    time.sleep(0.1)  # settled
    assert listed(engine)[d]["userData"] == {"who": "aaaa"}
    assert listed(engine)[d]["userData"] == {"who": "aaaa"}  # from memory now
    path = os.path.join(engine.roots["r1"], layout.IMAGES, f"{d}.json")
    with open(path, "r+b") as f:
        raw = f.read()
        assert raw.count(b'"aaaa"') == 1
        f.seek(0)
        f.write(raw.replace(b'"aaaa"', b'"bbbb"'))
    repo = engine.api.host.connection("r1").repo
    fresh = {i.id: i for i in repo.scan_images(fresh=True)[0]}
    assert fresh[d].user_data == {"who": "bbbb"}
    assert engine.call("getImageInfo", "r1", d)["userData"] == {"who": "bbbb"}
    deadline = time.monotonic() + 10
    while listed(engine)[d]["userData"] != {"who": "bbbb"}:
        assert time.monotonic() < deadline, "an edit in place was never seen by a listing"
        time.sleep(0.1)
    # A change in the directory (another image) is seen at once, and so is an edit with it.
    with open(path, "r+b") as f:
        raw = f.read()
        f.seek(0)
        f.write(raw.replace(b'"bbbb"', b'"cccc"'))
    other = disk(engine)
    got = listed(engine)
    assert other in got and got[d]["userData"] == {"who": "cccc"}


def test_a_header_changed_in_place_breaks_the_image_in_listings_within_the_bound(
        engine: Engine, quick_settle: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A qcow2 header re-pointed by hand (qemu-img rebase -u, outside Strata) makes the image
    broken: prepareImage refuses at once (it reads the files itself); a listing says so at
    the latest after REVALIDATE, since only sound files are ever taken from memory."""
    monkeypatch.setattr(memo, "REVALIDATE", 1_500_000_000)
    base = disk(engine)
    snap = str(engine.call("createSnapshot", "r1", base))
    engine.settle("r1", snap)
    assert listed(engine)[base]["status"] == "optimized"
    assert listed(engine)[base]["status"] == "optimized"
    top = engine.path("r1", base)
    elsewhere = os.path.join(os.path.dirname(top), "planted.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", elsewhere, str(16 * MiB)],
                   check=True)
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "planted.qcow2", "-F",
                    "qcow2", top], check=True)
    try:
        with pytest.raises(Exception, match="cannot be used|backing"):
            engine.call("prepareImage", "r1", base)
        deadline = time.monotonic() + 10
        while listed(engine)[base]["status"] != "broken":
            assert time.monotonic() < deadline, "a re-pointed header never made it broken"
            time.sleep(0.1)
    finally:
        os.unlink(elsewhere)


def test_a_record_made_a_symlink_or_damaged_is_a_warning_in_the_next_listing(
        engine: Engine, quick_settle: None, tmp_path: Any) -> None:
    d, e2 = disk(engine), disk(engine)
    time.sleep(0.1)
    for _ in range(2):
        assert set(listed(engine)) >= {d, e2}
    path = os.path.join(engine.roots["r1"], layout.IMAGES, f"{d}.json")
    outside = str(tmp_path / "outside.json")
    with open(path) as f, open(outside, "w") as out:
        json.dump(json.load(f), out)
    os.unlink(path)
    os.symlink(outside, path)
    got = engine.call("listImages", "r1", {"withWarnings": True})
    assert d not in {i["imageId"] for i in got["images"]}
    assert [w for w in got["warnings"] if w["file"] == path], got["warnings"]
    os.unlink(path)
    with open(path, "w") as f:
        f.write("{not json")
    got = engine.call("listImages", "r1", {"withWarnings": True})
    assert d not in {i["imageId"] for i in got["images"]} and e2 in {
        i["imageId"] for i in got["images"]}
    assert [w for w in got["warnings"] if w["file"] == path], got["warnings"]


def test_a_record_too_young_to_tell_apart_is_never_kept(tmp_path: Any) -> None:
    """Like git's racy entries: a file changed within SETTLED of its read is parsed again at
    the next scan (a coarse clock could give its next change the same times)."""
    path = tmp_path / "r.json"
    path.write_text("{}")
    st = os.stat(path)
    c = recordcache.RecordCache()
    rec = model.Progress(1, "1/1", 100, None)
    c.put("images", "a", st, rec, max(st.st_mtime_ns, st.st_ctime_ns) + 1)
    assert c.get("images", "a", st) is None
    c.put("images", "a", st, rec, max(st.st_mtime_ns, st.st_ctime_ns) + recordcache.SETTLED)
    assert c.get("images", "a", st) is rec
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert c.get("images", "a", os.stat(path)) is None  # any change of its times: read again
    d = os.stat(tmp_path)
    c.remember("images", d, max(d.st_mtime_ns, d.st_ctime_ns) + 1, [rec], [])
    assert c.listing("images", d, max(d.st_mtime_ns, d.st_ctime_ns) + 2) is None

