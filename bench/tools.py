"""The bare tools the figures compare against, and the helpers that put data into images."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Sequence

from bench import context

QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
# qemu-io writes in requests of this size: one 1 GiB request is twice as slow with O_DIRECT.
WRITE_CHUNK = 64 * MiB

Chunk = tuple[int, int, int]  # offset, length, byte pattern


def run(argv: Sequence[str], timeout: float = 600.0) -> float:
    """Run argv to completion; return its wall time in seconds. A failure is a BenchError."""
    t0 = time.perf_counter()
    proc = subprocess.run(list(argv), capture_output=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C"})
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace")
        raise context.BenchError(f"{' '.join(argv)} failed ({proc.returncode}): {err[-500:]}")
    return elapsed


def create(path: str, size: int, backing: str | None = None) -> float:
    """Bare ``qemu-img create -f qcow2 [-b backing -F qcow2] path size``: the reference."""
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", backing, "-F", "qcow2"]
    return run([*argv, path, str(size)])


def convert(src: str, dst: str, source_cache: str = "none") -> float:
    """Bare ``qemu-img convert -t none -T none -W -O qcow2``: the full-copy reference (with
    ``source_cache="writeback"``, reading the source through the page cache)."""
    return run([QEMU_IMG, "convert", "-t", "none", "-T", source_cache, "-W", "-O", "qcow2",
                src, dst])


def span(offset: int, length: int, pattern: int) -> list[Chunk]:
    """A contiguous range, cut into requests qemu-io handles fast."""
    out = []
    end = offset + length
    while offset < end:
        n = min(WRITE_CHUNK, end - offset)
        out.append((offset, n, pattern))
        offset += n
    return out


def write(path: str, chunks: Sequence[Chunk], fmt: str = "qcow2") -> float:
    """Write non-zero patterns with qemu-io, O_DIRECT (zeros would be skipped by qemu-img)."""
    argv = [QEMU_IO, "-t", "none", "-f", fmt]
    for off, length, pattern in chunks:
        argv += ["-c", f"write -q -P {pattern} {off} {length}"]
    return run([*argv, path])


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Terminate a child we started (SIGTERM, then SIGKILL) and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise context.BenchError(f"{proc.args!r} exited with {proc.returncode}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    raise context.BenchError(f"nothing listens on {path} after {timeout} s")
