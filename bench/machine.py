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


def _file_system(path: str) -> str:
    """The file system type and device that hold path (the longest matching mount point)."""
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
    return f"{best[1]} ({best[2]} on {best[0]})"


def _output(argv: list[str]) -> str:
    try:
        got = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=context.ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return got.stdout.strip().splitlines()[0] if got.returncode == 0 and got.stdout else "unknown"


def describe(base: str) -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": os.uname().release,
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "file system": _file_system(base),
        "qemu-img": _output(["qemu-img", "--version"]),
        "commit": _output(["git", "rev-parse", "--short", "HEAD"]),
    }
