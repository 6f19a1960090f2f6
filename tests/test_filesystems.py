"""Behaviour that depends on the file system: reflink clones, and running out of space."""

from __future__ import annotations

import logging
import os
import subprocess
from typing import Any

import pytest

from tests import mounts, qemu
from tests.conftest import Engine

pytestmark = pytest.mark.root
MiB = qemu.MiB


def _snapshot_to_clone(e: Engine) -> str:
    """In r1, on a file system that clones: a snapshot holding 64 MiB of 0x3C."""
    assert "reflink" in e.call("getStorageRepositoryInfo", "r1")["capabilities"]
    d = e.call("createVirtualDisk", "r1", 128 * MiB)
    e.settle("r1", d)
    qemu.write(e.path("r1", d), 0x3C, 0, 64 * MiB)
    s: str = e.call("createSnapshot", "r1", d)
    e.settle("r1", s)
    return s


def test_performance_copy_is_a_reflink_on_xfs(tmp_path: Any) -> None:
    with mounts.loop_mount(str(tmp_path), "xfs", 512) as mnt:
        e = Engine(mnt)
        try:
            s = _snapshot_to_clone(e)
            used = _used(mnt)
            clone = e.call("createVirtualDisk", "r1", 128 * MiB, s, {},
                           {"strategy": "performance"})
            assert e.settle("r1", clone)["status"] == "optimized"
            path = e.path("r1", clone)
            assert "backing-filename" not in qemu.info(path)
            assert qemu.reads(path, 0x3C, 0, 64 * MiB)
            # Shared extents, and no new data blocks: it is a clone, not a copy.
            frag = subprocess.run(["filefrag", "-v", path], capture_output=True,
                                  text=True).stdout
            assert "shared" in frag
            assert _used(mnt) - used < 8 * MiB
            # Writing to the clone leaves the snapshot as it was.
            qemu.write(path, 0x77, 0, MiB)
            assert qemu.reads(e.path("r1", s), 0x3C, 0, 64 * MiB)
        finally:
            e.api.close()


def test_a_clone_the_file_system_refuses_becomes_a_copy(tmp_path: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """btrfs clones, but not from a copy-on-write file into a no-copy-on-write one (EINVAL):
    with ``chattr +C`` on the volumes directory after the snapshot was written, the
    performance disk falls back to qemu-img convert and is still a whole, independent copy."""
    with mounts.loop_mount(str(tmp_path), "btrfs", 512) as mnt:
        e = Engine(mnt)
        try:
            s = _snapshot_to_clone(e)
            subprocess.run(["chattr", "+C", os.path.join(e.roots["r1"], "volumes")], check=True)
            with caplog.at_level(logging.INFO, logger="agent.image.operations"):
                copy = e.call("createVirtualDisk", "r1", 128 * MiB, s, {},
                              {"strategy": "performance"})
                st = e.settle("r1", copy)
            assert st["status"] == "optimized" and st["last_error"] is None
            assert "event=reflink_refused" in caplog.text
            assert "event=reflink " not in caplog.text
            path = e.path("r1", copy)
            assert "backing-filename" not in qemu.info(path)
            assert qemu.reads(path, 0x3C, 0, 64 * MiB)
            qemu.write(path, 0x77, 0, MiB)
            assert qemu.reads(e.path("r1", s), 0x3C, 0, 64 * MiB)
            assert e.call("checkStorageRepository", "r1") == []
        finally:
            e.api.close()


def test_out_of_space_copy_breaks_only_that_image_and_resumes(tmp_path: Any) -> None:
    src = Engine(str(tmp_path / "src"))
    with mounts.loop_mount(str(tmp_path), "ext4", 192) as mnt:
        small = {"path": os.path.join(mnt, "repo")}
        src.api.formatStorageRepository("localfs-1.0", small, {})
        src.api.connectStorageRepository("small", "localfs-1.0", small, {})
        try:
            d = src.call("createVirtualDisk", "r1", 256 * MiB)
            src.settle("r1", d)
            layout = qemu.fill(src.path("r1", d), 160 / 1024, chunk=32 * MiB)
            s = src.call("createSnapshot", "r1", d)
            src.settle("r1", s)
            # Something already in the small repository must come out unharmed.
            keep = src.call("createVirtualDisk", "small", 16 * MiB)
            src.settle("small", keep)
            qemu.write(src.path("small", keep), 0x42, 0, 4 * MiB)
            ballast = os.path.join(mnt, "ballast")
            subprocess.run(["fallocate", "-l", "100M", ballast], check=True)

            src.call("copyImage", "small", s)
            st = src.settle("small", s)
            assert st["status"] == "broken" and not st["running"]
            assert "No space" in st["last_error"], st
            leftovers = [f for f in os.listdir(os.path.join(small["path"], "volumes"))
                         if f.endswith(".partial")]
            assert leftovers == []  # the space taken by the failed copy was given back
            assert qemu.reads(src.path("small", keep), 0x42, 0, 4 * MiB)
            assert qemu.check_clean(src.path("small", keep))

            os.unlink(ballast)
            [mend] = src.call("checkStorageRepository", "small")
            assert mend["type"] == "mend" and "No space" in mend["description"]
            src.call("fixStorageRepository", "small", mend)
            assert src.settle("small", s)["status"] == "optimized"
            assert qemu.reads_layout(src.path("small", s), layout)
        finally:
            src.api.close()


def _used(mnt: str) -> int:
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_a_fix_that_runs_out_of_space_harms_nothing_and_succeeds_later(tmp_path: Any) -> None:
    with mounts.loop_mount(str(tmp_path), "ext4", 256) as mnt:
        e = Engine(mnt)
        try:
            d = e.call("createVirtualDisk", "r1", 128 * MiB)
            e.settle("r1", d)
            base = qemu.fill(e.path("r1", d), 48 / 1024, chunk=16 * MiB)
            s = e.call("createSnapshot", "r1", d)
            e.settle("r1", s)
            top = qemu.fill(e.path("r1", d), 64 / 1024, chunk=16 * MiB, offset=64 * MiB)
            e.call("removeImage", "r1", s)
            [merge] = e.call("checkStorageRepository", "r1", {})
            assert "rebase" in merge["description"]  # the top is larger: rebase writes less
            st = os.statvfs(mnt)
            ballast = os.path.join(mnt, "ballast")
            free = st.f_bavail * st.f_frsize
            subprocess.run(["fallocate", "-l", str(free - 16 * MiB), ballast], check=True)

            e.call("fixStorageRepository", "r1", merge)
            status = e.settle("r1", d)
            # The failed fix gave the disk back as it was, and says why it failed.
            assert status["status"] == "optimized" and "No space" in status["last_error"]
            path = e.path("r1", d)  # preparable, and the same bytes
            assert qemu.reads_layout(path, base) and qemu.reads_layout(path, top)
            assert qemu.check_clean(path)
            assert e.call("getImageInfo", "r1", d)["chain"] == [d, s]

            os.unlink(ballast)
            [again] = e.call("checkStorageRepository", "r1", {})
            assert again["type"] == "merge" and "last attempt failed" in again["description"]
            e.call("fixStorageRepository", "r1", again)
            assert e.settle("r1", d) == {**e.settle("r1", d), "status": "optimized",
                                          "last_error": None}
            assert e.call("getImageInfo", "r1", d)["chain"] == [d]
            assert qemu.reads_layout(path, base) and qemu.reads_layout(path, top)
        finally:
            e.api.close()
