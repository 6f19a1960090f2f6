"""What the results were measured on."""

from __future__ import annotations

import datetime
import os
import subprocess

from bench import context


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def mount_of(path: str) -> tuple[str, str, str]:
    """The mount point, file system type and device that hold path (the longest match)."""
    best = ("", "unknown", "unknown")
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                mnt = mnt.replace("\\040", " ")
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) > len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    return best


def _file_system(path: str) -> str:
    mnt, fstype, dev = mount_of(path)
    return f"{fstype} ({dev} on {mnt})"


def _output(argv: list[str]) -> str:
    try:
        got = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=context.ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return got.stdout.strip().splitlines()[0] if got.returncode == 0 and got.stdout else "unknown"


def _commit() -> str:
    """The checkout's commit, and whether its working tree differs (read-only git calls)."""
    commit = _output(["git", "rev-parse", "--short", "HEAD"])
    try:
        # GIT_OPTIONAL_LOCKS=0: git status does not refresh (write) the index.
        got = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=context.ROOT, capture_output=True, timeout=10,
                             env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        dirty = got.returncode == 0 and bool(got.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        dirty = False
    return f"{commit} (with local changes)" if dirty else commit


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def describe(base: str, load_at_start: str) -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": os.uname().release,
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "file system": _file_system(base),
        "qemu-img": _output(["qemu-img", "--version"]),
        "load average (1, 5, 15 min) at start / end": f"{load_at_start} / {load_average()}",
        "commit": _commit(),
    }
