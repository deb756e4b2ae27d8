"""Breaker, retry and health across two workers, with real Docker faults.

The workers reach the real daemon through a proxy socket this test controls
(``tests/faults/dockerproxy.py``): "down" closes it like a crashed daemon, and single API calls
can be made to fail with a 500, so every fault is real for the workers' aiodocker clients.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tako_stream import dlq
from tako_stream.client import Producer, ResultReader
from tests.faults.dockerproxy import DockerProxy
from tests.integration.stack import Stack, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BREAKER_ENV = {
    "TAKO_BREAKER_FAILURE_THRESHOLD": "3",
    "TAKO_BREAKER_RESET_TIMEOUT": "6",
    "TAKO_BREAKER_PING_INTERVAL": "1",
    "TAKO_RETRY_BASE_DELAY": "0.3",
}


@pytest.fixture
def proxy() -> Iterator[DockerProxy]:
    # A short path: Unix socket paths are limited to about 107 bytes, too few for tmp_path.
    directory = tempfile.mkdtemp(prefix="tkp-", dir="/tmp")
    try:
        with DockerProxy(os.path.join(directory, "docker.sock")) as p:
            yield p
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def breaker_state(worker: WorkerProcess) -> str | None:
    health = await worker.health()
    return health["circuit_breaker"]["state"] if health else None


async def wait_state(workers: list[WorkerProcess], state: str, seconds: float) -> float:
    """Seconds until every worker reports ``state``."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        states = [await breaker_state(w) for w in workers]
        if all(s == state for s in states):
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise AssertionError(f"breaker never {state} on every worker: {states}")


def job(code: str = "print('ok')") -> dict[str, object]:
    return {"execution_id": str(uuid.uuid4()), "code": code}


async def test_breaker_shared_by_two_workers_and_replay_after_recovery(
    new_stack: Stack, proxy: DockerProxy
) -> None:
    env = {**BREAKER_ENV, "DOCKER_HOST": f"unix://{proxy.listen_path}"}
    a = new_stack.start_worker(**env)
    # b never pings: every failure and recovery it sees is one that a observed.
    b = new_stack.start_worker(**{**env, "TAKO_BREAKER_PING_INTERVAL": "3600"})
    await asyncio.gather(a.wait_ready(180), b.wait_ready(180))
    settings = new_stack.settings
    assert (await a.health() or {})["status"] == "healthy"
    assert await breaker_state(b) == "closed"

    # Docker goes away: a's pings open the one breaker both workers share.
    proxy.set_down(True)
    await wait_state([a, b], "open", 20)
    health = await b.health()
    assert health is not None and health["status"] == "degraded"
    assert (await a.health() or {})["docker_available"] is False
    assert health["circuit_breaker"]["failure_count"] >= 3
    assert health["circuit_breaker"]["last_failure"]

    # While open, jobs are answered at once, without a container, and dead-lettered.
    requests = [job(f"print({n})") for n in range(6)]
    ids = {str(r["execution_id"]) for r in requests}
    async with ResultReader(settings) as reader, Producer(settings) as producer:
        for request in requests:
            await producer.submit(request)
        found = await reader.wait_for(ids, 60)
    assert set(found) == ids
    for result in found.values():
        assert result.status == "rejected" and result.attempts == 0
        assert result.error is not None and result.error.type == "service_unavailable"
        assert result.error.message == "Service temporarily unavailable"
        assert result.execution_time == 0
    for _ in range(40):
        store = await dlq.read_store(settings)
        if ids <= {e.execution_id for e in store.records()}:
            break
        await asyncio.sleep(0.5)
    assert store.stats()["by_error_type"] == {"service_unavailable": 6}

    # Docker comes back: half open once the reset timeout passes, then closed.
    proxy.set_down(False)
    seen: list[str | None] = []
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        seen.append(await breaker_state(a))
        if seen[-1] == "closed" and "half_open" in seen:
            break
        await asyncio.sleep(0.1)
    assert "half_open" in seen and seen[-1] == "closed", seen
    await wait_state([a, b], "closed", 10)

    # Replaying the DLQ runs every dead-lettered job, each answered once more, successfully.
    replay_started = datetime.now(UTC)
    async with ResultReader(settings) as reader:
        code, out, err = await new_stack.cli("dlq", "replay", "--all")
        assert code == 0, err
        assert "replayed 6" in out
        answers: Counter[str] = Counter()

        async def collect() -> None:
            async for result, _ in reader:
                # The embedded broker may position a reader at the start of the last batch
                # rather than past it, so the first answers can show up again: skip them.
                if result is None or result.finished_at < replay_started:
                    continue
                if result.execution_id in ids:
                    assert result.success, result
                    answers[result.execution_id] += 1

        with pytest.raises(TimeoutError):  # keep listening a while to catch duplicates
            await asyncio.wait_for(collect(), 25)
    assert answers == Counter(dict.fromkeys(ids, 1))
    assert (await dlq.read_store(settings)).stats()["total"] == 0


async def test_transient_failure_retried_and_permanent_one_dead_lettered(
    new_stack: Stack, proxy: DockerProxy
) -> None:
    # Cold containers only: the faults target the job's own create call, which a warm
    # container made before the job arrived.
    env = {**BREAKER_ENV, "TAKO_BREAKER_FAILURE_THRESHOLD": "10", "TAKO_WARM_POOL_SIZE": "0"}
    worker = new_stack.start_worker(DOCKER_HOST=f"unix://{proxy.listen_path}", **env)
    await worker.wait_ready(180)

    proxy.fail_next(1, method="POST", path_regex=r"/containers/create", status=500)
    result = await new_stack.run_job(job("print('second time lucky')"))
    assert result.success and result.attempts == 2
    assert result.stdout == "second time lucky\n"

    rule = proxy.fail_always(method="POST", path_regex=r"/containers/create", status=500)
    request = job()
    failed = await new_stack.run_job(request)
    proxy.clear()
    assert failed.attempts == 2 and not failed.success
    assert failed.error is not None and failed.error.type == "service_unavailable"
    assert "injected fault" in failed.error.message
    assert rule.matched == 2
    settings = new_stack.settings
    for _ in range(40):
        store = await dlq.read_store(settings)
        entries = [e for e in store.records() if e.execution_id == request["execution_id"]]
        if entries:
            break
        await asyncio.sleep(0.5)
    assert len(entries) == 1 and entries[0].attempts == 2
    assert entries[0].error.type == "service_unavailable"

    # A user error is never retried.
    proxy.reset_stats()
    user = await new_stack.run_job(job("raise ValueError('mine')"))
    assert user.attempts == 1 and user.error is not None and user.error.type == "value_error"
    creates = [t for m, t in proxy.stats().seen if m == "POST" and "/containers/create" in t]
    assert len(creates) == 1
