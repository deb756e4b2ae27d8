"""The gateway at scale: 200,000 results on the topic before it starts (a private embedded broker).

Prints, and writes to --out as JSON:
- catch-up: seconds from start to ready and to the newest result served, first start and restart;
- the gateway's RSS once caught up;
- GET /jobs/{id} latency (p50, p99) with 20 concurrent clients, for known and unknown ids;
- sync POST /execute at low load (a real worker), against the Kafka client path in the same run.

Usage: scripts/bench-gateway [--results N] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tako_stream.client import Client
from tako_stream.core.errors import Status
from tako_stream.core.models import ExecutionResult
from tako_stream.kafka import broker as embedded
from tako_stream.kafka.clients import producer_options
from tako_stream.kafka.codec import dumps
from tako_stream.kafka.topics import ensure_topics
from tako_stream.settings import Settings
from tests.integration.stack import free_port


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spawn(argv: list[str], env: dict[str, str] | None, log: Path | None) -> subprocess.Popen[bytes]:
    """A child process, its output to ``log`` (or nowhere)."""
    with open(log or os.devnull, "ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(settings: Settings, count: int) -> list[str]:
    """``count`` realistic results (a few hundred bytes of output each), as workers write them."""
    await ensure_topics(settings)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    async with AIOKafkaProducer(**{**producer_options(settings), "linger_ms": 20}) as producer:
        pending = []
        for n, execution_id in enumerate(ids):
            result = ExecutionResult(
                execution_id=execution_id,
                correlation_id=execution_id,
                status=Status.SUCCEEDED,
                success=True,
                output={"n": n, "squares": [n * k for k in range(20)]},
                stdout=f"job {n} done\n" * 8,
                worker_id="bench",
                job_type="default",
                finished_at=t0 + timedelta(milliseconds=n),
            )
            key = execution_id.encode()
            pending.append(await producer.send(settings.results_topic, dumps(result), key=key))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    return ids


class Gateway:
    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = spawn([sys.executable, "-m", "tako_stream", "gateway"], self.env, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)

    async def caught_up(self, session: aiohttp.ClientSession, newest: str) -> tuple[float, float]:
        """Seconds from now to ready, and to the newest result served."""
        started = time.monotonic()
        ready_at = served_at = None
        while served_at is None:
            try:
                async with session.get(f"{self.url}/jobs/{newest}") as resp:
                    if resp.status == 200:
                        served_at = time.monotonic()
                async with session.get(f"{self.url}/ready") as resp:
                    if resp.status == 200 and ready_at is None:
                        ready_at = time.monotonic()
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        return (ready_at or served_at) - started, served_at - started


async def lookups(url: str, ids: list[str], clients: int, per_client: int) -> list[float]:
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            for _ in range(per_client):
                execution_id = random.choice(ids)
                began = time.perf_counter()
                async with session.get(f"{url}/jobs/{execution_id}") as resp:
                    await resp.read()
                latencies.append((time.perf_counter() - began) * 1000)

        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


async def main(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"results": args.results}
    work = Path(tempfile.mkdtemp(prefix="tako-bench-gw-"))
    port = free_port()
    broker = spawn(embedded.command("127.0.0.1", port), None, None)
    worker: subprocess.Popen[bytes] | None = None
    gateway: Gateway | None = None
    try:
        assert embedded.wait_until_listening("127.0.0.1", port, 30)
        tag = uuid.uuid4().hex[:8]
        values = {
            "kafka_bootstrap_servers": f"localhost:{port}",
            "requests_topic": f"b{tag}.requests",
            "results_topic": f"b{tag}.results",
            "dlq_topic": f"b{tag}.dlq",
            "control_topic": f"b{tag}.control",
            "status_topic": f"b{tag}.status",
            "consumer_group": f"b{tag}",
            "breaker_topic": f"b{tag}.breaker",
            "gateway_state_dir": str(work / "state"),
            "worker_id": f"bench-{tag}",
        }
        settings = Settings(**values)  # type: ignore[arg-type]
        began = time.monotonic()
        ids = await load(settings, args.results)
        figures["load_seconds"] = round(time.monotonic() - began, 1)
        print(f"{args.results} results on the topic in {figures['load_seconds']}s")
        env = {**os.environ, **{f"TAKO_{k.upper()}": str(v) for k, v in values.items()}}
        gw_port = free_port()
        gateway = Gateway(
            {**env, "TAKO_GATEWAY_PORT": str(gw_port), "TAKO_GATEWAY_HOST": "127.0.0.1"},
            gw_port,
            work / "gateway.log",
        )
        async with aiohttp.ClientSession() as session:
            gateway.start()
            ready, served = await gateway.caught_up(session, ids[-1])
            figures["first_start_ready_s"], figures["first_start_newest_s"] = (
                round(ready, 2),
                round(served, 2),
            )
            assert gateway.proc is not None
            figures["rss_mb"] = round(rss_mb(gateway.proc.pid), 1)
            print(f"first start: ready {ready:.1f}s, newest served {served:.1f}s")
            print(f"gateway RSS once caught up: {figures['rss_mb']} MB")
            per_client = 50 if args.quick else 100
            known = await lookups(gateway.url, ids, 20, per_client)
            unknown = await lookups(
                gateway.url, [str(uuid.uuid4()) for _ in range(1000)], 20, per_client
            )
            for name, values_ms in (("known", known), ("unknown", unknown)):
                figures[f"jobs_{name}_p50_ms"] = round(statistics.median(values_ms), 1)
                figures[f"jobs_{name}_p99_ms"] = round(percentile(values_ms, 0.99), 1)
                print(
                    f"GET /jobs/{{id}} {name:7} ids, 20 clients: p50 "
                    f"{figures[f'jobs_{name}_p50_ms']} ms, p99 {figures[f'jobs_{name}_p99_ms']} ms"
                )
            gateway.stop()
            gateway.start()
            ready, served = await gateway.caught_up(session, ids[-1])
            figures["restart_ready_s"], figures["restart_newest_s"] = (
                round(ready, 2),
                round(served, 2),
            )
            print(f"restart: ready {ready:.1f}s, newest served {served:.1f}s")

            # Sync /execute at low load, against the Kafka client path, with a real worker.
            worker = spawn(
                [sys.executable, "-m", "tako_stream", "worker"],
                {**env, "TAKO_WEB_PORT": str(free_port()), "TAKO_WORKER_ID": f"w-{tag}"},
                work / "worker.log",
            )
            async with Client(settings) as client:
                await client.run("print(0)", wait=180)  # the worker is up and warm
                via_kafka, via_http = [], []
                for _ in range(10 if args.quick else 30):
                    t = time.perf_counter()
                    await client.run("print(1)", wait=60)
                    via_kafka.append((time.perf_counter() - t) * 1000)
                    t = time.perf_counter()
                    async with session.post(
                        f"{gateway.url}/execute", json={"code": "print(1)"}
                    ) as resp:
                        assert resp.status == 200, await resp.text()
                    via_http.append((time.perf_counter() - t) * 1000)
                    await asyncio.sleep(0.25)
            figures["execute_p50_ms"] = round(statistics.median(via_http), 1)
            figures["client_run_p50_ms"] = round(statistics.median(via_kafka), 1)
            print(
                f"sync POST /execute p50 {figures['execute_p50_ms']} ms; the Kafka client's "
                f"run() p50 {figures['client_run_p50_ms']} ms"
            )
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(60)
        if gateway is not None:
            gateway.stop()
        broker.terminate()
        broker.wait(10)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench-gateway.json")
    arguments = parser.parse_args()
    result = asyncio.run(main(arguments))
    Path(arguments.out).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"written to {arguments.out}")
