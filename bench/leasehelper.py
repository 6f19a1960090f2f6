"""Figure 11's helper: lease acquire and release, timed inside a process of one host.

Run inside the host's mount namespace with its sanlock daemon's environment (``Host.command``,
``Host.env``)::

    python -m bench.leasehelper leases|floor ROOT REPO_UUID HOST_ID IO_TIMEOUT ROUNDS

ROOT is the shared repository's mount point on that host. The agent of the host has joined the
repository's lockspace already (``join`` here finds it joined): the leases are taken in the very
lockspace the agent uses, through ``agent/repo/leases.Lockspace`` as the agent takes them (the
owners read first, then sanlock's acquire, then its inquire for the version), on a lease area of
the helper's own (``bench-<hex>``, written once, removed at the end: no image names it). Each
round also takes the same lease with bare ``sanlock.acquire``/``release`` on a registration of its
own, in alternating order: what sanlock alone costs on this storage. Prints one JSON object:
``{"make": s, "acquire": [s...], "release": [s...], "bare_acquire": [...],
"bare_release": [...]}``.

``floor``: what a call must do on this storage without an agent, with the agent's own functions
(``leases``, ``fileio``), in a scratch directory: ``intent`` (a new image's lease area made and
taken, then two atomic records in two directories, as a create's intent before it answers),
``complete`` (a small file written and fsync'd with a volume record, renamed into place, then a
seal record: the rest of a thin create), ``record`` (one atomic record) and ``lease`` (acquire and
release of an existing lease). Prints ``{"intent": [...], "complete": [...], "record": [...],
"lease": [...]}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid

import sanlock

from agent import fileio
from agent.repo import leases

RECORD = fileio.encode_json({"id": str(uuid.UUID(int=0)), "pad": "x" * 400})
QCOW2_HEADER = 192 << 10  # about what an empty 1 GiB qcow2 allocates


def main(argv: list[str]) -> int:
    mode, *rest = argv
    if mode == "floor":
        return floor(rest)
    return measure_leases(rest)


def floor(argv: list[str]) -> int:
    root, repo_uuid, host_id, io_timeout, rounds = argv
    space = leases.Lockspace(root, repo_uuid, int(host_id), int(io_timeout))
    space.join()
    scratch = os.path.join(root, "bench-scratch", f"floor-{uuid.uuid4().hex[:8]}")
    dirs = [os.path.join(scratch, d) for d in ("journal", "images", "volumes")]
    for d in dirs:
        os.makedirs(d)
    journal, images, volumes = dirs
    out: dict[str, list[float]] = {"intent": [], "complete": [], "record": [], "lease": []}
    made: list[str] = []
    try:
        for i in range(int(rounds) + 1):
            name = f"bench-{uuid.uuid4().hex[:16]}"
            made.append(leases.area_path(root, name))
            t0 = time.perf_counter()
            leases.write_lease(root, repo_uuid, name)
            held = space.acquire({name: leases.Mode.EXCLUSIVE}, "the benchmark's floor")
            fileio.write_many([(os.path.join(journal, f"{name}.json"), RECORD),
                               (os.path.join(images, f"{name}.json"), RECORD)])
            t1 = time.perf_counter()
            partial = os.path.join(volumes, f"{name}.qcow2.partial")
            fileio.write_file(partial, bytes(QCOW2_HEADER))
            fileio.write_many([(os.path.join(volumes, f"{name}.json"), RECORD)],
                              sync_also=[partial])
            os.rename(partial, os.path.join(volumes, f"{name}.qcow2"))
            fileio.write_many([(os.path.join(images, f"{name}.json"), RECORD)])
            t2 = time.perf_counter()
            held.release()
            t3 = time.perf_counter()
            fileio.write_many([(os.path.join(images, f"{name}.json"), RECORD)])
            t4 = time.perf_counter()
            held = space.acquire({name: leases.Mode.EXCLUSIVE}, "the benchmark's floor")
            held.release()
            t5 = time.perf_counter()
            if i:  # the first round warms up
                out["intent"].append(t1 - t0)
                out["complete"].append(t2 - t1)
                out["record"].append(t4 - t3)
                out["lease"].append(t5 - t4)
    finally:
        space.drop()
        shutil.rmtree(scratch, ignore_errors=True)
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    print(json.dumps(out))
    return 0


def measure_leases(argv: list[str]) -> int:
    root, repo_uuid, host_id, io_timeout, rounds = argv
    space = leases.Lockspace(root, repo_uuid, int(host_id), int(io_timeout))
    space.join()  # joined by the host's agent already: sanlock says so at once
    resource = f"bench-{uuid.uuid4().hex[:16]}"
    path = leases.area_path(root, resource)
    out: dict[str, object] = {}
    acquire: list[float] = []
    release: list[float] = []
    bare_acquire: list[float] = []
    bare_release: list[float] = []
    fd = sanlock.register()
    try:
        t0 = time.perf_counter()
        leases.write_lease(root, repo_uuid, resource)  # what the first claim of an image costs
        out["make"] = time.perf_counter() - t0

        def strata() -> None:
            t0 = time.perf_counter()
            held = space.acquire({resource: leases.Mode.EXCLUSIVE}, "the benchmark")
            t1 = time.perf_counter()
            held.release()
            t2 = time.perf_counter()
            acquire.append(t1 - t0)
            release.append(t2 - t1)

        def bare() -> None:
            disks = [(path, 0)]
            t0 = time.perf_counter()
            sanlock.acquire(space.name, resource.encode(), disks, slkfd=fd)
            t1 = time.perf_counter()
            sanlock.release(space.name, resource.encode(), disks, slkfd=fd)
            t2 = time.perf_counter()
            bare_acquire.append(t1 - t0)
            bare_release.append(t2 - t1)

        strata()  # warm-up pair, dropped
        bare()
        del acquire[:], release[:], bare_acquire[:], bare_release[:]
        for i in range(int(rounds)):
            for job in (strata, bare) if i % 2 == 0 else (bare, strata):
                job()
    finally:
        os.close(fd)
        space.drop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    out.update(acquire=acquire, release=release, bare_acquire=bare_acquire,
               bare_release=bare_release)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
