"""compose/: the deployment as an operator runs it, with Debian's docker-compose.

The images are built here (compose/build: no registry), the stack comes up under its own
project name and ports (so it never meets the other tests' broker, workers or gateway on 8000),
jobs go in through the gateway and through Kafka, one worker container is stopped while jobs
run, every job still gets its result, and the stack is torn down whatever happened.

Ports: TAKO_TEST_COMPOSE_{BROKER,GATEWAY,WORKER1,WORKER2}_PORT (19092, 18000, 16066, 16067).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from tako_stream.client import Producer, ResultReader
from tako_stream.core.models import ExecutionResult
from tako_stream.kafka.clients import producer_options
from tako_stream.kafka.codec import dumps
from tako_stream.sandbox.docker import LABEL, LABEL_WORKER
from tako_stream.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose" / "docker-compose.yml"
BUILD = REPO / "compose" / "build"


def _port(name: str, default: int) -> int:
    return int(os.environ.get(f"TAKO_TEST_COMPOSE_{name}_PORT", default))


@dataclass
class ComposeStack:
    project: str
    env: dict[str, str]
    broker_port: int
    gateway_port: int
    worker_ports: dict[str, int]  # service -> health port
    worker_ids: dict[str, str]  # service -> TAKO_WORKER_ID
    logdir: Path

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def settings(self) -> Settings:
        return Settings(
            kafka_bootstrap_servers=f"localhost:{self.broker_port}",
            worker_id=f"{self.project}-test-client",
        )

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def state(self, service: str) -> str:
        """'STATUS EXITCODE' of the service's container."""
        ids = self.compose("ps", "-q", service).stdout.split()
        out = subprocess.run(
            ["docker", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", *ids],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def logs(self, *services: str) -> str:
        out = self.compose("logs", "--no-color", "--tail", "80", *services, timeout=60)
        return out.stdout + out.stderr

    async def get(self, url: str) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=120)) as resp,
        ):
            return resp.status, await resp.json()

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                self.gateway + path, json=body, timeout=aiohttp.ClientTimeout(total=180)
            ) as resp,
        ):
            return resp.status, await resp.json()

    async def health(self, url: str) -> dict[str, Any] | None:
        try:
            status, body = await self.get(url)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return body if status == 200 and isinstance(body, dict) else None

    async def worker_health(self, service: str) -> dict[str, Any] | None:
        return await self.health(f"http://127.0.0.1:{self.worker_ports[service]}/health")

    async def wait_up(self, timeout: float = 180) -> None:
        """Until the gateway answers healthy and both workers own request partitions."""
        deadline = time.monotonic() + timeout
        pending = {"gateway", *self.worker_ports}
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                if name == "gateway":
                    health = await self.health(self.gateway + "/health")
                    up = health is not None and health.get("status") == "healthy"
                else:
                    health = await self.worker_health(name)
                    up = health is not None and health.get("ready") is True
                if up:
                    pending.discard(name)
            if pending:
                await asyncio.sleep(1)
        if pending:
            raise AssertionError(f"not up in {timeout}s: {sorted(pending)}\n{self.logs()}")


def check_free(ports: dict[str, int]) -> None:
    """Fail clearly, before compose starts anything, when a port is taken (a stack left by an
    interrupted run: `docker ps --filter name=takotest`)."""
    for name, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                raise RuntimeError(
                    f"port {port} for {name} is in use ({exc}); set "
                    f"TAKO_TEST_COMPOSE_{name.upper()}_PORT to another"
                ) from exc


def job_containers(worker_ids: list[str]) -> list[str]:
    """Sandbox containers (any state) started by these workers."""
    found: list[str] = []
    for worker_id in worker_ids:
        out = subprocess.run(
            [
                "docker",
                "ps",
                "-aq",
                "--filter",
                f"label={LABEL}",
                "--filter",
                f"label={LABEL_WORKER}={worker_id}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        found += out.stdout.split()
    return found


@pytest.fixture(scope="module")
def compose_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    if shutil.which("docker-compose") is None:
        raise RuntimeError("docker-compose is missing: scripts/setup installs it")
    build = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, f"compose/build failed:\n{build.stdout}\n{build.stderr}"

    project = f"takotest{uuid.uuid4().hex[:8]}"
    ports = {
        "broker": _port("BROKER", 19092),
        "gateway": _port("GATEWAY", 18000),
        "worker1": _port("WORKER1", 16066),
        "worker2": _port("WORKER2", 16067),
    }
    check_free(ports)
    worker_ids = {"worker1": f"{project}-worker1", "worker2": f"{project}-worker2"}
    env = {
        **os.environ,
        "TAKO_COMPOSE_LISTEN": "127.0.0.1",
        "TAKO_COMPOSE_BROKER_PORT": str(ports["broker"]),
        "TAKO_COMPOSE_GATEWAY_PORT": str(ports["gateway"]),
        "TAKO_COMPOSE_WORKER1_PORT": str(ports["worker1"]),
        "TAKO_COMPOSE_WORKER2_PORT": str(ports["worker2"]),
        "TAKO_COMPOSE_WORKER1_ID": worker_ids["worker1"],
        "TAKO_COMPOSE_WORKER2_ID": worker_ids["worker2"],
    }
    stack = ComposeStack(
        project=project,
        env=env,
        broker_port=ports["broker"],
        gateway_port=ports["gateway"],
        worker_ports={"worker1": ports["worker1"], "worker2": ports["worker2"]},
        worker_ids=worker_ids,
        logdir=tmp_path_factory.mktemp("compose"),
    )
    try:
        up = stack.compose("up", "-d")
        assert up.returncode == 0, f"docker-compose up failed:\n{up.stdout}\n{up.stderr}"
        yield stack
    finally:
        (stack.logdir / "compose.log").write_text(stack.logs())
        down = stack.compose("down", "-v", "--remove-orphans", "-t", "60")
        # Job containers a worker left (a SIGKILLed worker cannot remove its own).
        left = job_containers(list(worker_ids.values()))
        if left:
            subprocess.run(["docker", "rm", "-f", *left], capture_output=True, check=False)
        assert down.returncode == 0, f"docker-compose down failed:\n{down.stdout}\n{down.stderr}"


@pytest.fixture(scope="module")
async def stack(compose_stack: ComposeStack) -> AsyncIterator[ComposeStack]:
    await compose_stack.wait_up()
    yield compose_stack


async def test_compose_up(stack: ComposeStack) -> None:
    ps = stack.compose("ps", "--services", "--filter", "status=running")
    assert sorted(ps.stdout.split()) == ["broker", "gateway", "worker1", "worker2"], ps
    for service, worker_id in stack.worker_ids.items():
        health = await stack.worker_health(service)
        assert health is not None
        assert health["worker_id"] == worker_id
        assert health["docker_available"] is True
        # the warm pool is started in the host's engine from the sandbox images
        assert health["warm_pool"], health


async def test_jobs_through_the_gateway(stack: ComposeStack) -> None:
    code = (
        "import json\n"
        "data = json.load(open('/input/data.json'))\n"
        "json.dump({'sum': sum(data['xs'])}, open('/output/result.json', 'w'))\n"
        "print('summed', len(data['xs']))\n"
    )
    status, body = await stack.post("/execute", {"code": code, "input_data": {"xs": [1, 2, 3]}})
    assert status == 200, body
    assert body["success"] is True, body
    assert body["output"] == {"sum": 6}
    assert body["stdout"] == "summed 3\n"

    status, body = await stack.post("/execute", {"code": "1 / 0"})
    assert status == 200, body
    assert body["success"] is False
    assert body["error_type"] == "division_error", body

    status, body = await stack.post(
        "/execute",
        {
            "code": "import pandas; print(pandas.DataFrame({'x': [1, 3]})['x'].mean())",
            "job_type": "data-processing",
        },
    )
    assert status == 200, body
    assert (body["success"], body["stdout"]) == (True, "2.0\n"), body

    status, accepted = await stack.post("/execute/async", {"code": "print('later')"})
    assert status == 200 and accepted["status"] == "queued", accepted
    assert accepted["status"] == "queued"
    status, record = await stack.get(
        f"{stack.gateway}/jobs/{accepted['job_id']}/result?wait=true&timeout=120"
    )
    assert status == 200, record
    assert record["job_id"] == accepted["job_id"]
    assert (record["status"], record["stdout"]) == ("succeeded", "later\n"), record
    assert record["worker_id"] in stack.worker_ids.values()


async def test_jobs_through_kafka(stack: ComposeStack) -> None:
    settings = stack.settings
    async with ResultReader(settings) as reader, Producer(settings) as producer:
        ids = {
            await producer.submit({"code": f"print({i} * {i})", "execution_id": f"kafka-{i}"})
            for i in range(16)
        }
        found = await reader.wait_for(ids, 180)
    assert set(found) == ids, f"no result for {sorted(ids - set(found))}\n{stack.logs()}"
    for i in range(16):
        result = found[f"kafka-{i}"]
        assert result.status.value == "succeeded", result
        assert result.stdout == f"{i * i}\n"
    # both workers own request partitions, so both answered some of the 16 (ids spread by key)
    assert {r.worker_id for r in found.values()} == set(stack.worker_ids.values())


async def _produce(
    settings: Settings, bodies: list[dict[str, Any]], *, spread: bool = False
) -> dict[str, int]:
    """Produce requests as any Kafka client would; execution id -> partition. With ``spread``,
    round-robin over every partition instead of by key."""
    partitions: dict[str, int] = {}
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        count = len(await producer.partitions_for(settings.requests_topic))
        for n, body in enumerate(bodies):
            meta = await producer.send_and_wait(
                settings.requests_topic,
                value=dumps(body),
                key=body["execution_id"].encode(),
                partition=n % count if spread else None,
            )
            partitions[body["execution_id"]] = meta.partition
    finally:
        await producer.stop()
    return partitions


async def test_worker_stopped_while_jobs_run_loses_nothing(stack: ComposeStack) -> None:
    """`docker-compose stop worker1` with jobs running and queued: every job still gets a
    result, worker2 takes over worker1's partitions, and worker1 leaves no container."""
    settings = stack.settings
    w1, w2 = stack.worker_ids["worker1"], stack.worker_ids["worker2"]
    tag = uuid.uuid4().hex[:6]
    code = "import time; time.sleep(2); print('slept')"
    first = [{"execution_id": f"stop-{tag}-a{i}", "code": code} for i in range(40)]
    after = [{"execution_id": f"stop-{tag}-b{i}", "code": "print('after')"} for i in range(16)]
    results: dict[str, ExecutionResult] = {}
    wanted: set[str] = set()
    all_in = asyncio.Event()
    async with ResultReader(settings) as reader:

        async def collect() -> None:
            async for result, _ in reader:
                if result is not None:
                    results.setdefault(result.execution_id, result)
                    if wanted and wanted <= results.keys():
                        all_in.set()

        collector = asyncio.create_task(collect())
        try:
            partitions = await _produce(settings, first)
            # Stop worker1 once it has answered one of these jobs and still has others running.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                health = await stack.worker_health("worker1")
                answered = any(results[i].worker_id == w1 for i in partitions if i in results)
                if answered and health is not None and health["in_flight"] > 0:
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"worker1 never busy:\n{stack.logs('worker1')}")
            w1_partitions = {
                p for i, p in partitions.items() if i in results and results[i].worker_id == w1
            }
            stop = await asyncio.to_thread(stack.compose, "stop", "-t", "60", "worker1")
            assert stop.returncode == 0, stop.stderr
            # worker1 is gone: jobs produced now to its former partitions (every partition gets
            # two) can only be run by worker2, once it has taken them over.
            partitions.update(await _produce(settings, after, spread=True))
            wanted.update(partitions)
            if wanted <= results.keys():
                all_in.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), 240)
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)

    missing = sorted(set(partitions) - set(results))
    assert not missing, f"{len(missing)} job(s) lost: {missing}\n{stack.logs()}"
    ours = {i: results[i] for i in partitions}
    assert all(r.status.value == "succeeded" for r in ours.values()), [
        (r.execution_id, r.status, r.error) for r in ours.values() if not r.success
    ]
    taken_over = [i for i in ours if partitions[i] in w1_partitions and ours[i].worker_id == w2]
    assert taken_over, f"worker2 answered nothing from worker1's partitions {w1_partitions}"
    by_worker = {w: sum(r.worker_id == w for r in ours.values()) for w in (w1, w2)}
    print(
        f"\n{len(ours)} jobs answered ({by_worker}); worker1 stopped with jobs in flight; "
        f"worker2 answered {len(taken_over)} from worker1's partitions {sorted(w1_partitions)}"
    )

    assert stack.state("worker1") == "exited 0", stack.logs("worker1")
    # a worker stopped with `docker stop` removes its job containers (warm ones included)
    assert job_containers([w1]) == [], stack.logs("worker1")
    health = await stack.worker_health("worker2")
    assert health is not None and health["ready"] is True, health
