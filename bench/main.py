"""Run the figures of issues 4 and 10 side by side with their references; print and save one
table."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from types import FrameType

from bench import (
    agentproc,
    context,
    fig_copy,
    fig_create,
    fig_libvirt,
    fig_recovery,
    fig_reflink,
    fig_scale,
    fig_shared,
    fig_status,
    fig_throughput,
    fixtures,
    machine,
    report,
)

FIGURES: dict[str, tuple[str, Callable[[context.Bench], None]]] = {
    "1": ("createVirtualDisk thin, 1 GiB and 1 TiB", fig_create.thin),
    "2": ("createSnapshot of a disk with 1 GiB", fig_create.snapshot),
    "3": ("copyImage full, 3-layer chain, 2 GiB", fig_copy.full),
    "4": ("copyImage with baseImageId, 5% changed", fig_copy.diff),
    "5": ("strategy=performance on XFS (reflink)", fig_reflink.run),
    "6": ("getImageStatus, 8 clients", fig_status.run),
    "7": ("1k, 10k, 100k images: list, check, info, connect, RSS", fig_scale.run),
    "8": ("against libvirt's storage pools", fig_libvirt.run),
    "9": ("shared: thin createVirtualDisk, glusterfs vs localfs", fig_shared.thin),
    "10": ("shared: copyImage full on glusterfs vs bare convert, 3 GiB", fig_shared.copy),
    "11": ("shared: lease acquire + release; calls on glusterfs vs localfs", fig_shared.leases),
    "12": ("shared: takeover after a host death (over a minute)", fig_shared.takeover),
    "13": ("recovery of pending operations after kill -9; calls beside them", fig_recovery.run),
    "14": ("thin createVirtualDisk throughput, 1/4/16 clients", fig_throughput.throughput),
    "15": ("thin createVirtualDisk while 8 copies run", fig_throughput.busy),
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "last-results.md")
# Peak use is about 12 GiB (data disks, chain copies, the XFS file), and about 10 GiB more in
# the GlusterFS brick of figures 9-12; keep a margin.
NEEDED_FREE = 35 << 30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", metavar="N[,N...]",
                   help="run only these figures: " +
                   "; ".join(f"{k} {title}" for k, (title, _) in FIGURES.items())
                   .replace("%", "%%"))  # argparse formats help with %
    p.add_argument("--quick", action="store_true",
                   help="about a third of the repetitions (a smoke run; not for the README)")
    p.add_argument("--tmpdir", default="/var/tmp",
                   help="where the temporary directory goes (default /var/tmp: same disk as "
                        "the checkout here, and /tmp may be small)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--output", default=RESULTS,
                   help="the Markdown file to write (default bench/last-results.md; "
                        "'-' for none)")
    return p.parse_args(argv)


_stopping: list[int] = []  # the signal that asked us to stop, once one did


def _terminate(signum: int, frame: FrameType | None) -> None:
    _stopping.append(signum)
    raise SystemExit(128 + signum)  # unwinds the cleanups


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keys = list(FIGURES) if not args.only else [k.strip() for k in args.only.split(",")]
    unknown = [k for k in keys if k not in FIGURES]
    if unknown:
        print(f"bench: unknown figure(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    os.makedirs(args.tmpdir, exist_ok=True)
    free = shutil.disk_usage(args.tmpdir).free
    if free < NEEDED_FREE:
        print(f"bench: {args.tmpdir} has {free >> 30} GiB free; the benchmark needs "
              f"{NEEDED_FREE >> 30} GiB (use --tmpdir)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    load_at_start = machine.load_average()
    base = tempfile.mkdtemp(prefix="strata-bench-", dir=args.tmpdir)
    try:
        b, info = _run(args, keys, base, load_at_start)
    except (KeyboardInterrupt, SystemExit) as e:
        kept = f"; data kept in {base}" if args.keep else ""
        print(f"bench: interrupted ({type(e).__name__}); the processes and mounts it started "
              f"are gone{kept}", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    print()
    print(report.text(b.rows))
    for row in b.rows:
        if row.note:
            print(f"  * {row.figure}: {row.note}")
    for note in b.notes:
        print(f"  * {note}")
    print(f"\n{', '.join(f'{k}: {v}' for k, v in info.items())}; {elapsed / 60:.1f} min")
    if args.output != "-":
        command = "python -m bench" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
        with open(args.output, "w") as f:
            f.write(report.markdown(b.rows, info, b.notes, elapsed, command))
        print(f"written to {args.output}")
    return 1 if any(r.result == context.ERROR for r in b.rows) else 0


def _run(args: argparse.Namespace, keys: list[str], base: str,
         load_at_start: str) -> tuple[context.Bench, dict[str, str]]:
    with contextlib.ExitStack() as stack:
        if args.keep:
            print(f"bench: keeping {base}", file=sys.stderr)
        else:
            stack.callback(shutil.rmtree, base, ignore_errors=True)
        agent = agentproc.Agent(os.path.join(base, "agent"))
        b = context.Bench(base, args.quick, stack, agent)
        b.images = fixtures.Images(b)
        agent.start()
        stack.callback(agent.stop)
        b.say(f"agent pid {agent.pid}, data under {base}")
        for key in keys:
            title, fn = FIGURES[key]
            b.say(f"figure {key}: {title}")
            t0 = time.monotonic()
            try:
                fn(b)
            except Exception as e:
                if _stopping:  # a cleanup failed on the way out: keep leaving
                    raise SystemExit(128 + _stopping[0]) from e
                traceback.print_exc()
                b.error(f"{key} {title}", f"{type(e).__name__}: {e}"[:400])
            b.say(f"figure {key} took {time.monotonic() - t0:.0f} s")
        info = machine.describe(base, load_at_start)
        if agent.busy_disconnects:
            b.note(f"disconnectStorageRepository right after getImageStatus said optimized (and "
                   f"not running) was refused as ImageBusy {agent.busy_disconnects} time(s) and "
                   "retried: the agent still counted the finished operation as running")
        if agent.transient_broken:
            b.note(f"getImageStatus said broken, with last_error (e.g. 'the journal of "
                   f"operation ... is missing'), for an image that was optimized a moment later "
                   f"{agent.transient_broken} time(s): the status read raced the operation's "
                   "seal")
        b.say("cleaning up")
    return b, info
