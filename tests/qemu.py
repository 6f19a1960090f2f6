"""Test helpers that use the real qemu-io and qemu-img to write and check image bytes."""

from __future__ import annotations

import json
import subprocess

MiB = 1 << 20
GiB = 1 << 30


def write(path: str, pattern: int, offset: int, length: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", path],
        check=True, capture_output=True,
    )


def reads(path: str, pattern: int, offset: int, length: int) -> bool:
    """True when the image (through its whole chain) holds ``pattern`` in that range."""
    r = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {pattern} {offset} {length}", path],
        capture_output=True, text=True,
    )
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout


def same_content(a: str, b: str) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", a, b]).returncode == 0


def info(path: str) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", path],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def check_clean(path: str) -> bool:
    return subprocess.run(["qemu-img", "check", "-q", path], capture_output=True).returncode == 0


Layout = list[tuple[int, int, int]]  # (pattern, offset, length)


def fill(path: str, gib: float, chunk: int = 256 * MiB, offset: int = 0) -> Layout:
    """Write ``gib`` GiB of non-zero data from ``offset`` in chunks, a pattern per chunk.

    Returns the layout so a reader can verify every chunk. Non-zero data matters: qemu-img skips
    zeros, so a copy of zeros measures nothing.
    """
    end = offset + int(gib * GiB)
    layout = [(1 + (i // chunk) % 250, i, min(chunk, end - i)) for i in range(offset, end, chunk)]
    commands: list[str] = []
    for pattern, off, length in layout:
        commands += ["-c", f"write -P {pattern} {off} {length}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, path], check=True, capture_output=True)
    return layout


def reads_layout(path: str, layout: Layout) -> bool:
    commands: list[str] = []
    for pattern, off, length in layout:
        commands += ["-c", f"read -P {pattern} {off} {length}"]
    r = subprocess.run(["qemu-io", "-r", "-f", "qcow2", *commands, path],
                       capture_output=True, text=True)
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout


def leak_a_cluster(path: str) -> None:
    """Make qemu-img check find one leaked cluster: a refcount for a cluster nothing uses.

    qemu has no command that leaks on purpose; a crash between a refcount update and the L2
    update is what leaks in real life. Writing the refcount directly is the same end state.
    """
    import os
    import struct

    with open(path, "r+b") as f:
        head = f.read(104)
        cluster_bits = struct.unpack(">I", head[20:24])[0]
        table_offset = struct.unpack(">Q", head[48:56])[0]
        order = struct.unpack(">I", head[96:100])[0]
        assert order == 4, "16-bit refcounts expected"
        cluster = 1 << cluster_bits
        f.seek(table_offset)
        block_offset = struct.unpack(">Q", f.read(8))[0]
        # A new cluster at the end of the file, counted but referenced by nothing.
        index = (os.fstat(f.fileno()).st_size + cluster - 1) // cluster
        f.truncate((index + 1) * cluster)
        f.seek(block_offset + 2 * index)
        assert f.read(2) == b"\0\0"
        f.seek(block_offset + 2 * index)
        f.write(struct.pack(">H", 1))


def lean_on(top_path: str, foreign_path: str, foreign_image_id: str) -> None:
    """Make a volume lean on a backing volume in another repository, as an older agent or a
    hand-made chain could leave it: the qcow2 names the other file by its absolute path, and
    the volume record names the other volume. (Strata itself never makes such chains.)"""
    import os

    from agent import fileio

    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", foreign_path, "-F",
                    "qcow2", top_path], check=True)
    record_path = top_path.rsplit(".", 1)[0] + ".json"
    record = fileio.read_json(record_path)
    record["parent_volume_id"] = os.path.basename(foreign_path).split(".")[0]
    record["parent_image_id"] = foreign_image_id
    fileio.write_json(record_path, record)
