"""tako-stream's benchmark: end to end on the embedded broker and the real Docker engine,
against a `docker run --rm` baseline measured in the same run.  Prints figures and ratios and
writes them as JSON.  Timings are reported, never asserted.

    scripts/bench [--quick] [--out FILE] [--concurrency N] [--gvisor | --no-gvisor]

Besides the `docker run` baseline, the engine's own churn ceiling (``bench_engine``): hardened
one-shot containers through the Engine API, as many at a time as our workers run.  With gVisor
registered (and by default outside --quick), the same series for a job type under ``runsc``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaProducer  # noqa: E402
from bench_engine import (  # noqa: E402
    GVISOR,
    churn_ceiling,
    gvisor_job_types,
    runtime_available,
)

from tako_stream.client import Producer, ResultReader  # noqa: E402
from tako_stream.core.models import ExecutionResult  # noqa: E402
from tako_stream.kafka import broker as embedded  # noqa: E402
from tako_stream.kafka.clients import producer_options  # noqa: E402
from tests.integration.stack import Stack, WorkerProcess, free_port  # noqa: E402

TRIVIAL = "print('hello')"
#: Low load: one job at a time, this far apart (the baseline gets the same spacing).
GAP = 0.25
IMAGE = "tako-stream/default:1"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p95": pct(values, 95),
        "p99": pct(values, 99),
        "mean": statistics.fmean(values),
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def latency(stack: Stack, count: int, gap: float = GAP) -> list[float]:
    """Produce one trivial job at a time, ``gap`` seconds after the last answer (0: back to
    back, as a client waiting for each answer does); seconds from produce to result consumed."""
    settings = stack.settings
    times: list[float] = []
    async with ResultReader(settings) as reader, Producer(settings) as producer:
        for _ in range(count):
            execution_id = str(uuid.uuid4())
            started = time.perf_counter()
            await producer.submit({"execution_id": execution_id, "code": TRIVIAL})
            found = await reader.wait_for({execution_id}, 60)
            if execution_id not in found or not found[execution_id].success:
                raise RuntimeError(f"benchmark job failed: {found.get(execution_id)}")
            times.append(time.perf_counter() - started)
            await asyncio.sleep(gap)
    return times


async def burst(
    stack: Stack, count: int, *, valid: bool, worker: WorkerProcess | None = None
) -> dict[str, Any]:
    """Produce ``count`` jobs at once; jobs/s from the first produce to the last result."""
    settings = stack.settings
    ids = [str(uuid.uuid4()) for _ in range(count)]
    peak = 0.0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling and worker is not None:
            peak = max(peak, rss_mb(worker.proc.pid))
            await asyncio.sleep(0.2)

    sampler = asyncio.ensure_future(sample())
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    async with ResultReader(settings) as reader:
        started = time.perf_counter()
        sends = []
        for execution_id in ids:
            code = TRIVIAL if valid else ""  # blank code: rejected without a container
            body = orjson.dumps({"execution_id": execution_id, "code": code})
            sends.append(
                await producer.send(settings.requests_topic, body, key=execution_id.encode())
            )
        await asyncio.gather(*sends)
        found: dict[str, ExecutionResult] = await reader.wait_for(set(ids), 600)
        elapsed = time.perf_counter() - started
    sampling = False
    await sampler
    await producer.stop()
    if len(found) != count:
        raise RuntimeError(f"only {len(found)} of {count} jobs answered")
    return {"jobs": count, "seconds": elapsed, "jobs_per_s": count / elapsed, "peak_rss_mb": peak}


def halves(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """One reference rate from its halves (measured before and after what it is compared
    with): all their jobs over all their seconds, each half's rate kept beside it."""
    jobs = sum(m["jobs"] for m in measured)
    seconds = sum(m["jobs"] / m["jobs_per_s"] for m in measured)
    rates = [m["jobs_per_s"] for m in measured]
    return {"jobs": jobs, "seconds": seconds, "jobs_per_s": jobs / seconds, "halves": rates}


def before_after(figure: dict[str, Any]) -> str:
    rates = figure.get("halves")
    return "" if not rates else f"  (before {rates[0]:.2f}, after {rates[-1]:.2f})"


def docker_run(count: int, concurrency: int) -> dict[str, Any]:
    """The baseline: `docker run --rm` of the same trivial job, serially or N at a time."""
    cmd = ["docker", "run", "--rm", "--network", "none", IMAGE, "python3", "-c", TRIVIAL]
    times: list[float] = []

    def one() -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    def spaced() -> float:
        elapsed = one()
        time.sleep(GAP)
        return elapsed

    started = time.perf_counter()
    if concurrency == 1:
        times = [spaced() for _ in range(count)]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(concurrency) as pool:
            times = list(pool.map(lambda _: one(), range(count)))
    elapsed = time.perf_counter() - started
    return {"latency": summary(times), "jobs_per_s": count / elapsed, "jobs": count}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds of each, for CI")
    parser.add_argument("--out", default="bench-results.json")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--gvisor",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the gVisor series (default: outside --quick, when runsc is registered)",
    )
    args = parser.parse_args()
    gvisor = runtime_available(GVISOR) and (
        args.gvisor if args.gvisor is not None else not args.quick
    )
    n_latency, n_burst, n_kafka = (10, 16, 300) if args.quick else (50, 200, 5000)
    conc = args.concurrency

    port = free_port()
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the broker
        prefix="tako-bench-broker-", suffix=".log", delete=False
    )
    broker = subprocess.Popen(  # noqa: ASYNC220 - started once, before any measurement
        embedded.command("127.0.0.1", port), stdout=log, stderr=log
    )
    workdir = Path(tempfile.mkdtemp(prefix="tako-bench-"))
    stacks: list[Stack] = []
    try:
        if not embedded.wait_until_listening("127.0.0.1", port, 30):
            raise RuntimeError("the embedded broker did not start")
        bootstrap = f"localhost:{port}"
        pool = str(conc)
        warm = Stack(bootstrap=bootstrap, workdir=workdir, mode="warm")
        cold = Stack(bootstrap=bootstrap, workdir=workdir, mode="cold")
        stacks = [warm, cold]
        quiet = {"TAKO_LOG_LEVEL": "WARNING", "TAKO_POOL_SIZE": pool}
        warm_worker = warm.start_worker("bench-warm", TAKO_WARM_POOL_SIZE=pool, **quiet)
        cold_worker = cold.start_worker("bench-cold", TAKO_WARM_POOL_SIZE="0", **quiet)
        print("bench: starting workers (consumer groups take a while to form)...", flush=True)
        await asyncio.gather(warm_worker.wait_ready(300), cold_worker.wait_ready(300))
        for stack in stacks:  # first-use costs (image cache, connections) out of the way
            await latency(stack, 2)
        await asyncio.sleep(2)
        results: dict[str, Any] = {
            "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
            "mode": "quick" if args.quick else "full",
            "concurrency": conc,
            "worker_rss_idle_mb": rss_mb(warm_worker.proc.pid),
        }
        print(f"bench: latency, one job at a time, {GAP:g} s apart", flush=True)
        results["latency_warm"] = summary(await latency(warm, n_latency))
        results["latency_cold"] = summary(await latency(cold, n_latency))
        print("bench: latency, back to back (the next job when the last answer arrives)")
        results["back_to_back_warm"] = summary(await latency(warm, n_latency * 2, gap=0))
        # The references the bursts are compared with, half right before them and half right
        # after: this VM's speed drifts by tens of per cent within minutes.
        half = max(2, n_burst // 2)
        print(
            f"bench: the engine's churn ceiling ({conc} hardened containers at a time) and "
            f"docker run --rm ({conc} at a time), in halves before and after the bursts",
            flush=True,
        )
        ceiling = [await churn_ceiling(half, conc)]
        concurrent = [docker_run(half, conc)]
        print(f"bench: throughput, {n_burst} jobs at once, {conc} containers at a time", flush=True)
        results["throughput_warm"] = await burst(warm, n_burst, valid=True, worker=warm_worker)
        results["throughput_cold"] = await burst(cold, n_burst, valid=True)
        concurrent.append(docker_run(half, conc))
        ceiling.append(await churn_ceiling(half, conc))
        results["ceiling"] = halves(ceiling)
        results["baseline_concurrent"] = halves(concurrent)
        print(f"bench: Kafka path, {n_kafka} requests answered without a container", flush=True)
        results["kafka_path"] = await burst(warm, n_kafka, valid=False)
        results["worker_rss_under_load_mb"] = results["throughput_warm"]["peak_rss_mb"]
        print("bench: baseline, docker run --rm, one at a time", flush=True)
        results["baseline_serial"] = docker_run(n_latency, 1)
        if gvisor:
            # Alone: idle gVisor sandboxes cost CPU, which would weigh on the runc figures.
            for stack in stacks:
                stack.stop_all()
            print("bench: gVisor (runsc): latency, back to back, throughput, ceiling", flush=True)
            gv = Stack(bootstrap=bootstrap, workdir=workdir, mode="warm")
            stacks.append(gv)
            gv_worker = gv.start_worker(
                "bench-gvisor",
                TAKO_WARM_POOL_SIZE=pool,
                TAKO_JOB_TYPES_FILE=str(gvisor_job_types()),
                **quiet,
            )
            await gv_worker.wait_ready(300)
            await latency(gv, 2)
            await asyncio.sleep(2)
            results["gvisor"] = {
                "latency_warm": summary(await latency(gv, n_latency)),
                "back_to_back_warm": summary(await latency(gv, n_latency * 2, gap=0)),
            }
            gv_ceiling = [await churn_ceiling(half, conc, runtime=GVISOR)]
            gv_burst = await burst(gv, n_burst, valid=True, worker=gv_worker)
            gv_ceiling.append(await churn_ceiling(half, conc, runtime=GVISOR))
            results["gvisor"].update(throughput_warm=gv_burst, ceiling=halves(gv_ceiling))
    finally:
        for stack in stacks:
            stack.stop_all()
        broker.terminate()
        broker.wait(10)
        log.close()

    base_p50 = results["baseline_serial"]["latency"]["p50"]
    results["ratios"] = {
        "latency_p50_warm_vs_docker_run": results["latency_warm"]["p50"] / base_p50,
        "latency_p50_cold_vs_docker_run": results["latency_cold"]["p50"] / base_p50,
        "throughput_warm_vs_docker_run": results["throughput_warm"]["jobs_per_s"]
        / results["baseline_concurrent"]["jobs_per_s"],
        "throughput_cold_vs_docker_run": results["throughput_cold"]["jobs_per_s"]
        / results["baseline_concurrent"]["jobs_per_s"],
        "throughput_warm_vs_ceiling": results["throughput_warm"]["jobs_per_s"]
        / results["ceiling"]["jobs_per_s"],
        "throughput_cold_vs_ceiling": results["throughput_cold"]["jobs_per_s"]
        / results["ceiling"]["jobs_per_s"],
        # Back to back, every job needs a fresh container: the mean can be no shorter than the
        # engine's time per container at its ceiling (1 / ceiling); 1.00 is that bound.
        "back_to_back_mean_vs_ceiling_interval": results["back_to_back_warm"]["mean"]
        * results["ceiling"]["jobs_per_s"],
    }
    if "gvisor" in results:
        g = results["gvisor"]
        results["ratios"]["gvisor_throughput_warm_vs_runsc_ceiling"] = (
            g["throughput_warm"]["jobs_per_s"] / g["ceiling"]["jobs_per_s"]
        )
        results["ratios"]["gvisor_back_to_back_mean_vs_runsc_ceiling_interval"] = (
            g["back_to_back_warm"]["mean"] * g["ceiling"]["jobs_per_s"]
        )
    Path(args.out).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))  # noqa: ASYNC240

    ms = lambda s: f"{s * 1000:7.1f} ms"  # noqa: E731
    lw, lc, bs = results["latency_warm"], results["latency_cold"], results["baseline_serial"]
    print()
    print(f"{'end-to-end latency, trivial job':34} {'p50':>10} {'p95':>10} {'p99':>10}")
    series = [("tako-stream warm", lw), ("tako-stream cold", lc)]
    series.append(("tako-stream warm, back to back", results["back_to_back_warm"]))
    if "gvisor" in results:
        series.append(("gVisor warm", results["gvisor"]["latency_warm"]))
        series.append(("gVisor warm, back to back", results["gvisor"]["back_to_back_warm"]))
    for name, s in series:
        print(f"  {name:32} {ms(s['p50']):>10} {ms(s['p95']):>10} {ms(s['p99']):>10}")
    b = bs["latency"]
    print(
        f"  {'docker run --rm (baseline)':32} {ms(b['p50']):>10} {ms(b['p95']):>10} "
        f"{ms(b['p99']):>10}"
    )
    print(f"\nthroughput at concurrency {conc}")
    for name, key in (
        ("tako-stream warm", "throughput_warm"),
        ("tako-stream cold", "throughput_cold"),
        ("docker run --rm (baseline)", "baseline_concurrent"),
        ("engine churn ceiling", "ceiling"),
    ):
        print(f"  {name:32} {results[key]['jobs_per_s']:7.2f} jobs/s{before_after(results[key])}")
    if "gvisor" in results:
        g = results["gvisor"]
        print(f"  {'gVisor warm':32} {g['throughput_warm']['jobs_per_s']:7.2f} jobs/s")
        print(
            f"  {'engine churn ceiling, runsc':32} {g['ceiling']['jobs_per_s']:7.2f} jobs/s"
            f"{before_after(g['ceiling'])}"
        )
    print(f"\nKafka path (no container)          {results['kafka_path']['jobs_per_s']:7.0f} req/s")
    print(
        f"worker RSS idle / under load       {results['worker_rss_idle_mb']:5.0f} MB / "
        f"{results['worker_rss_under_load_mb']:.0f} MB"
    )
    print("\nratios (ours / baseline or ceiling)")
    for key, value in results["ratios"].items():
        print(f"  {key:52} {value:6.2f}")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
