"""Interleaved pairs: this checkout's worker against another revision's, run by turns.

    scripts/bench-pairs REV [--rounds N] [--gvisor] [--out FILE]

On a shared VM one run's figures are not comparable with another's (the engine's churn ceiling
measured 7.8-14.5 jobs/s within one afternoon here), so a change is judged by pairs: REV's
worker, then this checkout's, then REV's again, each run within minutes of the other.  REV is
checked out in a temporary git worktree; each run starts the embedded broker and one warm
worker from its side's tree (``python -m tako_stream`` with that tree as working directory and
``PYTHONPATH``: the worker and the supervisor it sends into containers are that side's), and
measures it with this checkout's client and series (``bench.py``): spaced latency, back to
back, a burst of trivial jobs, then the engine's ceiling, whose ratio is the figure that
carries from run to run.  Prints a line per run and the median of each figure per side, and
writes them as JSON.  Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIGURES = ("spaced_p50", "spaced_p95", "b2b_p50", "b2b_p95", "burst", "ceiling", "ratio")


async def series(tree: Path, gvisor: bool) -> dict[str, float]:
    """One run: a warm worker from ``tree`` (this process's working directory) measured."""
    sys.path.insert(0, str(HERE))
    import bench
    from bench_engine import GVISOR, churn_ceiling, gvisor_job_types

    from tako_stream.kafka import broker as embedded
    from tests.integration.stack import Stack, free_port

    port = free_port()
    broker = subprocess.Popen(  # noqa: ASYNC220 - started once, before any measurement
        embedded.command("127.0.0.1", port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        if not embedded.wait_until_listening("127.0.0.1", port, 30):
            raise RuntimeError("the embedded broker did not start")
        stack = Stack(
            bootstrap=f"localhost:{port}",
            workdir=Path(tempfile.mkdtemp(prefix="tako-pairs-")),
            mode="warm",
        )
        types = {"TAKO_JOB_TYPES_FILE": str(gvisor_job_types())} if gvisor else {}
        worker = stack.start_worker(
            "pairs",
            TAKO_WARM_POOL_SIZE="4",
            TAKO_POOL_SIZE="4",
            TAKO_LOG_LEVEL="WARNING",
            PYTHONPATH=str(tree),
            **types,
        )
        try:
            await worker.wait_ready(300)
            await bench.latency(stack, 3)
            await asyncio.sleep(2)
            spaced = bench.summary(await bench.latency(stack, 30))
            b2b = bench.summary(await bench.latency(stack, 40 if gvisor else 80, gap=0))
            await asyncio.sleep(2)
            burst = await bench.burst(stack, 60 if gvisor else 120, valid=True)
        finally:
            stack.stop_all()
        ceiling = await churn_ceiling(60 if gvisor else 120, 4, GVISOR if gvisor else None)
    finally:
        broker.terminate()
        broker.wait(10)
    return {
        "spaced_p50": spaced["p50"] * 1000,
        "spaced_p95": spaced["p95"] * 1000,
        "b2b_p50": b2b["p50"] * 1000,
        "b2b_p95": b2b["p95"] * 1000,
        "burst": burst["jobs_per_s"],
        "ceiling": ceiling["jobs_per_s"],
        "ratio": burst["jobs_per_s"] / ceiling["jobs_per_s"],
    }


def run_side(tree: Path, gvisor: bool) -> dict[str, float]:
    """``series`` in a fresh process, working in ``tree``, so the worker it starts is tree's."""
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}"}
    argv = [sys.executable, str(Path(__file__).resolve()), "--series", str(tree)]
    if gvisor:
        argv.append("--gvisor")
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"the run in {tree} failed:\n{done.stderr[-4000:]}")
    figures: dict[str, float] = orjson.loads(done.stdout.strip().splitlines()[-1])
    return figures


def line(label: str, f: dict[str, float]) -> str:
    return (
        f"{label:14} spaced p50 {f['spaced_p50']:5.0f} p95 {f['spaced_p95']:5.0f} ms | "
        f"b2b p50 {f['b2b_p50']:5.0f} p95 {f['b2b_p95']:5.0f} ms | burst {f['burst']:5.2f}/s "
        f"ceiling {f['ceiling']:5.2f}/s ratio {f['ratio']:4.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rev", nargs="?", help="the revision to compare with (e.g. main~1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gvisor", action="store_true", help="the job type under runsc")
    parser.add_argument("--out", default="bench-pairs.json")
    parser.add_argument("--series", metavar="TREE", help=argparse.SUPPRESS)  # one run, as JSON
    args = parser.parse_args()
    if args.series:
        print(orjson.dumps(asyncio.run(series(Path(args.series), args.gvisor))).decode())
        return 0
    if not args.rev:
        parser.error("name the revision to compare with")
    other = Path(tempfile.mkdtemp(prefix="tako-pairs-tree-")) / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.rev],
        check=True,
        capture_output=True,
    )
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    try:
        for round_ in range(1, args.rounds + 1):
            for side, tree in (("old", other), ("new", ROOT)):
                figures = run_side(tree, args.gvisor)
                runs[side].append(figures)
                print(line(f"{side} {round_}", figures), flush=True)
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)],
            check=False,
            capture_output=True,
        )
    medians: dict[str, Any] = {
        side: {k: statistics.median(r[k] for r in rs) for k in FIGURES} for side, rs in runs.items()
    }
    print()
    for side in ("old", "new"):
        print(line(f"median {side}", medians[side]))
    new_over_old = {k: medians["new"][k] / medians["old"][k] for k in FIGURES}
    print("new / old      " + "  ".join(f"{k} {v:.2f}" for k, v in new_over_old.items()))
    result = {"rev": args.rev, "gvisor": args.gvisor, "runs": runs, "medians": medians}
    Path(args.out).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
