"""Damaged records are contained: each kind of damage, each call.

A record that cannot be read is a finding that names its file, never an internal error, never a
reason to break a call about another image, and never a reason for clean to delete what it might
still need (DESIGN.md, "Ownership: one claim model").
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from agent import errors, fileio
from rpc import transport
from tests import qemu
from tests.conftest import FORMATS, Daemon, Engine, settle

MiB = qemu.MiB


@pytest.fixture(params=FORMATS)
def repo_format(request: pytest.FixtureRequest) -> str:
    """This suite runs on every format (tests/conftest.py FORMATS)."""
    return str(request.param)


def disk(e: Engine, repo: str = "r1", size: int = 16 * MiB) -> str:
    d = e.call("createVirtualDisk", repo, size)
    assert e.settle(repo, d)["status"] == "optimized"
    return str(d)


def snapshot(e: Engine, d: str, repo: str = "r1") -> str:
    s = e.call("createSnapshot", repo, d)
    assert e.settle(repo, s)["status"] == "optimized"
    return str(s)


def volume_of(e: Engine, repo: str, image_id: str) -> str:
    rec = fileio.read_json(os.path.join(e.roots[repo], "images", f"{image_id}.json"))
    return str(rec["volume_id"])


def record(e: Engine, repo: str, sub: str, rec_id: str) -> str:
    return os.path.join(e.roots[repo], sub, f"{rec_id}.json")


def checks(e: Engine, repo: str = "r1", **options: Any) -> list[dict[str, Any]]:
    return e.call("checkStorageRepository", repo, options)  # type: ignore[no-any-return]


def test_one_lost_volume_record_never_makes_clean_delete_a_layer_a_disk_reads(
        engine: Engine) -> None:
    d = disk(engine)
    qemu.write(engine.path("r1", d), 0x11, 0, MiB)
    s1 = snapshot(engine, d)
    qemu.write(engine.path("r1", d), 0x22, MiB, MiB)
    s2 = snapshot(engine, d)
    engine.call("removeImage", "r1", s1)  # s1's layer is now needed only through s2's record
    top = engine.path("r1", d)
    os.unlink(record(engine, "r1", "volumes", volume_of(engine, "r1", s2)))  # lost
    s1_file = f"{volume_of(engine, 'r1', s1)}.qcow2"
    for f in checks(engine):
        if f["type"] == "clean":
            engine.call("fixStorageRepository", "r1", f)
    assert s1_file in os.listdir(os.path.join(engine.roots["r1"], "volumes"))
    r = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x11 0 1M", top],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr


# -- each kind of damage x each call ----------------------------------------------------------

def _truncate(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _edit(path: str, **fields: Any) -> None:
    d = fileio.read_json(path)
    d.update(fields)
    with open(path, "w") as f:
        json.dump(d, f)


def _directory(path: str) -> None:
    os.unlink(path)
    os.mkdir(path)


def _symlink(path: str) -> None:
    away = path + ".away"
    os.rename(path, away)
    os.symlink(away, path)


def _empty(path: str) -> None:
    open(path, "wb").close()


IMAGE_DAMAGE: dict[str, Callable[[str], None]] = {
    "truncated": _truncate,
    "empty": _empty,
    "size-a-string": lambda p: _edit(p, size="big"),
    "kind-unknown": lambda p: _edit(p, kind="volume"),
    "progress-not-a-dict": lambda p: _edit(p, progress=[1, 2]),
    "id-disagrees-with-name": lambda p: _edit(p, id=str(uuid.uuid4())),
    "volume-id-a-path": lambda p: _edit(p, volume_id="../../../x"),
    "a-directory": _directory,
    "a-symlink": _symlink,
}
VOLUME_DAMAGE: dict[str, Callable[[str], None]] = {
    "truncated": _truncate,
    "parent-id-a-number": lambda p: _edit(p, parent_volume_id=5),
    "format-unknown": lambda p: _edit(p, format="vmdk"),
    "a-directory": _directory,
}


@dataclasses.dataclass
class Scene:
    e: Engine
    victim: str  # the disk whose state is damaged
    snap: str  # its snapshot (the disk stands on it)
    bystander: str  # a disk of the same repository nothing happened to
    files: list[str]  # every volume file of the repository before the damage

    def volume_dir(self) -> str:
        return os.path.join(self.e.roots["r1"], "volumes")


@pytest.fixture
def scene(engine: Engine) -> Scene:
    victim = disk(engine)
    qemu.write(engine.path("r1", victim), 0x11, 0, MiB)
    snap = snapshot(engine, victim)
    qemu.write(engine.path("r1", victim), 0x22, MiB, MiB)
    bystander = disk(engine)
    qemu.write(engine.path("r1", bystander), 0x33, 0, MiB)
    files = sorted(f for f in os.listdir(os.path.join(engine.roots["r1"], "volumes"))
                   if not f.endswith(".json"))
    return Scene(engine, victim, snap, bystander, files)


def _bystander_unharmed(sc: Scene, damaged_file: str | None) -> None:
    """Every call about another image, and every listing, answers; listings name the file."""
    e = sc.e
    assert e.call("getImageStatus", "r1", sc.bystander)["status"] == "optimized"
    listed = e.call("listImages", "r1", {"withWarnings": True})
    assert sc.bystander in [i["imageId"] for i in listed["images"]]
    assert isinstance(e.call("listImages", "r1"), list)  # the bare list, as before
    info = e.call("getStorageRepositoryInfo", "r1")
    if damaged_file is not None:
        assert damaged_file in [w["file"] for w in listed["warnings"]]
        assert info["images"]["disk"] >= 1
    assert e.call("getImageInfo", "r1", sc.bystander)["status"] == "optimized"
    p = e.call("prepareImage", "r1", sc.bystander)
    assert qemu.reads(p["path"], 0x33, 0, MiB)
    e.call("teardownImage", "r1", sc.bystander)
    copy = e.call("copyImage", "r2", sc.bystander)
    assert e.settle("r2", copy)["status"] == "optimized"
    assert qemu.reads(e.path("r2", copy), 0x33, 0, MiB)
    assert e.call("getStorageRepositoryInfo", "r2")["warnings"] == []


def _clean_keeps_everything(sc: Scene) -> None:
    for f in checks(sc.e):
        if f["type"] == "clean":
            sc.e.call("fixStorageRepository", "r1", f)
    left = sorted(f for f in os.listdir(sc.volume_dir()) if not f.endswith(".json"))
    assert set(sc.files) <= set(left)


@pytest.mark.parametrize("damage", sorted(IMAGE_DAMAGE))
def test_a_damaged_image_record_is_named_and_contained(scene: Scene, damage: str) -> None:
    sc, e = scene, scene.e
    path = record(e, "r1", "images", sc.victim)
    IMAGE_DAMAGE[damage](path)
    for method, args in (("getImageStatus", ()), ("getImageInfo", ()), ("prepareImage", ()),
                         ("removeImage", ())):
        with pytest.raises(errors.RecordDamaged) as caught:
            e.call(method, "r1", sc.victim, *args)
        assert caught.value.data["file"] == path and path in caught.value.message
    with pytest.raises(errors.RecordDamaged):
        e.call("copyImage", "r2", sc.victim)
    with pytest.raises(errors.RecordDamaged):
        e.call("createSnapshot", "r1", sc.victim)
    found = [f for f in checks(e) if f.get("manual") and path in f["description"]]
    assert len(found) == 1
    listed = e.call("listImages", "r1", {"withWarnings": True})
    assert sc.victim not in [i["imageId"] for i in listed["images"]]
    assert path in [w["file"] for w in e.call("getStorageRepositoryInfo", "r1")["warnings"]]
    _bystander_unharmed(sc, path)
    # The snapshot the damaged disk stands on is still usable (its own records are whole).
    assert e.call("getImageStatus", "r1", sc.snap)["status"] == "optimized"
    _clean_keeps_everything(sc)
    assert os.path.lexists(path)


@pytest.mark.parametrize("damage", sorted(VOLUME_DAMAGE))
def test_a_damaged_volume_record_makes_its_images_broken_and_nothing_else(
        scene: Scene, damage: str) -> None:
    sc, e = scene, scene.e
    path = record(e, "r1", "volumes", volume_of(e, "r1", sc.snap))  # under the victim's top
    VOLUME_DAMAGE[damage](path)
    for image_id in (sc.victim, sc.snap):
        st = e.call("getImageStatus", "r1", image_id)
        assert st["status"] == "broken" and path in st["last_error"], st
        info = e.call("getImageInfo", "r1", image_id)
        assert info["status"] == "broken" and path in info["chainError"]
        with pytest.raises(errors.ImageBroken):
            e.call("prepareImage", "r1", image_id)
    with pytest.raises(errors.ImageBroken):
        e.call("copyImage", "r2", sc.snap)
    listed = {i["imageId"]: i["status"] for i in e.call("listImages", "r1")}
    assert listed[sc.victim] == "broken" and listed[sc.snap] == "broken"
    found = checks(e)
    assert any(f.get("manual") and path in f["description"] for f in found)
    assert not [f for f in found if f["type"] == "merge"]
    _bystander_unharmed(sc, None)
    e.call("removeImage", "r1", sc.victim)  # a broken image can still be removed
    _clean_keeps_everything(sc)


def test_a_one_byte_journal_is_named_and_holds_clean_back(scene: Scene) -> None:
    sc, e = scene, scene.e
    pending = e.call("createVirtualDisk", "r1", 16 * MiB, None, {}, {"AutoFix": False})
    op_id = fileio.read_json(record(e, "r1", "images", pending))["operation_id"]
    path = record(e, "r1", "journal", op_id)
    with open(path, "wb") as f:
        f.write(b"{")
    st = e.call("getImageStatus", "r1", pending)
    assert st["status"] == "broken" and path in st["last_error"]
    assert e.call("getImageInfo", "r1", pending)["status"] == "broken"
    assert any(f.get("manual") and path in f["description"] for f in checks(e))
    _bystander_unharmed(sc, None)
    with pytest.raises(errors.ImageBroken):
        e.call("prepareImage", "r1", pending)
    _clean_keeps_everything(sc)
    assert os.path.exists(path)


def test_a_qcow2_cut_to_100_bytes_is_broken_and_a_deep_check_goes_on(scene: Scene) -> None:
    sc, e = scene, scene.e
    top = e.path("r1", sc.victim)
    with open(top, "r+b") as f:
        f.truncate(100)
    st = e.call("getImageStatus", "r1", sc.victim)
    assert st["status"] == "broken" and volume_of(e, "r1", sc.victim) in st["last_error"]
    with pytest.raises(errors.ImageBroken):
        e.call("prepareImage", "r1", sc.victim)
    found = checks(e, deep=True)
    assert any(f.get("manual") and sc.victim in f["imageIds"] for f in found)
    assert e.call("getImageStatus", "r1", sc.bystander)["status"] == "optimized"
    _bystander_unharmed(sc, None)
    _clean_keeps_everything(sc)


def test_a_deep_check_that_cannot_read_one_volume_reports_it_and_goes_on(scene: Scene) -> None:
    sc, e = scene, scene.e
    top = e.path("r1", sc.victim)
    with open(top, "r+b") as f:  # the header is whole; the tables qemu-img reads are gone
        f.truncate(65536 + 512)
    found = checks(e, deep=True)
    assert any(f.get("manual") and sc.victim in f["imageIds"]
               and volume_of(e, "r1", sc.victim) in f["description"] for f in found), found
    assert e.call("getImageStatus", "r1", sc.victim)["status"] == "broken"
    assert e.call("getImageStatus", "r1", sc.bystander)["status"] == "optimized"
    with pytest.raises(errors.ImageBroken):
        e.call("prepareImage", "r1", sc.victim)
    assert checks(e, deep=True, types=["optimize"]) is not None  # never fails as a whole


def test_the_real_daemon_answers_damage_with_named_errors_never_32603(daemon: Daemon) -> None:
    d = daemon
    root = d.call("getStorageRepositoryInfo", "default")["connectionParameters"]["path"]
    victim = d.call("createVirtualDisk", "default", 16 * MiB)
    settle(d.call, "default", victim)
    other = d.call("createVirtualDisk", "default", 16 * MiB)
    settle(d.call, "default", other)
    path = os.path.join(root, "images", f"{victim}.json")
    with open(path, "wb") as f:
        f.write(b'{"id": "')
    for method in ("getImageStatus", "getImageInfo", "prepareImage", "removeImage"):
        with pytest.raises(transport.RemoteError) as caught:
            d.call(method, "default", victim)
        assert caught.value.code == errors.RecordDamaged.code, caught.value
        assert path in str(caught.value)
    listed = d.call("listImages", "default", {"withWarnings": True})
    assert [i["imageId"] for i in listed["images"]] == [other]
    assert listed["warnings"][0]["file"] == path
    assert d.call("getStorageRepositoryInfo", "default")["warnings"][0]["file"] == path
    assert any(path in f["description"] for f in d.call("checkStorageRepository", "default"))
    assert d.call("getImageStatus", "default", other)["status"] == "optimized"
    assert "record_damaged" in d.read_log() and path in d.read_log()
