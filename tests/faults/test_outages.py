"""Faults of the engine, the broker and the group, injected from outside (issue 13).

A hung Docker daemon, a daemon lost in the middle of a job, a job type whose image is missing,
SIGTERM with the broker frozen or gone, a minute of broker outage (what the log and /health
say), long jobs across a rebalance, and a cancel landing as a job ends.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from tako_stream import dlq
from tako_stream.core.errors import SandboxUnavailableError
from tako_stream.core.jobtypes import JobTypes, default_limits
from tako_stream.core.models import JobStatus
from tako_stream.kafka.reader import read_to_end
from tako_stream.sandbox.docker import LABEL_WORKER, DockerPrepared, DockerSandbox
from tako_stream.sandbox.protocol import CANCEL, FrameReader, encode_job
from tako_stream.settings import OutputCaps
from tests.faults.dockerproxy import DockerProxy
from tests.faults.streamtools import Answers, job, private_broker, submit
from tests.integration.stack import Stack, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BREAKER_ENV = {
    "TAKO_BREAKER_FAILURE_THRESHOLD": "3",
    "TAKO_BREAKER_RESET_TIMEOUT": "60",
    "TAKO_BREAKER_PING_INTERVAL": "1",
    "TAKO_RETRY_BASE_DELAY": "0.3",
}


@pytest.fixture
def proxy() -> Iterator[DockerProxy]:
    # A short path: Unix socket paths are limited to about 107 bytes, too few for tmp_path.
    directory = tempfile.mkdtemp(prefix="tko-", dir="/tmp")
    try:
        with DockerProxy(os.path.join(directory, "docker.sock")) as p:
            yield p
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def health_of(worker: WorkerProcess) -> dict[str, Any]:
    health = await worker.health()
    assert health is not None, worker.log_tail()
    return health


async def until(what: str, seconds: float, check: Any) -> None:
    """Until ``await check()`` is true (at most ``seconds``)."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.5)


async def leftovers(docker: aiodocker.Docker, worker: WorkerProcess) -> list[Any]:
    return list(
        await docker.containers.list(
            all=True, filters={"label": [f"{LABEL_WORKER}={worker.worker_id}"]}
        )
    )


# --- The Docker engine --------------------------------------------------------------------------


async def test_a_hung_daemon_opens_the_breaker_and_frees_every_slot(
    new_stack: Stack, proxy: DockerProxy
) -> None:
    """A daemon that accepts connections and never answers: every Engine API call is bounded
    (TAKO_DOCKER_TIMEOUT), the breaker opens, and the jobs end as service_unavailable."""
    worker = new_stack.start_worker(
        DOCKER_HOST=proxy.docker_host,
        TAKO_DOCKER_TIMEOUT="3",
        TAKO_WARM_POOL_SIZE="0",
        TAKO_POOL_SIZE="2",
        **BREAKER_ENV,
    )
    await worker.wait_ready()
    proxy.set_down(True, style="hang")
    requests = [{**job(n, 0.1, str(uuid.uuid4())), "timeout": 5} for n in range(4)]
    found = await new_stack.run_jobs(requests, timeout=150)
    for result in found.values():
        assert result.error is not None and result.error.type == "service_unavailable", result
    await until(
        "the breaker is open and no job holds a slot",
        30,
        _health(worker, lambda h: h["circuit_breaker"]["state"] == "open" and h["in_flight"] == 0),
    )
    await until("every job is dead-lettered", 30, _dead_lettered(new_stack, found))
    proxy.set_down(False)
    await until("the breaker closes again", 120, _closed(worker))


def _closed(worker: WorkerProcess) -> Any:
    return _health(worker, lambda h: h["circuit_breaker"]["state"] != "open")


def _health(worker: WorkerProcess, test: Any) -> Any:
    """A check that the worker's /health passes ``test``."""

    async def check() -> bool:
        health = await worker.health()
        return bool(health and test(health))

    return check


def _dead_lettered(stack: Stack, ids: Any) -> Any:
    """A check that every id in ``ids`` has a DLQ entry (they follow their results)."""

    async def check() -> bool:
        store = await dlq.read_store(stack.settings)
        return set(ids) <= {e.execution_id for e in store.records()}

    return check


async def test_a_daemon_lost_mid_job_is_service_unavailable(
    new_stack: Stack, proxy: DockerProxy, docker: aiodocker.Docker
) -> None:
    worker = new_stack.start_worker(DOCKER_HOST=proxy.docker_host, **BREAKER_ENV)
    await worker.wait_ready()
    execution_id = str(uuid.uuid4())
    async with Answers(new_stack.settings, new_stack) as answers:
        await submit(new_stack.settings, [job(1, 8, execution_id)])

        async def running() -> bool:
            return bool((await health_of(worker))["in_flight"] == 1)

        await until("the job runs", 60, running)
        await asyncio.sleep(1)
        proxy.set_down(True)  # the attach stream is cut and the daemon refuses connections
        await answers.wait({execution_id}, timeout=120)
    (result,) = answers.results[execution_id]
    assert result.error is not None and result.error.type == "service_unavailable", result
    assert result.attempts >= 1
    # The breaker heard of it (its events travel through the table's changelog: a moment).
    await until(
        "the breaker counts the failure",
        30,
        _health(worker, lambda h: h["circuit_breaker"]["failure_count"] >= 1),
    )
    await until("the job is dead-lettered", 30, _dead_lettered(new_stack, [execution_id]))
    proxy.set_down(False)


async def test_a_container_made_by_a_create_whose_answer_was_lost_is_removed(
    proxy: DockerProxy, docker: aiodocker.Docker
) -> None:
    """The daemon makes the container and the connection breaks before its answer (a daemon
    killed or restarted mid-create): the sandbox never learns the id, and removes it by the
    name it chose (such a container once stayed after test_docker_daemon_restarted_under_load)."""
    worker_id = f"lost-{uuid.uuid4().hex[:8]}"
    client = aiodocker.Docker(url=proxy.docker_host)
    sandbox = DockerSandbox(client, worker_id=worker_id, timeout_grace=5)
    rule = proxy.fail_next(1, path_regex=r"/containers/create", action="drop", when="after")
    try:
        with pytest.raises(SandboxUnavailableError):
            await sandbox.prepare(default_limits(JobTypes.load()["default"]))
        assert rule.matched == 1
        await sandbox.drain(30)
        mine = {"label": [f"{LABEL_WORKER}={worker_id}"]}
        assert await docker.containers.list(all=True, filters=mine) == []
    finally:
        await client.close()


async def test_sweep_removes_only_the_containers_a_sandbox_lost_track_of(
    docker: aiodocker.Docker,
) -> None:
    """A container with the worker's labels that its sandbox does not own (its removal gave up
    while the engine was away) is removed; the one it prepared for a job stays."""
    worker_id = f"sweep-{uuid.uuid4().hex[:8]}"
    limits = default_limits(JobTypes.load()["default"])
    sandbox = DockerSandbox(docker, worker_id=worker_id, timeout_grace=5)
    other = DockerSandbox(docker, worker_id=worker_id, timeout_grace=5)
    mine = {"label": [f"{LABEL_WORKER}={worker_id}"]}
    prepared = await sandbox.prepare(limits)
    try:
        stray = await other.prepare(limits)  # another sandbox's, forgotten: a stray here
        assert isinstance(stray, DockerPrepared)
        assert await sandbox.sweep() == 1
        await sandbox.drain(30)
        assert isinstance(prepared, DockerPrepared)
        left = await docker.containers.list(all=True, filters=mine)
        assert [c.id for c in left] == [prepared.container.id]
        await stray.stream.close()
    finally:
        await sandbox.discard(prepared)
        await sandbox.drain(30)
    assert await docker.containers.list(all=True, filters=mine) == []


async def test_a_worker_removes_its_lost_containers_when_the_engine_is_back(
    new_stack: Stack, proxy: DockerProxy, docker: aiodocker.Docker
) -> None:
    """A container with the worker's labels that the worker does not own (made while a
    create's answer was lost, or whose removal gave up while the engine was away) is removed
    once the engine answers again, not at the worker's next start."""
    worker = new_stack.start_worker(DOCKER_HOST=proxy.docker_host, **BREAKER_ENV)
    await worker.wait_ready()
    stranger = DockerSandbox(docker, worker_id=worker.worker_id, timeout_grace=5)
    stray = await stranger.prepare(default_limits(JobTypes.load()["default"]))
    assert isinstance(stray, DockerPrepared)
    await stray.stream.close()
    proxy.set_down(True)
    away = _health(worker, lambda h: not h["docker_available"])
    await until("the worker sees the engine away", 30, away)
    proxy.set_down(False)

    async def removed() -> bool:
        return stray.container.id not in {c.id for c in await leftovers(docker, worker)}

    await until("the stray container is removed", 60, removed)
    assert "container(s) this worker had lost track of" in worker.log_path.read_text()


async def test_a_missing_image_never_opens_the_breaker(new_stack: Stack, tmp_path: Path) -> None:
    """A job type whose image is missing is a configuration error of that type: its jobs fail
    closed, the others run, and the breaker (shared by every job type) stays closed."""
    text = resources.files("tako_stream.core").joinpath("job_types.toml").read_text()
    types = tomllib.loads(text)
    lines = [text, "", "[ghost]", 'image = "tako-stream/no-such-image:1"', "warm_pool_size = 0"]
    job_types = tmp_path / "job_types.toml"
    job_types.write_text("\n".join(lines) + "\n")
    assert "ghost" not in types
    # No pings: a successful one would reset the count and hide what the job failures did.
    env = {**BREAKER_ENV, "TAKO_BREAKER_PING_INTERVAL": "3600"}
    worker = new_stack.start_worker(TAKO_JOB_TYPES_FILE=str(job_types), **env)
    await worker.wait_ready()
    ghosts = [{**job(n, 0, str(uuid.uuid4())), "job_type": "ghost"} for n in range(5)]
    found = await new_stack.run_jobs(ghosts)
    for result in found.values():
        # Tako VM's docker_error (issue 15; internal_error before): still never retried.
        assert result.error is not None and result.error.type == "docker_error", result
        assert result.attempts == 1
    # Breaker events go through one folding agent and back through the table's changelog (a
    # second or two): give any that were sent time to arrive before checking none were.
    await asyncio.sleep(8)
    health = await health_of(worker)
    assert health["circuit_breaker"]["state"] == "closed"
    assert health["circuit_breaker"]["failure_count"] == 0
    fine = await new_stack.run_job(job(7, 0, str(uuid.uuid4())))
    assert fine.success and fine.stdout == "7\n"


async def test_a_cancel_landing_as_the_job_ends_leaves_its_result(
    docker: aiodocker.Docker,
) -> None:
    """The cancel byte written the moment the job's output arrives, again and again: it lands
    before, during and after the supervisor sees the job end, and every job keeps its result
    (the supervisor once read the control channel as a job pipe there and died reportless)."""
    limits = default_limits(JobTypes.load()["default"])
    sandbox = DockerSandbox(docker, worker_id=f"race-{uuid.uuid4().hex[:8]}", timeout_grace=5)
    # Artifacts off: the race is between the job's end and the cancel; collecting /output
    # would only add to the job's end.
    caps = OutputCaps(
        stdout=1024, stderr=1024, result=1024, artifact_files=0, artifact_file=0, artifact_total=0
    )
    reports = []
    try:
        for _ in range(15):
            prepared = await sandbox.prepare(limits)
            assert isinstance(prepared, DockerPrepared)
            reader = FrameReader.for_caps(caps)
            payload = encode_job(code="print('done')", input_json=b"{}", timeout=10, caps=caps)
            stream = prepared.stream
            try:
                await stream.write_in(payload)
                sent = False
                async with asyncio.timeout(30):
                    while not reader.done:
                        message = await stream.read_out()
                        if message is None:
                            break
                        if message.stream == 1:
                            reader.feed(message.data)
                        if reader.collected.stdout and not sent:
                            await stream.write_in(CANCEL)
                            sent = True
            finally:
                await sandbox.discard(prepared)
            reports.append(reader.collected.report)
    finally:
        await sandbox.drain()
    assert all(r is not None for r in reports), "a supervisor ended without a report"
    # A cancel that came while the job still ran cancels it (SIGTERM: 143); one that came as
    # or after it ended leaves it its own exit, 0.  Both happen over the runs.
    outcomes = [(r.exit_code, r.cancelled) for r in reports if r is not None]
    assert all(o in ((0, False), (143, True)) for o in outcomes), outcomes
    print(f"cancel race outcomes: {Counter(outcomes)}")


# --- The broker ---------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["frozen", "killed"])
async def test_sigterm_with_the_broker_unreachable_exits_in_time(
    outage: str, tmp_path: Path, docker: aiodocker.Docker
) -> None:
    grace = 5
    with private_broker(tmp_path) as broker:
        stack = Stack(bootstrap=broker.bootstrap, workdir=tmp_path)
        try:
            worker = stack.start_worker(
                TAKO_SHUTDOWN_GRACE=str(grace),
                TAKO_COMMIT_INTERVAL="3600",  # answers stay uncommitted until the stop
            )
            await worker.wait_ready(180)
            found = await stack.run_jobs([job(n, 0, str(uuid.uuid4())) for n in range(2)])
            assert all(r.success for r in found.values())
            if outage == "frozen":
                broker.freeze()
            else:
                broker.proc.kill()
                broker.proc.wait(10)
            await asyncio.sleep(2)
            started = time.monotonic()
            worker.kill(signal.SIGTERM)
            code = await asyncio.to_thread(worker.wait_exit, grace + 30)
            took = time.monotonic() - started
        finally:
            stack.stop_all()
    print(f"broker {outage}: SIGTERM to exit {took:.1f}s, exit code {code}")
    assert took <= grace + 15, took
    assert code == 75, (code, worker.log_tail())  # it could not commit
    assert await leftovers(docker, worker) == []


async def test_a_minute_of_broker_outage_is_a_few_log_lines(
    tmp_path: Path, docker: aiodocker.Docker
) -> None:
    with private_broker(tmp_path) as broker:
        stack = Stack(bootstrap=broker.bootstrap, workdir=tmp_path)
        try:
            worker = stack.start_worker()
            await worker.wait_ready(180)
            before = len(worker.log_path.read_text(errors="replace").splitlines())
            broker.proc.kill()
            broker.proc.wait(10)
            await asyncio.sleep(60)
            lines = worker.log_path.read_text(errors="replace").splitlines()[before:]
            health = await health_of(worker)
        finally:
            stack.stop_all()
    print(f"{len(lines)} log lines in a minute of broker outage")
    assert health["broker_available"] is False and health["broker_unavailable_since"]
    assert health["status"] == "degraded"
    # One line per state change and a reminder every 30 s, per reader that notices: a handful.
    assert len(lines) <= 40, "\n".join(lines[-60:])


# --- The group ----------------------------------------------------------------------------------


async def executions(stack: Stack, ids: set[str]) -> Counter[str]:
    """How often each job started running (a worker announces every start on the status
    topic, so a job run twice shows twice)."""
    started: Counter[str] = Counter()

    def count(key: bytes | None, value: bytes | None) -> None:
        if value is not None:
            status = JobStatus.model_validate_json(value)
            if status.execution_id in ids:
                started[status.execution_id] += 1

    await read_to_end(stack.settings, stack.settings.status_topic, count)
    return started


async def test_long_jobs_across_a_rebalance_run_once(new_stack: Stack) -> None:
    """25-30 s jobs; a worker joins while they run: the partitions taken from the first worker
    are given up only once their jobs end (the group's rebalance timeout covers that wait), so
    none is stopped half-way and run again; then the first worker leaves, and nothing runs
    twice either."""
    first = new_stack.start_worker(TAKO_POOL_SIZE="4")  # shutdown grace 20 s (the stack's)
    await first.wait_ready()
    ids = [str(uuid.uuid4()) for _ in range(6)]
    wanted = set(ids)
    async with Answers(new_stack.settings, new_stack) as answers:
        await submit(new_stack.settings, [job(n, 25 + n, i) for n, i in enumerate(ids)])

        async def busy() -> bool:
            return bool((await health_of(first))["in_flight"] >= 4)

        await until("four jobs run", 60, busy)
        second = new_stack.start_worker(TAKO_POOL_SIZE="4")
        await second.wait_ready(240)
        await answers.wait(wanted, timeout=300)
        first.kill(signal.SIGTERM)
        assert first.wait_exit(60) == 0, first.log_tail()
        await asyncio.sleep(3)
    started = await executions(new_stack, wanted)
    print(f"started: {dict(started)}")
    assert answers.duplicates(wanted) == {}
    assert started == Counter({i: 1 for i in ids}), (started, first.log_tail())
