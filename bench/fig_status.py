"""Figure 6: getImageStatus over the Unix socket with 8 concurrent keep-alive clients, idle and
while a 2 GiB copy runs, against a bare gevent pywsgi + jsonrpcserver handler (``refserver``).

Each client is its own process (``loadgen``), so the clients do not share a GIL; all of them
start on the same clock tick and call for a fixed window. While Strata is measured "during a
copy" it copies the 3-layer chain's top snapshot (2 GiB of data) into a fresh repository, copy
after copy; while the reference is, a bare ``qemu-img convert`` of the same chain runs the same
way, so both see the same I/O and CPU load.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from bench import agentproc, context, stats, tools

DEFAULT = agentproc.DEFAULT
CLIENTS = 8
DURATION = 3.0
RATE_TARGET = 2500.0
P99_TARGET = 0.020


@dataclasses.dataclass
class Load:
    rate: float
    p50: float
    p99: float
    start: float
    end: float


def load(sock: str, repo: str, image: str, duration: float = DURATION) -> Load:
    """Run CLIENTS loadgen processes against sock for duration seconds."""
    env = {**os.environ, "PYTHONPATH": context.ROOT}
    procs = [
        subprocess.Popen([sys.executable, "-m", "bench.loadgen", sock, repo, image,
                          str(duration)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, cwd=context.ROOT)
        for _ in range(CLIENTS)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != b"ready":
                _, err = p.communicate(timeout=30)
                raise context.BenchError(f"a load client failed: {err.decode()[-2000:]}")
        start = time.monotonic() + 0.05
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{start!r}\n".encode())
            p.stdin.flush()  # communicate() closes it
        latencies: list[float] = []
        for p in procs:
            out, err = p.communicate(timeout=duration + 120)
            if p.returncode != 0:
                raise context.BenchError(f"a load client failed: {err.decode()[-2000:]}")
            latencies += json.loads(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return Load(len(latencies) / duration, stats.percentile(latencies, 50),
                stats.percentile(latencies, 99), start, start + duration)


class Background:
    """Copies one after another on a thread until stopped, remembering when each ran."""

    def __init__(self, copy: Callable[[threading.Event], tuple[float, float]]) -> None:
        self._copy = copy
        self._stop = threading.Event()
        self.began = threading.Event()  # set once the first copy runs
        self.intervals: list[tuple[float, float]] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="bench-copy", daemon=True)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.intervals.append(self._copy(self.began))
        except BaseException as e:  # reported by stop()
            self.error = e
            self.began.set()

    def __enter__(self) -> Background:
        self._thread.start()
        if not self.began.wait(120):
            raise context.BenchError("the background copy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise context.BenchError(f"background copy failed: {self.error}") from self.error

    def coverage(self, start: float, end: float) -> float:
        """The fraction of [start, end] during which a copy ran."""
        covered = sum(max(0.0, min(end, b) - max(start, a)) for a, b in self.intervals)
        return covered / (end - start)


def run(b: context.Bench) -> None:
    chain = b.images.chain()
    image = chain.snapshots[-1]
    ref_sock = b.path("refserver", "ref.sock")
    with open(b.path("refserver", "ref.log"), "ab") as log:
        ref = subprocess.Popen([sys.executable, "-m", "bench.refserver", ref_sock],
                               stdout=log, stderr=log, cwd=context.ROOT,
                               env={**os.environ, "PYTHONPATH": context.ROOT})
    b.cleanup.callback(tools.stop, ref)
    try:
        tools.wait_for_socket(ref_sock, ref)
        _measure(b, ref_sock, image, chain.top_path)
    finally:
        tools.stop(ref)


def _measure(b: context.Bench, ref_sock: str, image: str, top_path: str) -> None:
    agent = b.agent
    serial = itertools.count(1)

    def strata_copy(began: threading.Event) -> tuple[float, float]:
        k = next(serial)
        repo_id, path = f"load{k}", b.path("repos", f"load{k}")
        client = agent.client()
        try:
            agent.add_repo(repo_id, path, client)
            t0 = time.monotonic()
            client.call("copyImage", targetRepoId=repo_id, imageId=image)
            began.set()
            agent.wait(repo_id, image, client, interval=0.05)
            t1 = time.monotonic()
            agent.drop_repo(repo_id, path, client)
            return t0, t1
        finally:
            client.close()

    def bare_copy(began: threading.Event) -> tuple[float, float]:
        out = b.path("bare", f"load-{next(serial)}.qcow2")
        t0 = time.monotonic()
        began.set()
        tools.convert(top_path, out)
        t1 = time.monotonic()
        tools.remove(out)
        return t0, t1

    n = b.reps(6)
    results: dict[str, list[Load]] = {k: [] for k in ("s-idle", "r-idle", "s-busy", "r-busy")}
    coverage: list[float] = []

    def strata_idle() -> float:
        results["s-idle"].append(load(agent.socket, DEFAULT, image))
        return 0.0

    def ref_idle() -> float:
        results["r-idle"].append(load(ref_sock, DEFAULT, image))
        return 0.0

    def strata_busy() -> float:
        with Background(strata_copy) as bg:
            got = load(agent.socket, DEFAULT, image)
        coverage.append(bg.coverage(got.start, got.end))
        results["s-busy"].append(got)
        return 0.0

    def ref_busy() -> float:
        with Background(bare_copy) as bg:
            got = load(ref_sock, DEFAULT, image)
        coverage.append(bg.coverage(got.start, got.end))
        results["r-busy"].append(got)
        return 0.0

    b.say(f"6: {CLIENTS} clients x {DURATION:.0f} s, idle, {n} pairs")
    stats.alternate(n, strata_idle, ref_idle, warmup=False)
    b.say(f"6: {CLIENTS} clients x {DURATION:.0f} s while 2 GiB copies run, {n} pairs")
    stats.alternate(n, strata_busy, ref_busy, warmup=False)

    for when, s_key, r_key in (("idle", "s-idle", "r-idle"),
                               ("during a 2 GiB copy", "s-busy", "r-busy")):
        s, r = results[s_key], results[r_key]
        rate = stats.Samples([x.rate for x in s], stats.CALLS_PER_S)
        ratio = stats.pair_ratio([x.rate for x in s], [x.rate for x in r])
        note = ""
        if s_key == "s-busy":
            note = (f"a copy ran during {min(coverage) * 100:.0f}% or more of every window "
                    "(Strata: copyImage; reference: bare qemu-img convert)")
        b.compare(f"6 getImageStatus, {CLIENTS} clients, {when}: calls/s", rate,
                  stats.Samples([x.rate for x in r], stats.CALLS_PER_S),
                  "bare gevent pywsgi + jsonrpcserver", ratio, "≥ 2,500 calls/s",
                  rate.median >= RATE_TARGET, note=note)
        p99 = stats.Samples([x.p99 for x in s], stats.SECONDS)
        b.compare(f"6 getImageStatus, {CLIENTS} clients, {when}: p99", p99,
                  stats.Samples([x.p99 for x in r], stats.SECONDS),
                  "bare gevent pywsgi + jsonrpcserver",
                  stats.pair_ratio([x.p99 for x in s], [x.p99 for x in r]), "≤ 20 ms",
                  p99.median <= P99_TARGET,
                  note=f"p50 {_median_p50(s)} (reference {_median_p50(r)})")


def _median_p50(loads: list[Load]) -> str:
    return stats.fmt(stats.Samples([x.p50 for x in loads], stats.SECONDS).median, stats.SECONDS)
