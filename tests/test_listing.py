"""listImages pages and filters: in-process on real repositories (Engine), and the selection
itself (agent.image.listing) on many generated records, with seeded random ties and filters."""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import pytest

from agent import errors
from agent.image import listing, model
from tests import qemu
from tests.conftest import Engine

MiB = qemu.MiB


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["imageId"] for r in rows]


def pages(e: Engine, repo: str, options: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Every page, following nextCursor to the end."""
    out = []
    opts = dict(options)
    for _ in range(100):
        page = e.call("listImages", repo, opts)
        assert set(page) == {"images", "nextCursor"}, page
        out.append(page["images"])
        if page["nextCursor"] is None:
            return out
        opts["cursor"] = page["nextCursor"]
    raise AssertionError("more than 100 pages")


def make(e: Engine, n: int, user_data: Any = None) -> list[str]:
    made = []
    for i in range(n):
        d = e.call("createVirtualDisk", "r1", 64 * MiB, None,
                   user_data(i) if user_data else {"i": i})
        e.settle("r1", d)
        made.append(d)
    return made


def test_pages_give_every_image_once_in_the_listing_order(engine: Engine) -> None:
    disks = make(engine, 5)
    snaps = [engine.call("createSnapshot", "r1", d) for d in disks[:2]]
    for s in snaps:
        engine.settle("r1", s)
    everything = engine.call("listImages", "r1")
    assert isinstance(everything, list)  # no limit: the bare list, as before
    assert sorted(ids(everything)) == sorted(disks + snaps)
    assert everything == sorted(everything, key=lambda r: (r["created"], r["imageId"]))

    got = pages(engine, "r1", {"limit": 3})
    assert [len(p) for p in got] == [3, 3, 1]
    assert [r for p in got for r in p] == everything
    # A limit that takes them all: one page, and no next one.
    assert engine.call("listImages", "r1", {"limit": 10000}) == {"images": everything,
                                                                 "nextCursor": None}
    # A cursor alone: the rest, as a page.
    first = engine.call("listImages", "r1", {"limit": 2})
    rest = engine.call("listImages", "r1", {"cursor": first["nextCursor"]})
    assert first["images"] + rest["images"] == everything and rest["nextCursor"] is None


def test_images_made_or_removed_between_pages_neither_repeat_nor_shift(engine: Engine) -> None:
    disks = make(engine, 6)
    first = engine.call("listImages", "r1", {"limit": 2})
    assert ids(first["images"]) == disks[:2]
    # The page's last image goes, one of the next page's too, and a new image is made.
    engine.call("removeImage", "r1", disks[1])
    engine.call("removeImage", "r1", disks[3])
    [late] = make(engine, 1)
    second = engine.call("listImages", "r1", {"limit": 2, "cursor": first["nextCursor"]})
    assert ids(second["images"]) == [disks[2], disks[4]]
    third = engine.call("listImages", "r1", {"limit": 2, "cursor": second["nextCursor"]})
    # The last page: nothing after it, so no cursor (no empty page to fetch).
    assert third == {"images": third["images"], "nextCursor": None}
    assert ids(third["images"]) == [disks[5], late]


def test_filters_by_kind_status_and_user_data(engine: Engine) -> None:
    disks = make(engine, 4, lambda i: {"vm": f"vm-{i % 2}", "n": i, "flag": i == 0,
                                       "tags": {"a": [1, i]}})
    snap = engine.call("createSnapshot", "r1", disks[0], {"vm": "vm-0"})
    engine.settle("r1", snap)
    # disks[3] turns broken: its data file is gone.
    os.unlink(engine.path("r1", disks[3]))

    def listed(**options: Any) -> list[str]:
        return ids(engine.call("listImages", "r1", options))

    assert listed(kind="snapshot") == [snap]
    assert listed(kind="disk") == disks
    assert listed(status="broken") == [disks[3]]
    assert listed(status=["optimized"]) == disks[:3] + [snap]
    assert listed(status=["optimized", "broken"]) == disks + [snap]
    assert listed(status="degraded") == []
    assert listed(userData={"vm": "vm-0"}) == [disks[0], disks[2], snap]
    assert listed(userData={"vm": "vm-0", "n": 2}) == [disks[2]]
    assert listed(userData={"n": 2.0}) == [disks[2]]  # JSON: 2 is 2.0
    assert listed(userData={"flag": True}) == [disks[0]]
    assert listed(userData={"n": True}) == []  # true is not 1
    assert listed(userData={"n": "2"}) == []  # nor "2"
    assert listed(userData={"tags": {"a": [1, 3]}}) == [disks[3]]
    assert listed(userData={"tags": {"a": [1]}}) == []
    assert listed(userData={"n": None}) == disks  # null: the key is there, any value
    assert listed(userData={"missing": None}) == []
    assert listed(userData={}) == disks + [snap]
    assert listed(kind="disk", status="optimized", userData={"vm": "vm-1"}) == [disks[1]]
    # Filters and pages together: a page holds only matches, and is full while more follow.
    got = pages(engine, "r1", {"limit": 1, "status": "optimized", "kind": "disk"})
    assert [ids(p) for p in got] == [[disks[0]], [disks[1]], [disks[2]], []]
    got = pages(engine, "r1", {"limit": 2, "userData": {"vm": "vm-0"}})
    assert [ids(p) for p in got] == [[disks[0], disks[2]], [snap]]


def test_pages_and_warnings_together(engine: Engine) -> None:
    disks = make(engine, 2)
    bad = os.path.join(engine.roots["r1"], "images", "0" * 8 + "-0000-4000-8000-" + "0" * 12
                       + ".json")
    with open(bad, "w") as f:
        f.write("{not json")
    page = engine.call("listImages", "r1", {"limit": 1, "withWarnings": True})
    assert set(page) == {"images", "nextCursor", "warnings"}
    assert ids(page["images"]) == disks[:1] and page["nextCursor"] is not None
    assert [w["file"] for w in page["warnings"]] == [bad]
    plain = engine.call("listImages", "r1", {"withWarnings": True})
    assert set(plain) == {"images", "warnings"} and ids(plain["images"]) == disks


BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"limit": 0}, "options.limit"),
    ({"limit": 10001}, "options.limit"),
    ({"limit": -5}, "options.limit"),
    ({"limit": "10"}, "options.limit"),
    ({"limit": True}, "options.limit"),
    ({"limit": 2.5}, "options.limit"),
    ({"cursor": ""}, "options.cursor"),
    ({"cursor": "not a cursor!"}, "options.cursor"),
    ({"cursor": "W10"}, "options.cursor"),  # base64 of [], valid but not ours
    ({"cursor": listing.encode_cursor((1.0, "x"))}, "options.cursor"),  # not an image id
    ({"cursor": 17}, "options.cursor"),
    ({"cursor": "A" * 300}, "options.cursor"),
    ({"status": "fine"}, "options.status"),
    ({"status": []}, "options.status"),
    ({"status": ["broken", 3]}, "options.status"),
    ({"userData": ["vm"]}, "options.userData"),
    ({"userData": "vm=1"}, "options.userData"),
    ({"kind": "volume"}, "options.kind"),
]


@pytest.mark.parametrize(("options", "named"), BAD_OPTIONS)
def test_a_bad_option_is_refused_naming_it(engine: Engine, options: dict[str, Any],
                                           named: str) -> None:
    with pytest.raises(errors.InvalidArgument) as e:
        engine.call("listImages", "r1", options)
    assert named in e.value.message and e.value.data == {"param": "options"}, e.value.message
    # ... before anything else: even for a repository that is not connected.
    with pytest.raises(errors.InvalidArgument):
        engine.call("listImages", "nowhere", options)


def test_a_limit_given_as_a_whole_float_is_a_limit(engine: Engine) -> None:
    disks = make(engine, 2)
    assert ids(engine.call("listImages", "r1", {"limit": 1.0})["images"]) == disks[:1]


# -- the selection on many records ---------------------------------------------------------


def image(rng: random.Random, created: float) -> model.Image:
    return model.Image(
        id=f"{rng.getrandbits(32):08x}-0000-4000-8000-{rng.getrandbits(48):012x}",
        kind=rng.choice(list(model.Kind)), size=MiB, volume_id="v", strong=rng.random() > 0.1,
        removed=rng.random() < 0.1, created=created,
        user_data={"vm": rng.choice(["a", "b", "c"])} if rng.random() < 0.8 else {})


@pytest.mark.parametrize("seed", range(40))
def test_every_page_of_a_large_listing_in_order_with_ties_and_filters(seed: int) -> None:
    rng = random.Random(seed)
    # Few distinct times: many images share one, and the order falls to the id.
    times = [1_700_000_000 + rng.random() for _ in range(rng.randint(1, 30))]
    records = [image(rng, rng.choice(times)) for _ in range(rng.randint(0, 3000))]
    status = {r.id: rng.choice(sorted(listing.STATUSES)) for r in records}
    options: dict[str, Any] = {"limit": rng.choice([1, 7, 100, 1000, 10000])}
    if rng.random() < 0.3:
        options["kind"] = rng.choice(["disk", "snapshot"])
    if rng.random() < 0.3:
        options["userData"] = rng.choice([{"vm": "a"}, {"vm": None}])
    if rng.random() < 0.5:
        options["status"] = rng.sample(sorted(listing.STATUSES), rng.randint(1, 2))
    if rng.random() < 0.3:
        options["includeIncomplete"] = True
    summarized: list[str] = []

    def summarize(img: model.Image) -> dict[str, Any]:
        summarized.append(img.id)
        return {"imageId": img.id, "created": img.created, "status": status[img.id]}

    q = listing.parse(options)
    expected = [r.id for r in sorted(records, key=listing.key)
                if listing.by_record(r, q)
                and status[r.id] in options.get("status", listing.STATUSES)]
    got: list[str] = []
    cursor = None
    for _ in range(len(records) + 2):
        q = listing.parse({**options, **({"cursor": cursor} if cursor else {})})
        summarized.clear()
        rows, cursor = listing.page(records, q, summarize)
        assert len(rows) <= options["limit"]
        if cursor is not None:
            assert len(rows) == options["limit"]  # a page short of its limit is the last
        # Only the images a page considers are summarized: its own, and those it turned down.
        assert len(summarized) == len(set(summarized))
        if "status" not in options:
            assert summarized == [r["imageId"] for r in rows]
        got += [r["imageId"] for r in rows]
        if cursor is None:
            break
    assert got == expected


def test_a_cursor_keeps_the_creation_time_exactly() -> None:
    for created in (1_700_000_000.123456789, 0.1 + 0.2, 1e-300, 2.0**60 + 0.5):
        key = (created, "12345678-0000-4000-8000-000000000000")
        assert listing.decode_cursor(listing.encode_cursor(key)) == key


def test_json_equality_of_user_data() -> None:
    same = listing.same
    assert same({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]})
    assert not same(True, 1) and not same(0, False) and not same(None, False)
    assert not same("1", 1) and not same([1], [1, 2]) and not same({"a": 1}, {"b": 1})
    deep: Any = 1
    for _ in range(5000):  # deeper than Python recurses: a record written by hand
        deep = [deep]
    assert same(deep, deep) and not same(deep, [deep])


def test_query_defaults_are_the_listing_of_old() -> None:
    assert listing.parse({}) == listing.Query()
    assert dataclasses.replace(listing.parse({"limit": 5}), limit=None, paged=False) \
        == listing.Query()
