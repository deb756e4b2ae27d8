"""Stream faults with a real broker, real Docker and several workers (issue 5).

- the broker frozen (SIGSTOP) for 20 s and resumed: the workers recover by themselves;
- the Docker daemon crashed and restarted under load: every job ends in a classified result
  or the DLQ, and the worker goes on;
- a rebalance while jobs run (a worker joins, then the first leaves with SIGTERM): nothing is
  lost and nothing runs twice.

The broker and the Docker daemon that get hurt are private to the test (the session's broker
and the machine's dockerd are shared with other tests).  The SIGKILL case with 200 jobs lives in
``tests/integration/test_delivery.py``.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiodocker
import pytest

from tako_stream import dlq
from tako_stream.core.errors import ErrorType
from tako_stream.dlq import DEAD_LETTER_TYPES
from tako_stream.sandbox.docker import LABEL_WORKER
from tests.faults.privatedocker import PrivateDocker
from tests.faults.streamtools import Answers, job, private_broker, submit
from tests.integration.stack import Stack, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def new_ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``predicate()`` holds; fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


async def wait_healthy(worker: WorkerProcess, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    health: dict[str, object] | None = None
    while time.monotonic() < deadline:
        assert worker.proc.poll() is None, f"worker exited:\n{worker.log_tail()}"
        health = await worker.health()
        if health and health["status"] == "healthy" and health["ready"]:
            return health
        await asyncio.sleep(0.5)
    raise AssertionError(f"worker not healthy in {timeout}s: {health}\n{worker.log_tail()}")


async def test_broker_frozen_for_20s_workers_recover(
    tmp_path: Path, docker: aiodocker.Docker
) -> None:
    with private_broker(tmp_path) as broker:
        stack = Stack(bootstrap=broker.bootstrap, workdir=tmp_path)
        try:
            a = stack.start_worker(TAKO_POOL_SIZE="3")
            b = stack.start_worker(TAKO_POOL_SIZE="3")
            await asyncio.gather(a.wait_ready(180), b.wait_ready(180))
            settings = stack.settings
            before, during, after = new_ids(12), new_ids(6), new_ids(6)
            code: dict[str, int] = {i: n for n, i in enumerate(before + during + after)}
            everything = set(code)
            async with Answers(settings, stack) as answers:
                # Long enough that several are running when the broker stops answering.
                await submit(settings, [job(code[i], 1.5, i) for i in before])
                await answers.wait(set(before), count=2, timeout=120)
                broker.freeze()
                frozen = time.monotonic()
                # A producer that starts while the broker is frozen: its sends wait, not fail.
                sending = asyncio.ensure_future(
                    submit(settings, [job(code[i], 0.2, i) for i in during])
                )
                await asyncio.sleep(20)
                answered_while_frozen = len(answers.answered(everything))
                broker.resume()
                resumed = time.monotonic()
                await asyncio.wait_for(sending, 120)
                await submit(settings, [job(code[i], 0.2, i) for i in after])
                await answers.wait(everything, timeout=240)
                recovery = time.monotonic() - resumed
                await asyncio.sleep(3)  # late re-runs would show up now
            for worker in (a, b):
                assert worker.proc.poll() is None, worker.log_tail()
                await worker.wait_ready(120)
        finally:
            stack.stop_all()
    for execution_id, n in code.items():
        for result in answers.results[execution_id]:
            assert result.success and result.stdout == f"{n}\n", result
    assert answers.bad_keys == []
    duplicates = answers.duplicates(everything)
    print(
        f"broker frozen {resumed - frozen:.1f}s; answers seen meanwhile: {answered_while_frozen}; "
        f"all {len(everything)} answered {recovery:.1f}s after the resume; "
        f"duplicates: {len(duplicates)}"
    )
    # Re-runs are allowed (at-least-once) and happen here: the broker, back after 20 s without
    # heartbeats, expires the workers' sessions, so their last commits are refused and the
    # partitions' uncommitted jobs run again.  Per worker that is at most the 2 * pool_size
    # jobs its intake holds plus those answered within the last commit interval (1 s: at most
    # pool_size of these 1.5 s jobs).
    assert len(duplicates) <= 2 * (2 * 3 + 3), duplicates


async def test_docker_daemon_restarted_under_load(
    new_stack: Stack, tmp_path: Path, docker: aiodocker.Docker
) -> None:
    # Only the default job type, so the private daemon needs only its image.
    job_types = tmp_path / "job_types.toml"
    job_types.write_text(
        '[default]\nimage = "tako-stream/default:1"\nmemory = "256m"\nmax_memory = "512m"\n'
        "cpus = 1.0\ntimeout = 30\nmax_timeout = 300\npids_limit = 128\n"
    )
    with PrivateDocker(["tako-stream/default:1"]) as engine:
        worker = new_stack.start_worker(
            DOCKER_HOST=engine.host,
            TAKO_JOB_TYPES_FILE=str(job_types),
            TAKO_POOL_SIZE="4",
            TAKO_BREAKER_FAILURE_THRESHOLD="3",
            TAKO_BREAKER_RESET_TIMEOUT="5",
            TAKO_BREAKER_PING_INTERVAL="1",
            TAKO_RETRY_BASE_DELAY="0.5",
        )
        await worker.wait_ready(180)
        await wait_healthy(worker, 30)
        settings = new_stack.settings
        ids = new_ids(30)
        wanted = set(ids)
        async with Answers(settings, new_stack) as answers:
            await submit(settings, [job(n, 1.0, i) for n, i in enumerate(ids[:20])])
            await answers.wait(wanted, count=5, timeout=120)
            # A crash: dockerd, its containerd, the shims and the containers, all SIGKILLed.
            down = [engine.restart(signal.SIGKILL)]
            await answers.wait(set(ids[:20]), timeout=240)
            await wait_healthy(worker, 90)
            # An orderly restart (dockerd stops its containers, then comes back), once jobs
            # run again.
            await submit(settings, [job(n, 1.0, i) for n, i in enumerate(ids) if n >= 20])
            await answers.wait(set(ids[20:]), count=2, timeout=120)
            down.append(engine.restart(signal.SIGTERM))
            await answers.wait(wanted, timeout=240)
            start = time.monotonic()
            await wait_healthy(worker, 90)
            recovered = time.monotonic() - start
            # The worker goes on: new jobs run, successfully.
            fresh = new_ids(4)
            await submit(settings, [job(100 + n, 0.1, i) for n, i in enumerate(fresh)])
            await answers.wait(set(fresh), timeout=120)
            await asyncio.sleep(2)
        store = await dlq.read_store(settings)
        worker.kill(signal.SIGTERM)
        assert worker.wait_exit(60) == 0, worker.log_tail()
        leftovers = engine.containers(f"label={LABEL_WORKER}={worker.worker_id}")

    outcomes: Counter[str] = Counter()
    dead_lettered = {e.execution_id for e in store.records()}
    for n, execution_id in enumerate(ids):
        for result in answers.results[execution_id]:
            if result.success:
                assert result.stdout == f"{n}\n", result
                outcomes["succeeded"] += 1
                continue
            assert result.error is not None, result
            outcomes[result.error.type.value] += 1
            # A system fault, never blamed on the job's code.
            assert result.error.type in {
                ErrorType.SERVICE_UNAVAILABLE,
                ErrorType.INTERNAL_ERROR,
                ErrorType.CANCELLED,
                ErrorType.KILLED,
            }, result
            if result.error.type in DEAD_LETTER_TYPES:
                assert execution_id in dead_lettered, result
    for n, execution_id in enumerate(fresh):
        (result,) = answers.results[execution_id]
        assert result.success and result.stdout == f"{100 + n}\n", result
    print(
        f"outcomes: {dict(outcomes)}; daemon away {down[0]:.1f}s (crash), {down[1]:.1f}s "
        f"(restart); healthy {recovered:.1f}s after the last answer"
    )
    assert outcomes["succeeded"] > 0
    assert answers.bad_keys == []
    assert leftovers == [], leftovers


async def test_rebalance_while_jobs_run_runs_nothing_twice(new_stack: Stack) -> None:
    a = new_stack.start_worker(TAKO_POOL_SIZE="4")
    await a.wait_ready(180)
    settings = new_stack.settings
    sent: list[str] = []
    stop = asyncio.Event()

    async def produce() -> None:
        """A steady stream: one short job every 0.25 s, until told to stop."""
        while not stop.is_set():
            execution_id = str(uuid.uuid4())
            await submit(settings, [job(len(sent), 0.5, execution_id)])
            sent.append(execution_id)
            await asyncio.sleep(0.25)

    def answered_by(worker: WorkerProcess) -> int:
        return sum(
            1 for rs in answers.results.values() for r in rs if r.worker_id == worker.worker_id
        )

    async with Answers(settings, new_stack) as answers:
        producer = asyncio.ensure_future(produce())
        try:
            await until(lambda: answered_by(a) >= 8, 120, "worker A answers jobs")
            b = new_stack.start_worker(TAKO_POOL_SIZE="4")  # joins: the group rebalances
            await b.wait_ready(180)
            await until(lambda: answered_by(b) >= 4, 120, "worker B answers jobs")
            a.kill(signal.SIGTERM)  # leaves: its partitions go to B
            assert a.wait_exit(60) == 0, a.log_tail()
            await asyncio.sleep(3)
        finally:
            stop.set()
            await producer
        await answers.wait(set(sent), timeout=180)
        await asyncio.sleep(3)  # late re-runs would show up now

    wanted = set(sent)
    for n, execution_id in enumerate(sent):
        for result in answers.results[execution_id]:
            assert result.success and result.stdout == f"{n}\n", result
    duplicates = answers.duplicates(wanted)
    print(
        f"{len(sent)} jobs; A answered {answered_by(a)}, B {answered_by(b)}; "
        f"run twice: {len(duplicates)}"
    )
    assert answered_by(a) > 0 and answered_by(b) > 0
    # Revoke waits for the revoked partitions' running jobs and commits them before the
    # partitions move; SIGTERM does the same before leaving: no job needs to run twice.
    assert duplicates == {}, duplicates
