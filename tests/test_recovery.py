"""What recovering many pending operations costs: applying one fix, and the calls made while
many operations are pending, read the records of the images they are about, never those of
every other image (an Engine in-process, its repository's record reader counted)."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from agent import errors
from agent.repo import layout, localfs
from tests import qemu
from tests.conftest import Engine

MiB = qemu.MiB
PENDING = 30


@contextlib.contextmanager
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[collections.Counter[tuple[str, str]]]:
    """(kind, record id) -> how many times the repositories read it, while the block runs."""
    counted: collections.Counter[tuple[str, str]] = collections.Counter()
    real = localfs.LocalRepository._read

    def counting(self: localfs.LocalRepository, sub: str, rec_id: str, parse: Any) -> Any:
        counted[sub, rec_id] += 1
        return real(self, sub, rec_id, parse)

    with monkeypatch.context() as m:
        m.setattr(localfs.LocalRepository, "_read", counting)
        yield counted


def pending(engine: Engine) -> tuple[str, list[str]]:
    """A snapshot, and PENDING disks made from it whose creates wait for a mend."""
    disk = engine.call("createVirtualDisk", "r1", 64 * MiB)
    engine.settle("r1", disk)
    snap = engine.call("createSnapshot", "r1", disk)
    engine.settle("r1", snap)
    waiting = [engine.call("createVirtualDisk", "r1", 64 * MiB, snap, {}, {"AutoFix": False})
               for _ in range(PENDING)]
    return snap, waiting


def others(engine: Engine, images: list[str]) -> set[tuple[str, str]]:
    """The image records and journals of these images."""
    repo = engine.api.host.connection("r1").repo
    out = set()
    for image_id in images:
        img = repo.get_image(image_id)
        assert img is not None and img.operation_id is not None
        out |= {(layout.IMAGES, image_id), (layout.JOURNAL, img.operation_id)}
    return out


def test_applying_one_mend_reads_only_its_own_records(engine: Engine,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _, waiting = pending(engine)
    mends = engine.call("checkStorageRepository", "r1", {"types": ["mend"]})
    assert len(mends) == PENDING
    fix = mends[0]
    (mine,) = fix["imageIds"]
    unrelated = others(engine, [i for i in waiting if i != mine])
    with reads(monkeypatch) as counted:
        engine.call("fixStorageRepository", "r1", fix)
        engine.settle("r1", mine)
    assert counted, "the fix read nothing: the counter is not in the reader's path"
    assert not unrelated & set(counted), sorted(unrelated & set(counted))
    assert engine.call("getImageStatus", "r1", mine)["status"] == "optimized"
    # Still refused once done, as every stale fix is (derived from its records alone).
    with pytest.raises(Exception, match="does not match"):
        engine.call("fixStorageRepository", "r1", fix)
    left = engine.call("checkStorageRepository", "r1", {"types": ["mend"]})
    assert len(left) == PENDING - 1 and all(f["imageIds"] != [mine] for f in left)


def test_calls_beside_pending_operations_read_none_of_their_journals(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    snap, waiting = pending(engine)
    unrelated = {k for k in others(engine, waiting) if k[0] == layout.JOURNAL}
    disk = engine.call("createVirtualDisk", "r1", 64 * MiB, snap)
    engine.settle("r1", disk)
    with reads(monkeypatch) as counted:
        engine.call("prepareImage", "r1", disk)
        engine.call("teardownImage", "r1", disk)
        snap2 = engine.call("createSnapshot", "r1", disk)
        engine.settle("r1", snap2)
        engine.call("removeImage", "r1", snap2)
        more = engine.call("createVirtualDisk", "r1", 64 * MiB, snap)
        engine.settle("r1", more)
    assert counted
    assert not unrelated & set(counted), sorted(unrelated & set(counted))


def test_pending_operations_still_hold_what_they_claim(engine: Engine) -> None:
    """The journal index is a shortcut to the journals that name an image: what they claim
    still counts (a pending snapshot holds its disk: another image's journal names it)."""
    snap, waiting = pending(engine)
    disk = engine.call("createVirtualDisk", "r1", 64 * MiB, snap)
    engine.settle("r1", disk)
    taking = engine.call("createSnapshot", "r1", disk, {}, {"AutoFix": False})
    with pytest.raises(errors.ImageBusy, match=f"createSnapshot operation .* of image {taking}"):
        engine.call("prepareImage", "r1", disk)
    for fix in engine.call("checkStorageRepository", "r1", {"types": ["mend"]}):
        engine.call("fixStorageRepository", "r1", fix)
    for image_id in [*waiting, taking]:
        assert engine.settle("r1", image_id)["status"] == "optimized"
    assert engine.call("checkStorageRepository", "r1", {"types": ["mend"]}) == []
    engine.call("prepareImage", "r1", disk)  # free again once the snapshot is taken
    engine.call("teardownImage", "r1", disk)
