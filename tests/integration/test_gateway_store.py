"""The gateway's store against the real broker: it resumes, it gates, it finds, it agrees.

Results and statuses are produced straight to the topics here (as workers would), so the
tests control exactly what the store has to read; jobs run by a real worker where it matters.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import orjson
import pytest
import requests
from aiokafka import AIOKafkaProducer

from tako_stream.core.errors import ErrorType, Status
from tako_stream.core.models import (
    CORRELATION_HEADER,
    DLQRecord,
    ErrorInfo,
    ExecutionResult,
    JobStatus,
    SourcePosition,
)
from tako_stream.kafka.clients import producer_options
from tako_stream.kafka.codec import dumps
from tako_stream.kafka.topics import ensure_topics
from tests.integration.stack import Stack, free_port

pytestmark = [pytest.mark.integration]

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Gateway:
    def __init__(self, stack: Stack, state_dir: Path, name: str) -> None:
        self.stack = stack
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = stack.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **env: str) -> None:
        child = {
            **os.environ,
            **{f"TAKO_{k.upper()}": str(v) for k, v in self.stack.env_settings().items()},
            "TAKO_GATEWAY_PORT": str(self.port),
            "TAKO_GATEWAY_HOST": "127.0.0.1",
            "TAKO_GATEWAY_STATE_DIR": str(self.state_dir),
            **env,
        }
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tako_stream", "gateway"],
                env=child,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, self.url + path, timeout=aiohttp.ClientTimeout(total=120), **kw
            ) as resp,
        ):
            return resp.status, await resp.json()

    async def up(self) -> None:
        """Until it answers at all (not necessarily ready)."""
        for _ in range(240):
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                await self.call("GET", "/health")
                return
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.25)
        raise AssertionError(f"gateway not up:\n{self.log.read_text()}")

    async def ready(self) -> dict[str, Any]:
        for _ in range(600):
            _, health = await self.call("GET", "/health")
            if health.get("ready"):
                return dict(health)
            await asyncio.sleep(0.25)
        raise AssertionError(f"gateway not ready:\n{self.log.read_text()}")


@contextmanager
def gateways(stack: Stack, *names: str) -> Iterator[list[Gateway]]:
    started = [Gateway(stack, stack.workdir / f"{name}-state", name) for name in names]
    try:
        yield started
    finally:
        for gateway in started:
            gateway.stop()


def result(execution_id: str, seconds: float, pad: int = 0) -> bytes:
    return dumps(
        ExecutionResult(
            execution_id=execution_id,
            correlation_id="c",
            status=Status.SUCCEEDED,
            success=True,
            stdout=f"{execution_id}\n",
            output={"pad": "x" * pad} if pad else None,
            worker_id="test",
            finished_at=T0 + timedelta(seconds=seconds),
        )
    )


@asynccontextmanager
async def producer(stack: Stack) -> AsyncIterator[AIOKafkaProducer]:
    await ensure_topics(stack.settings)
    async with AIOKafkaProducer(**producer_options(stack.settings)) as kafka:
        yield kafka


async def produce_results(stack: Stack, ids: list[str], first: int = 0, pad: int = 0) -> None:
    async with producer(stack) as kafka:
        sent = [
            await kafka.send(
                stack.settings.results_topic, result(i, first + n, pad), key=i.encode()
            )
            for n, i in enumerate(ids)
        ]
        for future in sent:
            await future


async def test_a_restart_resumes_from_the_stored_positions(new_stack: Stack) -> None:
    first = [f"r{n}-{new_stack.tag}" for n in range(300)]
    await produce_results(new_stack, first)
    with gateways(new_stack, "gw") as (gateway,):
        gateway.start()
        await gateway.up()
        health = await gateway.ready()
        assert health["executions_known"] == 300 and health["records_read"] >= 300
        gateway.stop()
        later = [f"s{n}-{new_stack.tag}" for n in range(20)]
        await produce_results(new_stack, later, first=1000)
        gateway.start()
        await gateway.up()
        health = await gateway.ready()
        assert health["executions_known"] == 320
        # Only what is new (and the last record of each partition, read again to check that
        # the topic is the one the store knows) was read.
        assert health["records_read"] <= 20 + new_stack.settings.topic_partitions * 4, health
        status, job = await gateway.call("GET", f"/jobs/{first[0]}/result")
        assert status == 200 and job["status"] == "succeeded" and job["stdout"] == f"{first[0]}\n"
        status, page = await gateway.call("GET", "/executions?limit=3")
        assert [item["execution_id"] for item in page["items"]] == later[::-1][:3]


async def test_a_page_longer_than_a_batch_is_streamed_and_read_whole(new_stack: Stack) -> None:
    """300 results of 40 KB: a 12 MB page, a dozen batches of the gateway's, streamed rather
    than built whole.  Tako VM's clients (aiohttp, requests) read it as before, paging by
    ``limit`` reads every result once, and a client holding a page unread stalls no one."""
    ids = [f"p{n:03}-{new_stack.tag}" for n in range(300)]
    await produce_results(new_stack, ids, pad=40_000)
    newest = ids[::-1]
    with gateways(new_stack, "gw") as (gateway,):
        gateway.start()
        await gateway.up()
        await gateway.ready()
        url = f"{gateway.url}/executions?limit=300"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            assert resp.status == 200 and resp.headers["Transfer-Encoding"] == "chunked"
            assert resp.headers["Content-Type"] == "application/json"
            assert resp.headers["X-Correlation-ID"] and resp.headers["X-Frame-Options"]
            page = orjson.loads(await resp.read())
        assert [item["execution_id"] for item in page["items"]] == newest
        assert (page["limit"], page["offset"], page["count"], page["total"]) == (300, 0, 300, 300)
        assert page["has_more"] is False
        assert all(item["output"] == {"pad": "x" * 40_000} for item in page["items"])
        answer = await asyncio.to_thread(requests.get, url, timeout=120)
        assert answer.status_code == 200 and answer.json() == page
        seen: list[str] = []
        offset, has_more = 0, True
        while has_more:
            status, part = await gateway.call("GET", f"/executions?limit=70&offset={offset}")
            assert status == 200 and part["count"] == len(part["items"]), part
            seen += [item["execution_id"] for item in part["items"]]
            offset, has_more = offset + part["limit"], part["has_more"]
        assert seen == newest
        # A client that asks for the page and reads nothing past its headers.
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(b"GET /executions?limit=300 HTTP/1.1\r\nHost: gw\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
            status, health = await gateway.call("GET", "/health")
            assert status == 200 and health["executions_known"] == 300
        finally:
            writer.close()


async def test_records_the_store_cannot_use_stop_nothing(new_stack: Stack) -> None:
    """Anyone may write to the results and DLQ topics: a result whose ``finished_at`` is null,
    or a DLQ record whose time in UTC is before year 1, once ended the reading of the topics
    into the store for good (and again after every restart), while /ready still said 200."""
    settings = new_stack.settings
    year_one = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    dead = DLQRecord(
        dlq_id=f"poison-{new_stack.tag}",
        execution_id=f"poison-{new_stack.tag}",
        correlation_id="c",
        error=ErrorInfo(type=ErrorType.INVALID_REQUEST, message="x"),
        attempts=1,
        first_failure_at=year_one,
        last_failure_at=year_one,
        worker_id="w",
        source=SourcePosition(topic=settings.requests_topic, partition=0, offset=0),
        original_value=None,
    )
    with gateways(new_stack, "gw") as (gateway,):
        gateway.start()
        await gateway.up()
        await gateway.ready()
        async with producer(new_stack) as kafka:
            poison = b'{"status": "x", "finished_at": null}'
            await kafka.send_and_wait(settings.results_topic, poison, key=b"poison")
            await kafka.send_and_wait(settings.dlq_topic, dumps(dead), key=dead.dlq_id.encode())
        for attempt in ("read live", "read again after a restart"):
            if attempt != "read live":  # resumes from the stored positions, the last record
                gateway.stop()  # of each partition read again (the poison ones, here)
                gateway.start()
                await gateway.up()
                await gateway.ready()
            code, accepted = await gateway.call("POST", "/execute/async", json={"code": "1"})
            assert code == 200, (attempt, accepted)
            job_id = accepted["job_id"]
            await produce_results(new_stack, [job_id])  # as a worker would answer it
            code, record = await gateway.call("GET", f"/jobs/{job_id}/result?wait=true&timeout=60")
            assert code == 200 and record["stdout"] == f"{job_id}\n", (attempt, record)
            code, job = await gateway.call("GET", f"/jobs/{job_id}")
            assert code == 200 and job["status"] == "succeeded", (attempt, job)
            code, ready = await gateway.call("GET", "/ready")
            assert code == 200, (attempt, ready)


async def test_requests_before_catch_up_never_get_a_wrong_404(new_stack: Stack) -> None:
    ids = [f"c{n}-{new_stack.tag}" for n in range(20_000)]
    await produce_results(new_stack, ids)
    with gateways(new_stack, "gw") as (gateway,):
        gateway.start(TAKO_GATEWAY_READY_WAIT="0")
        await gateway.up()
        seen = []
        for _ in range(2000):
            status, _ = await gateway.call("GET", f"/jobs/{ids[-1]}")
            seen.append(status)
            if status == 200:
                break
        assert seen[-1] == 200 and set(seen) <= {200, 503}, seen
        status, _ = await gateway.call("GET", "/ready")
        assert status == 200


async def test_jobs_are_found_whatever_partition_the_producer_chose(new_stack: Stack) -> None:
    """A librdkafka client hashes keys with CRC32, not murmur2: the record lands elsewhere
    than aiokafka would put it, and is still found (point reads do not guess partitions)."""
    worker = new_stack.start_worker()
    await worker.wait_ready()
    with gateways(new_stack, "gw") as (gateway,):
        gateway.start()
        await gateway.up()
        await gateway.ready()
        execution_id = f"crc-{new_stack.tag}"
        async with producer(new_stack) as kafka:
            await kafka.send_and_wait(
                new_stack.settings.requests_topic,
                dumps({"execution_id": execution_id, "code": "print('anywhere')"}),
                key=execution_id.encode(),
                partition=3,  # wherever CRC32 would put it; not where murmur2 does
                headers=[(CORRELATION_HEADER, b"crc")],
            )
        status, record = await gateway.call(
            "GET", f"/jobs/{execution_id}/result?wait=true&timeout=120"
        )
        assert status == 200 and record["stdout"] == "anywhere\n", record


async def test_a_finished_job_never_reads_running(new_stack: Stack) -> None:
    execution_id = f"late-{new_stack.tag}"
    status = dumps(JobStatus(execution_id=execution_id, worker_id="w", correlation_id="c", at=T0))
    async with producer(new_stack) as kafka:
        await kafka.send_and_wait(
            new_stack.settings.status_topic, status, key=execution_id.encode()
        )
    await produce_results(new_stack, [execution_id])
    async with producer(new_stack) as kafka:  # a late "running", as a re-run would announce
        await kafka.send_and_wait(
            new_stack.settings.status_topic, status, key=execution_id.encode()
        )
    with gateways(new_stack, "gw") as (gateway,):
        gateway.start()
        await gateway.up()
        await gateway.ready()
        code, job = await gateway.call("GET", f"/jobs/{execution_id}")
        assert code == 200 and job["status"] == "succeeded", job


async def test_racing_idempotent_submits_give_one_job_and_one_409(new_stack: Stack) -> None:
    worker = new_stack.start_worker()
    await worker.wait_ready()
    with gateways(new_stack, "a", "b") as (a, b):
        for gateway in (a, b):
            gateway.start()
            await gateway.up()
            await gateway.ready()
        key = f"order-{new_stack.tag}"
        answers = await asyncio.gather(
            a.call("POST", "/execute/async", json={"code": "print('a')", "idempotency_key": key}),
            b.call("POST", "/execute/async", json={"code": "print('b')", "idempotency_key": key}),
        )
        codes = sorted(code for code, _ in answers)
        assert codes == [200, 409], answers
        (winner,) = [body for code, body in answers if code != 409]
        code, record = await a.call("GET", f"/jobs/{winner['job_id']}/result?wait=true&timeout=120")
        assert code == 200 and record["success"]
        await asyncio.sleep(3)  # a second run would be answered by now
        # Both gateways agree on the one answer.
        for gateway in (a, b):
            code, page = await gateway.call("GET", "/executions?limit=10")
            assert [i["execution_id"] for i in page["items"]].count(winner["job_id"]) == 1
            code, job = await gateway.call("GET", f"/jobs/{winner['job_id']}/result")
            assert job["stdout"] == record["stdout"]


async def test_every_result_is_served_whatever_the_cache_holds(new_stack: Stack) -> None:
    """The store's page cache is bounded (4 MB here, against 20 MB of results): results that
    no cache holds any more are read from the store, never answered 404."""
    ids = [f"e{n}-{new_stack.tag}" for n in range(10_000)]
    await produce_results(new_stack, ids, pad=2000)
    with gateways(new_stack, "gw") as (gateway,):
        gateway.start(TAKO_GATEWAY_CACHE_MB="4")
        await gateway.up()
        await gateway.ready()
        for execution_id in [*ids[::97], ids[0], ids[-1]]:
            status, job = await gateway.call("GET", f"/jobs/{execution_id}/result")
            assert status == 200 and job["stdout"] == f"{execution_id}\n", (execution_id, job)


async def test_the_gateway_knows_the_workers_from_their_reports(
    new_stack: Stack, docker: aiodocker.Docker
) -> None:
    """The gateway never talks to Docker: capacity, engines, runtimes and images come from the
    workers' reports, and a worker that stops is counted out at once (its tombstone)."""
    with gateways(new_stack, "gw") as (gateway,):
        gateway.start()
        await gateway.up()
        await gateway.ready()
        code, pool = await gateway.call("GET", "/pool/stats")
        assert code == 200 and pool["max_workers"] == 0, pool  # no worker yet
        code, job_type = await gateway.call("GET", "/job-types/default")
        assert job_type["image_exists"] is None  # no worker to ask

        worker = new_stack.start_worker(TAKO_POOL_SIZE="3", TAKO_WORKER_REPORT_INTERVAL="1")
        await worker.wait_ready()
        for _ in range(60):
            code, health = await gateway.call("GET", "/health")
            if health["workers"] == 1:
                break
            await asyncio.sleep(0.5)
        assert health["workers"] == 1 and health["queue_stats"]["max_workers"] == 3, health
        assert health["docker_available"] is True
        runtimes = (await docker.system.info())["Runtimes"]
        assert health["gvisor_available"] is ("runsc" in runtimes)
        code, job_type = await gateway.call("GET", "/job-types/default")
        assert job_type["image_exists"] is True

        worker.kill(signal.SIGTERM)
        assert worker.wait_exit(60) == 0
        for _ in range(60):
            code, pool = await gateway.call("GET", "/pool/stats")
            if pool["max_workers"] == 0:
                break
            await asyncio.sleep(0.5)
        assert pool["max_workers"] == 0, pool


async def test_tako_vms_api_protections_rate_limit_and_payload_cap(new_stack: Stack) -> None:
    with gateways(new_stack, "gw") as (gateway,):
        gateway.start(
            TAKO_GATEWAY_RATE_LIMIT="3",
            TAKO_GATEWAY_RATE_WINDOW="30",
            TAKO_GATEWAY_MAX_PAYLOAD_BYTES=str(64 * 1024),
        )
        await gateway.up()  # one request of the three (those refused never reached it)
        async with aiohttp.ClientSession() as session:
            for _ in range(600):  # /ready is never limited: probes must always get through
                async with session.get(gateway.url + "/ready") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.25)
            codes = []
            for _ in range(3):
                async with session.get(gateway.url + "/job-types") as resp:
                    codes.append(resp.status)
                    body, headers = await resp.json(), resp.headers
            assert codes == [200, 200, 429], codes
            assert body["detail"] == "Rate limit exceeded. Try again later.", body
            assert 1 <= int(headers["Retry-After"]) <= 30
            assert headers["X-Content-Type-Options"] == "nosniff"
    with gateways(new_stack, "big") as (gateway,):
        gateway.start(TAKO_GATEWAY_MAX_PAYLOAD_BYTES=str(64 * 1024))
        await gateway.up()
        await gateway.ready()
        huge = orjson.dumps({"code": "print(1)", "input_data": {"x": "y" * 70_000}})
        expected = "Payload too large. Maximum allowed size is 65536 bytes."

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused when read
            for start in range(0, len(huge), 8192):
                yield huge[start : start + 8192]

        async with aiohttp.ClientSession() as session:
            for data in (huge, chunks()):
                async with session.post(gateway.url + "/execute/async", data=data) as resp:
                    body = await resp.json()
                    assert resp.status == 413 and body["detail"] == expected, body
                    assert "correlation_id" in body
            small = {"code": "print(1)"}
            async with session.post(gateway.url + "/execute/async", json=small) as resp:
                assert resp.status == 200


async def test_optional_api_keys(new_stack: Stack) -> None:
    with gateways(new_stack, "keyed") as (gateway,):
        gateway.start(TAKO_GATEWAY_API_KEYS="first-key-123, second-key-456")
        await gateway.up()
        async with aiohttp.ClientSession() as session:
            for _ in range(600):  # the readiness probe needs no key
                async with session.get(gateway.url + "/ready") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.25)
            for headers, expected in (
                ({}, 401),
                ({"X-API-Key": "wrong"}, 401),
                ({"Authorization": "Bearer first-key-12"}, 401),
                ({"X-API-Key": "first-key-123"}, 200),
                ({"Authorization": "Bearer second-key-456"}, 200),
            ):
                async with session.get(gateway.url + "/job-types", headers=headers) as resp:
                    body = await resp.json()
                    assert resp.status == expected, (headers, body)
                    if expected == 401:
                        assert body["detail"] == "Invalid or missing API key"
                        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            async with session.post(
                gateway.url + "/execute/async", json={"code": "print(1)"}
            ) as resp:
                assert resp.status == 401  # nothing reaches Kafka without a key
