"""Planted files cannot reach outside the repository.

Records and volume files are untrusted input (DESIGN.md, "Ownership: one claim model"): whatever
is planted in a repository, nothing outside it is read, written or deleted. Each test plants
something, runs every call that could follow it (check, clean, merge, prepare, copy, remove) and
compares a tree outside the repository (content and mtimes) before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from typing import Any

import pytest

from agent import errors
from tests import qemu
from tests.conftest import Engine

MiB = qemu.MiB


def tree(root: str) -> dict[str, tuple[str, int, int]]:
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            with open(p, "rb") as f:
                out[p] = (hashlib.sha256(f.read()).hexdigest(), st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture
def outside(tmp_path: Any) -> str:
    """A tree beside the repositories, with a qcow2 of pattern 0x77 and plain files."""
    root = str(tmp_path / "outside")
    os.makedirs(os.path.join(root, "deep"))
    with open(os.path.join(root, "x.json"), "w") as f:
        f.write('{"precious": true}')
    with open(os.path.join(root, "deep", "secret.raw"), "wb") as f:
        f.write(b"S" * MiB)
    img = os.path.join(root, "foreign.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(16 * MiB)], check=True)
    qemu.write(img, 0x77, 0, MiB)
    return root


def _try(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except errors.Error:  # refusals are fine; anything else (-32603) fails the test
        return None


def every_call(e: Engine, images: list[str]) -> None:
    """Everything a client or an operator could run next: fix --all-style, then the calls."""
    for f in e.call("checkStorageRepository", "r1", {"deep": True}):
        if not f.get("manual"):
            _try(e.call, "fixStorageRepository", "r1", f)
            for image_id in f["imageIds"]:
                _try(e.settle, "r1", image_id)
    e.call("listImages", "r1", {"withWarnings": True})
    e.call("getStorageRepositoryInfo", "r1")
    for image_id in images:
        _try(e.call, "getImageStatus", "r1", image_id)
        _try(e.call, "getImageInfo", "r1", image_id)
        p = _try(e.call, "prepareImage", "r1", image_id)
        if p is not None:
            for link in p["chain"]:
                assert os.path.realpath(link["path"]).startswith(e.roots["r1"] + "/"), p
            e.call("teardownImage", "r1", image_id)
        copy = _try(e.call, "copyImage", "r2", image_id)
        if copy is not None:
            e.settle("r2", copy)
            path = _try(e.path, "r2", copy)
            assert path is None or not qemu.reads(path, 0x77, 0, MiB)  # no outside bytes
    for image_id in images:
        _try(e.call, "removeImage", "r1", image_id)
    for f in e.call("checkStorageRepository", "r1"):
        if f["type"] == "clean":
            e.call("fixStorageRepository", "r1", f)


def disk(e: Engine) -> str:
    d = e.call("createVirtualDisk", "r1", 16 * MiB)
    assert e.settle("r1", d)["status"] == "optimized"
    qemu.write(e.path("r1", d), 0x11, 0, MiB)
    return str(d)


def test_a_planted_record_with_a_path_for_an_id_deletes_nothing_outside(
        engine: Engine, outside: str) -> None:
    d = disk(engine)
    before = tree(outside)
    images = os.path.join(engine.roots["r1"], "images")
    rel = os.path.relpath(os.path.join(outside, "x"), images)
    name = str(uuid.uuid4())
    with open(os.path.join(images, f"{name}.json"), "w") as f:
        json.dump({"id": rel, "kind": "disk", "size": MiB, "volume_id": rel, "removed": True},
                  f)
    with open(os.path.join(images, "not-a-uuid.json"), "w") as f:
        json.dump({"id": rel, "kind": "disk", "size": MiB, "volume_id": rel}, f)
    vol = str(uuid.uuid4())
    vrel = os.path.relpath(os.path.join(outside, "deep", "secret"),
                           os.path.join(engine.roots["r1"], "volumes"))
    with open(os.path.join(engine.roots["r1"], "volumes", f"{vol}.json"), "w") as f:
        json.dump({"id": vrel, "format": "raw"}, f)
    found = engine.call("checkStorageRepository", "r1")
    assert sum(1 for f in found if f.get("manual")) == 3
    every_call(engine, [d, name])
    assert tree(outside) == before


def test_a_symlinked_volume_is_never_followed(engine: Engine, outside: str) -> None:
    d = disk(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    snap_file = engine.path("r1", s)
    engine.call("removeImage", "r1", s)  # a merge would write into the snapshot's layer
    os.unlink(snap_file)
    os.symlink(os.path.join(outside, "foreign.qcow2"), snap_file)
    before = tree(outside)
    st = engine.call("getImageStatus", "r1", d)
    assert st["status"] == "broken" and "symbolic link" in st["last_error"]
    with pytest.raises(errors.ImageBroken):
        engine.call("prepareImage", "r1", d)
    assert not [f for f in engine.call("checkStorageRepository", "r1") if f["type"] == "merge"]
    every_call(engine, [d])
    assert tree(outside) == before


def test_a_fifo_or_directory_where_a_volume_should_be_is_broken(engine: Engine) -> None:
    d, d2 = disk(engine), disk(engine)
    for image_id, plant in ((d, os.mkfifo), (d2, os.mkdir)):
        path = engine.path("r1", image_id)
        os.unlink(path)
        plant(path)
        assert engine.call("getImageStatus", "r1", image_id)["status"] == "broken"
        with pytest.raises(errors.ImageBroken):
            engine.call("prepareImage", "r1", image_id)
        with pytest.raises(errors.ImageBroken):
            engine.call("copyImage", "r2", image_id)
    assert len([f for f in engine.call("checkStorageRepository", "r1", {"deep": True})
                if f.get("manual")]) == 2


@pytest.mark.parametrize("spelling", ["absolute", "escape"])
def test_a_backing_file_outside_the_repository_is_never_handed_out_nor_copied(
        engine: Engine, outside: str, spelling: str) -> None:
    d = disk(engine)
    top = engine.path("r1", d)
    foreign = os.path.join(outside, "foreign.qcow2")
    ref = foreign if spelling == "absolute" else os.path.relpath(foreign, os.path.dirname(top))
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", ref, "-F", "qcow2", top],
                   check=True)
    before = tree(outside)
    assert engine.call("getImageStatus", "r1", d)["status"] == "broken"
    assert engine.call("listImages", "r1")[0]["status"] == "broken"
    with pytest.raises(errors.ImageBroken):
        engine.call("prepareImage", "r1", d)
    with pytest.raises(errors.ImageBroken):
        engine.call("copyImage", "r2", d)
    [finding] = [f for f in engine.call("checkStorageRepository", "r1") if f["type"] == "mend"]
    assert finding["manual"] and "a person must decide" in finding["description"]
    every_call(engine, [d])
    assert tree(outside) == before


def test_a_backing_named_elsewhere_by_its_own_name_is_refused_until_re_pointed(
        engine: Engine, outside: str) -> None:
    """An absolute path ending in the right volume's name (another mount): the image is not
    handed out, and the mend re-points the header without reading the other file."""
    d = disk(engine)
    s = engine.call("createSnapshot", "r1", d)
    engine.settle("r1", s)
    base = engine.path("r1", s)
    top = engine.path("r1", d)
    planted = os.path.join(outside, os.path.basename(base))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", planted, str(16 * MiB)],
                   check=True)
    qemu.write(planted, 0x77, 0, MiB)
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", planted, "-F", "qcow2",
                    top], check=True)
    before = tree(outside)
    with pytest.raises(errors.ImageBroken):
        engine.call("prepareImage", "r1", d)
    with pytest.raises(errors.ImageBroken):
        engine.call("copyImage", "r2", d)
    [mend] = [f for f in engine.call("checkStorageRepository", "r1") if f["type"] == "mend"]
    engine.call("fixStorageRepository", "r1", mend)
    assert qemu.info(top)["backing-filename"] == os.path.basename(base)
    assert qemu.reads(engine.path("r1", d), 0x11, 0, MiB)
    assert tree(outside) == before


def test_a_raw_file_planted_as_qcow2_is_never_probed(engine: Engine, outside: str) -> None:
    """A raw volume whose guest bytes look like a qcow2 backed by an outside file: read as raw,
    never probed, so the outside file is never opened."""
    d = disk(engine)
    top = engine.path("r1", d)
    raw = os.path.join(outside, "planted.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                    os.path.join(outside, "foreign.qcow2"), "-F", "qcow2", raw], check=True)
    vol_id = os.path.basename(top).split(".")[0]
    rec_path = os.path.join(engine.roots["r1"], "volumes", f"{vol_id}.json")
    with open(rec_path) as f:
        rec = json.load(f)
    rec["format"] = "raw"
    with open(rec_path, "w") as f:
        json.dump(rec, f)
    os.unlink(top)
    with open(raw, "rb") as src, open(top[: -len("qcow2")] + "raw", "wb") as dst:
        dst.write(src.read())
    before = tree(outside)
    copy = engine.call("copyImage", "r2", d)
    engine.settle("r2", copy)
    assert not qemu.reads(engine.path("r2", copy), 0x77, 0, MiB)
    every_call(engine, [d])
    assert tree(outside) == before


def test_format_refuses_a_path_inside_or_around_a_repository(engine: Engine, tmp_path: Any
                                                              ) -> None:
    r1 = engine.roots["r1"]
    for path in (os.path.join(r1, "volumes", "inner"), os.path.join(r1, "new"),
                 str(tmp_path)):
        with pytest.raises((errors.InvalidArgument, errors.RepositoryNotEmpty)) as caught:
            engine.call("formatStorageRepository", "localfs-1.0", {"path": path})
        assert path in caught.value.message
        assert not os.path.exists(os.path.join(path, "repository.json"))
    assert not os.path.exists(os.path.join(r1, "new"))
    engine.call("disconnectStorageRepository", "r2", {})
    with pytest.raises(errors.InvalidArgument):  # formatted, not connected: still refused
        engine.call("formatStorageRepository", "localfs-1.0",
                    {"path": os.path.join(engine.roots["r2"], "images", "x")})
    with pytest.raises(errors.RepositoryNotEmpty):
        engine.call("formatStorageRepository", "localfs-1.0", {"path": engine.roots["r2"]})
