"""Delivery: a worker SIGKILLed mid-batch loses no job, and leaves no container behind."""

from __future__ import annotations

import asyncio
import signal
import uuid

import aiodocker
import pytest

from tako_stream.client import Producer, ResultReader
from tako_stream.sandbox.docker import LABEL_WORKER
from tests.faults.streamtools import Answers, committed_offsets, job, submit, topic_config
from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_sigkill_mid_batch_loses_no_job(new_stack: Stack, docker: aiodocker.Docker) -> None:
    """200 short jobs, the worker SIGKILLed in the middle, a new one started: every job is
    answered exactly once; the answered-but-uncommitted ones are not run again."""
    pool = 4
    first = new_stack.start_worker(TAKO_POOL_SIZE=str(pool))
    await first.wait_ready()
    settings = new_stack.settings
    # Consumers de-duplicate by key: the results topic is compacted, as the broker reports it.
    config = await topic_config(settings, settings.results_topic)
    assert config.get("cleanup.policy") == "compact", config

    total = 200
    ids = [str(uuid.uuid4()) for _ in range(total)]
    wanted = set(ids)
    async with Answers(settings, new_stack) as answers:
        placed = await submit(settings, [job(n, 0.05, i) for n, i in enumerate(ids)])
        await answers.wait(wanted, count=total // 3, timeout=180)  # mid-batch
        first.kill(signal.SIGKILL)
        first.wait_exit(10)
        # Where the dead worker's group stands: everything before these positions was
        # answered and committed, so must not run again.
        committed = await committed_offsets(settings)
        assert len(answers.answered(wanted)) < total, "the batch finished before the kill"

        second = new_stack.start_worker(TAKO_POOL_SIZE=str(pool))
        await second.wait_ready(180)
        await answers.wait(wanted, timeout=240)
        await asyncio.sleep(3)  # late re-runs would show up now

    assert answers.bad_keys == []  # every result keyed by its execution_id
    for n, execution_id in enumerate(ids):
        for result in answers.results[execution_id]:
            assert result.success and result.stdout == f"{n}\n", result
    by_first = {i for i in ids if any(r.worker_id == first.worker_id for r in answers.results[i])}
    uncommitted = {i for i in by_first if placed[i][1] >= committed[placed[i][0]]}
    print(f"answered by the first worker: {len(by_first)}, of them uncommitted: {len(uncommitted)}")
    # The dead worker's answered-but-uncommitted jobs are delivered again, and recognised as
    # answered (their results carry their position): a job that has a result keeps it.
    assert answers.duplicates(wanted) == {}, (answers.duplicates(wanted), committed)
    # The second worker reaped the first one's containers at start-up.
    leftovers = await docker.containers.list(
        all=True, filters={"label": [f"{LABEL_WORKER}={first.worker_id}"]}
    )
    assert leftovers == []


async def test_sigterm_finishes_in_flight_and_exits_zero(
    new_stack: Stack, docker: aiodocker.Docker
) -> None:
    worker = new_stack.start_worker(TAKO_POOL_SIZE="2")
    await worker.wait_ready()
    settings = new_stack.settings
    ids = [str(uuid.uuid4()) for _ in range(2)]
    async with ResultReader(settings) as reader, Producer(settings) as producer:
        for execution_id in ids:
            await producer.submit(
                {"execution_id": execution_id, "code": "import time\ntime.sleep(3)\nprint('done')"}
            )
        # Wait until both are running, then ask the worker to stop.
        for _ in range(100):
            health = await worker.health()
            if health and health.get("in_flight") == 2:
                break
            await asyncio.sleep(0.1)
        worker.kill(signal.SIGTERM)
        found = await reader.wait_for(set(ids), 60)
    assert worker.wait_exit(60) == 0
    assert set(found) == set(ids)
    assert all(r.success and r.stdout == "done\n" for r in found.values())
    leftovers = await docker.containers.list(
        all=True, filters={"label": [f"{LABEL_WORKER}={worker.worker_id}"]}
    )
    assert leftovers == []
