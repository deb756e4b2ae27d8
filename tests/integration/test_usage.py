"""Resource usage, measured for real: the executor over real containers (runc, and gVisor when
registered), then one job through Kafka whose result carries usage, job_ref, hashes and lineage.

Only lower bounds a workload guarantees are asserted (what it allocates, the CPU it burns, the
timeout it outlives): never how fast anything was.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator

import aiodocker
import orjson
import pytest

from tako_stream.core.errors import Status
from tako_stream.core.jobtypes import JobTypes
from tako_stream.core.models import ExecutionRequest, ExecutionResult
from tako_stream.sandbox.docker import DockerSandbox
from tako_stream.sandbox.pool import SandboxPool
from tako_stream.settings import OutputCaps, RetryPolicy
from tako_stream.worker.execute import Executor
from tests.integration.stack import Stack
from tests.runtimes import GVISOR_RUNTIME, require_gvisor

pytestmark = pytest.mark.integration

GVISOR = GVISOR_RUNTIME
#: Touches every page of 64 MiB (bytes of 0x01, not calloc's untouched zero pages).
ALLOCATE_64M = "block = b'\\x01' * (64 * 1024 * 1024)\nprint(len(block))\n"
ALLOCATE_100M = "block = b'\\x01' * (100 * 1024 * 1024)\nprint(len(block))\n"
BURN_CPU = (
    "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end:\n    pass\n"
)
#: A child that allocates, reaped by the job: its peak counts as the job's.
CHILD_ALLOCATES = (
    "import subprocess, sys\n"
    "subprocess.run([sys.executable, '-c', "
    "\"block = b'x' * (80 * 1024 * 1024)\"], check=True)\n"
)


@pytest.fixture(params=["runc", GVISOR])
async def executor(
    request: pytest.FixtureRequest, docker: aiodocker.Docker
) -> AsyncIterator[Executor]:
    """An executor over real containers (cold), every job type run by the param's runtime."""
    runtime = request.param
    if runtime == GVISOR:
        await require_gvisor(docker)
    packaged = JobTypes.load()
    types = JobTypes(
        {
            name: t.model_copy(update={"runtime": None if runtime == "runc" else runtime})
            for name, t in packaged.items()
        }
    )
    sandbox = DockerSandbox(docker, worker_id=f"usage-{uuid.uuid4().hex[:8]}", timeout_grace=10)
    yield Executor(
        SandboxPool(sandbox, 2),
        types,
        worker_id="usage-test",
        caps=OutputCaps(),
        retry=RetryPolicy(max_attempts=1, base_delay=0),
        cancel_grace=1.0,
    )
    await sandbox.drain()


def req(code: str, **fields: object) -> ExecutionRequest:
    return ExecutionRequest.model_validate(
        {"execution_id": str(uuid.uuid4()), "code": code, **fields}
    )


async def run(executor: Executor, code: str, **fields: object) -> ExecutionResult:
    return await asyncio.wait_for(executor.execute(req(code, **fields), "corr"), 180)


async def test_a_100mb_allocation_reports_at_least_100mb_peak(executor: Executor) -> None:
    result = await run(executor, ALLOCATE_100M)
    assert result.success, (result.error, result.stderr)
    usage = result.resource_usage
    assert usage is not None and usage.max_rss_mb is not None, result
    assert usage.max_rss_mb >= 100  # the bound: the block alone is 100 MiB
    # touching 100 MiB takes CPU and time the figures must show
    assert usage.cpu_time_ms is not None and usage.cpu_time_ms > 0
    assert usage.wall_time_ms is not None and usage.wall_time_ms > 0
    assert result.job_ref == "default@1"


async def test_burning_cpu_shows_in_the_cpu_time(executor: Executor) -> None:
    result = await run(executor, BURN_CPU)
    assert result.success, (result.error, result.stderr)
    usage = result.resource_usage
    assert usage is not None and usage.cpu_time_ms is not None, result
    assert usage.cpu_time_ms >= 200
    assert usage.wall_time_ms is not None and usage.wall_time_ms >= usage.cpu_time_ms // 2
    assert usage.max_rss_mb is not None and usage.max_rss_mb > 0


async def test_a_child_the_job_reaped_counts(executor: Executor) -> None:
    result = await run(executor, CHILD_ALLOCATES)
    assert result.success, (result.error, result.stderr)
    usage = result.resource_usage
    assert usage is not None and usage.max_rss_mb is not None and usage.max_rss_mb >= 76


async def test_a_timed_out_job_still_reports_its_usage(executor: Executor) -> None:
    code = ALLOCATE_64M + "import time\ntime.sleep(60)\n"
    result = await run(executor, code, timeout=2)
    assert result.status is Status.TIMEOUT, result
    usage = result.resource_usage
    assert usage is not None and usage.wall_time_ms is not None and usage.wall_time_ms >= 2000
    # killed by the supervisor at the deadline, then reaped with its rusage
    assert usage.max_rss_mb is not None and usage.max_rss_mb >= 60, usage
    assert usage.cpu_time_ms is not None and usage.cpu_time_ms >= 0


async def test_a_cancelled_job_still_reports_its_usage(executor: Executor) -> None:
    cancel = asyncio.Event()
    started = asyncio.Event()
    request = req("import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    task = asyncio.ensure_future(
        executor.execute(request, "corr", cancel=cancel, on_start=started.set)
    )
    await asyncio.wait_for(started.wait(), 120)
    await asyncio.sleep(2)  # let it start (a cancel before the code runs ends it all the same)
    cancel.set()
    result = await asyncio.wait_for(task, 120)
    assert result.status is Status.CANCELLED, result
    usage = result.resource_usage
    assert usage is not None and usage.wall_time_ms is not None
    # the interpreter's own pages at least, once it was reaped after SIGTERM
    assert usage.max_rss_mb is not None and usage.max_rss_mb > 0, usage
    assert usage.cpu_time_ms is not None and usage.cpu_time_ms >= 0


async def test_a_rejected_request_has_provenance_and_no_usage(executor: Executor) -> None:
    request = req(
        "print(1)", timeout=299.0, memory_limit="4g", idempotency_key="usage-key-1", input_data={}
    )
    result = await asyncio.wait_for(executor.execute(request, "corr"), 30)
    assert result.status is Status.REJECTED and result.resource_usage is None
    assert result.job_ref == "default@1" and result.idempotency_key == "usage-key-1"
    assert result.code_hash == hashlib.sha256(b"print(1)").hexdigest()


# --- through Kafka ------------------------------------------------------------------------------


async def test_a_result_through_kafka_carries_usage_hashes_and_lineage(stack: Stack) -> None:
    parent = await stack.run_job({"execution_id": str(uuid.uuid4()), "code": "print('parent')"})
    code = ALLOCATE_64M + "import json\njson.dump({'ok': True}, open('/output/result.json', 'w'))\n"
    input_data = {"b": [1, 2], "a": {"é": None}}
    result = await stack.run_job(
        {
            "execution_id": str(uuid.uuid4()),
            "code": code,
            "input_data": input_data,
            "job_type": "default@latest",
            "idempotency_key": f"kafka-{stack.tag}"[:255],
            "parent_execution_id": parent.execution_id,
            "relationship": "rerun",
        }
    )
    assert result.success and result.output == {"ok": True}, (result.error, result.stderr)
    usage = result.resource_usage
    assert usage is not None and usage.max_rss_mb is not None and usage.max_rss_mb >= 60
    assert usage.cpu_time_ms is not None and usage.wall_time_ms is not None
    assert result.job_ref == "default@latest"  # a pin is kept as asked
    assert result.code_hash == hashlib.sha256(code.encode()).hexdigest()
    canonical = orjson.dumps(input_data, option=orjson.OPT_SORT_KEYS)
    assert canonical == '{"a":{"é":null},"b":[1,2]}'.encode()
    assert result.input_hash == hashlib.sha256(canonical).hexdigest()
    assert result.idempotency_key == f"kafka-{stack.tag}"[:255]
    assert (result.parent_execution_id, result.relationship) == (parent.execution_id, "rerun")
    # the parent, unpinned, names the version its image's tag gives
    assert parent.job_ref == "default@1" and parent.relationship is None
    assert parent.resource_usage is not None and parent.resource_usage.max_rss_mb is not None


async def test_a_request_rejected_by_its_job_type_still_carries_its_hashes(stack: Stack) -> None:
    result = await stack.run_job(
        {
            "execution_id": str(uuid.uuid4()),
            "code": "print(1)",
            "memory_limit": "8g",
            "parent_execution_id": str(uuid.uuid4()),
            "relationship": "fork",
        }
    )
    assert result.status == "rejected" and result.resource_usage is None
    assert result.code_hash == hashlib.sha256(b"print(1)").hexdigest()
    assert result.input_hash == hashlib.sha256(b"{}").hexdigest()
    assert result.job_ref == "default@1" and result.relationship == "fork"
