"""Loop-mounted file systems for tests that need a specific file system or a full disk.

Needs root and loop devices (this machine has both; a developer laptop may not, and then the
test is skipped saying so).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def loop_mount(directory: str, fstype: str, size_mib: int) -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("loop mounts need root")
    mkfs = shutil.which(f"mkfs.{fstype}")
    if mkfs is None:
        pytest.skip(f"mkfs.{fstype} is not installed")
    image = os.path.join(directory, f"{fstype}.img")
    mnt = os.path.join(directory, f"{fstype}-mnt")
    os.makedirs(mnt)
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    opts = {"xfs": ["-m", "reflink=1"], "ext4": ["-E", "nodiscard"]}.get(fstype, [])
    subprocess.run([mkfs, "-q", *opts, image], check=True, capture_output=True)
    r = subprocess.run(["mount", "-o", "loop", image, mnt], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount {fstype} here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)
