"""Damaged records are contained: each kind of damage, each call.

A record that cannot be read is a finding that names its file, never an internal error, never a
reason to break a call about another image, and never a reason for clean to delete what it might
still need (DESIGN.md, "Ownership: one claim model").
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from agent import fileio
from tests import qemu
from tests.conftest import Engine

MiB = qemu.MiB


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
