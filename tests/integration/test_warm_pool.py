"""The warm pool seen from outside: per job type sizes, the cold fallback, and a clean drain.

The rest of the integration suite runs in both modes (``stack`` is parametrised warm and
cold); these tests pin what only the warm pool does, checked against Docker itself.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import pytest

from tako_stream.core.jobtypes import JobTypes, default_limits
from tako_stream.sandbox.docker import LABEL_WORKER, DockerSandbox
from tako_stream.sandbox.pool import SandboxPool, WarmPool
from tako_stream.sandbox.protocol import encode_job
from tako_stream.settings import OutputCaps
from tests.fakes import bounded, eventually
from tests.integration.stack import Stack, WorkerProcess

pytestmark = [pytest.mark.integration]

DEFAULT_IMAGE = "tako-stream/default:1"
DATA_IMAGE = "tako-stream/data-processing:1"

# The worker's TAKO_WARM_POOL_SIZE is 1; each job type may ask for more, or for none.
TYPES = f"""
[default]
image = "{DEFAULT_IMAGE}"
memory = "256m"
max_memory = "512m"
warm_pool_size = 3

[data-processing]
image = "{DATA_IMAGE}"
memory = "512m"
max_memory = "1g"
warm_pool_size = 0

[plain]
description = "no warm_pool_size: the worker's default"
image = "{DEFAULT_IMAGE}"
memory = "128m"
max_memory = "256m"
"""


def job(code: str, **fields: object) -> dict[str, object]:
    return {"execution_id": str(uuid.uuid4()), "code": code, **fields}


async def containers_of(docker: aiodocker.Docker, worker: WorkerProcess) -> list[dict[str, str]]:
    """The worker's sandboxes as Docker lists them (running or not)."""
    found = await docker.containers.list(
        all=True, filters={"label": [f"{LABEL_WORKER}={worker.worker_id}"]}
    )
    return [{"image": c["Image"], "state": c["State"]} for c in found]


async def pool_filled(worker: WorkerProcess, wanted: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen: object = None
    while time.monotonic() < deadline:
        health = await worker.health()
        seen = health and health.get("warm_pool")
        if seen == wanted:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"warm pool never reached {wanted}: {seen}\n{worker.log_tail()}")


@pytest.fixture
async def sized(bootstrap: str, tmp_path: Path) -> AsyncIterator[tuple[Stack, WorkerProcess]]:
    types = tmp_path / "job_types.toml"
    types.write_text(TYPES)
    stack = Stack(bootstrap=bootstrap, workdir=tmp_path)
    worker = stack.start_worker(TAKO_WARM_POOL_SIZE="1", TAKO_JOB_TYPES_FILE=str(types))
    try:
        await worker.wait_ready()
        yield stack, worker
    finally:
        stack.stop_all()


async def test_per_job_type_sizes_cold_fallback_and_clean_drain(
    sized: tuple[Stack, WorkerProcess], docker: aiodocker.Docker
) -> None:
    stack, worker = sized
    # `default` and `plain` have different shapes (memory) but the same image: the health
    # document sums by image, so 3 + 1 = 4 containers of it, and none of data-processing.
    wanted = {DEFAULT_IMAGE: 4, DATA_IMAGE: 0}
    await pool_filled(worker, wanted, timeout=120)
    running = await containers_of(docker, worker)
    assert sorted(c["image"] for c in running) == [DEFAULT_IMAGE] * 4, running
    assert all(c["state"] == "running" for c in running), running

    found = await stack.run_jobs(
        [
            warm := job("print('warm')"),
            plain := job("print('plain')", job_type="plain"),
            bigger := job("print('bigger')", memory_limit="384m"),
            data := job("import pandas\nprint(pandas.__version__)", job_type="data-processing"),
        ],
        timeout=180,
    )
    timing = {
        key: found[str(request["execution_id"])].timing
        for key, request in (("warm", warm), ("plain", plain), ("bigger", bigger), ("data", data))
    }
    assert all(found[str(r["execution_id"])].success for r in (warm, plain, bigger, data))
    assert timing["warm"] is not None and timing["warm"].warm is True
    assert timing["plain"] is not None and timing["plain"].warm is True
    # a memory limit other than the job type's default: no warm container has that shape
    assert timing["bigger"] is not None and timing["bigger"].warm is False
    # a job type whose pool size is 0 always runs cold
    assert timing["data"] is not None and timing["data"].warm is False

    await pool_filled(worker, wanted, timeout=120)  # refilled in the background
    worker.kill(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait_exit, 60) == 0
    assert await containers_of(docker, worker) == []


async def test_a_job_finding_the_pool_empty_takes_the_refill_under_way(
    docker: aiodocker.Docker,
) -> None:
    """Back to back, a job that finds no container waiting takes the one being prepared
    (started earlier, so ready sooner than a cold start of its own) rather than running cold."""
    limits = default_limits(JobTypes.load()["default"])
    worker_id = f"claim-{uuid.uuid4().hex[:8]}"
    sandbox = DockerSandbox(docker, worker_id=worker_id, timeout_grace=10)
    pool: SandboxPool | None = None
    warm = WarmPool(
        sandbox,
        [(limits, 1)],
        max_idle=3600,
        busy=lambda: pool.in_flight if pool is not None else 0,
        capacity=2,
    )
    pool = SandboxPool(sandbox, 2, warm)
    caps = OutputCaps()
    job_bytes = encode_job(
        code="print('warm')",
        input_json=b"{}",
        timeout=20,
        caps=caps,
    )
    warm.start()
    try:
        await eventually(lambda: warm.sizes().get(DEFAULT_IMAGE) == 1, "the pool to fill", 120)
        taken = warm.take(limits)
        assert taken is not None
        await sandbox.discard(taken)
        await eventually(lambda: warm.preparing == 1, "the refill to start", 30)
        run = await bounded(
            pool.run(job_bytes, limits, execution_id="claim", caps=caps), "the job", 120
        )
        assert run.warm is True
        report = run.collected.report
        assert report is not None and report.exit_code == 0
        assert run.collected.stdout == b"warm\n"
    finally:
        await warm.drain()
        await sandbox.drain()
    assert (
        await docker.containers.list(all=True, filters={"label": [f"{LABEL_WORKER}={worker_id}"]})
        == []
    )
