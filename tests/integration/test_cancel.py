"""Cancellation, end to end: gateway, CLI, client and a raw control-topic message, against a real
worker (one container slot, so a second job queues) and the real broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiodocker
import aiohttp
import orjson
import pytest

from tako_stream.client import CancelRefused, Client, Producer
from tako_stream.core.models import CancelRequest, ExecutionResult
from tako_stream.kafka.codec import dumps
from tests.integration.stack import Stack, free_port
from tests.integration.test_gateway import Gateway, start_gateway

pytestmark = [pytest.mark.integration]

SLEEPER = "import time\nprint('started', flush=True)\ntime.sleep(120)\n"
STUBBORN = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('started', flush=True)\nwhile True:\n    time.sleep(0.1)\n"
)


@pytest.fixture(scope="module")
async def cgw(
    bootstrap: str, docker: aiodocker.Docker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    workdir = tmp_path_factory.mktemp("cancel")
    stack = Stack(bootstrap=bootstrap, workdir=workdir)
    worker = stack.start_worker(TAKO_POOL_SIZE="1", TAKO_CANCEL_GRACE="2")
    port = free_port()
    env = {
        **os.environ,
        **{f"TAKO_{k.upper()}": str(v) for k, v in stack.env_settings().items()},
        "TAKO_GATEWAY_PORT": str(port),
        "TAKO_GATEWAY_HOST": "127.0.0.1",
        "TAKO_WORKER_ID": f"gateway-{stack.tag}",
        "TAKO_GATEWAY_STATE_DIR": str(workdir / "gateway-state"),
    }
    log = workdir / "gateway.log"
    proc = start_gateway(env, log)
    gateway = Gateway(f"http://127.0.0.1:{port}", proc, log, stack)
    try:
        await worker.wait_ready()
        for _ in range(120):
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{log.read_text()}")
            try:
                if (await gateway.call("GET", "/health"))[0] == 200:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
        else:
            raise TimeoutError(f"gateway not up:\n{log.read_text()}")
        yield gateway
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        stack.stop_all()


async def wait_state(gw: Gateway, execution_id: str, state: str, timeout: float = 60) -> None:
    body: object = None
    for _ in range(int(timeout / 0.2)):
        status, body, _ = await gw.call("GET", f"/jobs/{execution_id}")
        if status == 200 and body["status"] == state:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{execution_id} never {state}: {body}")


async def submit(gw: Gateway, code: str, **fields: object) -> str:
    status, body, _ = await gw.call(
        "POST", "/execute/async", json={"code": code, "timeout": 120, **fields}
    )
    assert status == 200 and body["status"] == "queued", body
    return str(body["job_id"])


async def test_running_job_gets_sigterm_and_ends_cancelled_143(cgw: Gateway) -> None:
    job = await submit(cgw, SLEEPER)
    await wait_state(cgw, job, "running")  # from the status topic
    status, body, headers = await cgw.call(
        "POST", f"/jobs/{job}/cancel", headers={"X-Correlation-ID": "cancel-trace"}
    )
    assert status == 200 and body == {"status": "cancelled", "job_id": job}, body  # Tako VM's
    assert headers["X-Correlation-ID"] == "cancel-trace"
    status, record, _ = await cgw.call("GET", f"/jobs/{job}/result?wait=true&timeout=60")
    assert status == 200, record
    assert record["status"] == "cancelled" and record["exit_code"] == 143, record
    assert record["error"] == {
        "type": "cancelled",
        "message": "Execution cancelled",
        "phase": "execution",  # Tako VM's error object names the phase
    }
    assert record["stdout"] == "started\n"
    assert record["duration_ms"] is not None and record["duration_ms"] < 60_000
    # a finished job cannot be cancelled: Tako VM's 404
    status, body, _ = await cgw.call("POST", f"/jobs/{job}/cancel")
    assert status == 404 and body["detail"] == "Job not found or already completed", body


async def test_job_ignoring_sigterm_is_killed_after_the_grace(cgw: Gateway) -> None:
    settings = cgw.stack.settings
    async with Client(settings) as client:
        job = await client.submit(STUBBORN, timeout=120)
        await wait_state(cgw, job, "running")
        code, out, err = await cgw.stack.cli("cancel", job, "--wait", "--wait-timeout", "60")
        assert code == 0, (out, err)
        result = ExecutionResult.model_validate(orjson.loads(out))
        assert result.status.value == "cancelled" and result.exit_code == 137, result
        assert result.error is not None
        assert "did not stop on SIGTERM and was killed" in result.error.message
        assert result.execution_time is not None and result.execution_time >= 2  # the grace
        # refused now, by the CLI (exit 1, the result printed) and the client
        code, out, err = await cgw.stack.cli("cancel", job)
        assert code == 1 and "refused" in err and "already finished" in err
        assert orjson.loads(out)["status"] == "cancelled"
        with pytest.raises(CancelRefused) as refused:
            await client.cancel(job)
        assert refused.value.result.execution_id == job


async def test_queued_job_is_answered_cancelled_without_running(cgw: Gateway) -> None:
    # one container slot: the blocker holds it, the victim waits in the worker
    blocker = await submit(cgw, SLEEPER)
    await wait_state(cgw, blocker, "running")
    victim = await submit(cgw, "print('I ran')")
    await asyncio.sleep(1)
    status, body, _ = await cgw.call("GET", f"/jobs/{victim}")
    assert status == 200 and body["status"] == "pending", body
    assert body["queue_position"] == 1, body  # the blocker runs: nothing is ahead of it
    # a raw message on the control topic, as any Kafka producer would send it
    async with Producer(cgw.stack.settings) as producer:
        message = CancelRequest(execution_id=victim, requested_at=datetime.now(UTC))
        await producer.send_raw(
            dumps(message), key=victim.encode(), topic=cgw.stack.settings.control_topic
        )
    status, record, _ = await cgw.call("GET", f"/jobs/{victim}/result?wait=true&timeout=30")
    assert status == 200, record
    assert record["status"] == "cancelled" and record["exit_code"] is None
    assert record["error"]["message"] == "Execution cancelled before it ran"
    assert record["stdout"] == "" and record["timing"]["total_ms"] is None
    # the blocker still runs; cancel it too, waiting for its result through the gateway (ours)
    status, body, _ = await cgw.call("POST", f"/jobs/{blocker}/cancel?wait=true&timeout=60")
    assert status == 200 and body["status"] == "cancelled", body
    assert body["result"]["status"] == "cancelled" and body["result"]["exit_code"] == 143, body


async def test_cancel_sent_before_the_request_arrives(cgw: Gateway) -> None:
    job = str(uuid.uuid4())
    async with Client(cgw.stack.settings) as client:
        await client.cancel(job, reason="changed my mind")
        await asyncio.sleep(1)
        await client.submit("print('never')", execution_id=job)
        result = await client.result(job, timeout=60)
    assert result.status.value == "cancelled" and result.stdout == ""


async def test_unknown_job_is_404(cgw: Gateway) -> None:
    status, body, _ = await cgw.call("POST", f"/jobs/{uuid.uuid4()}/cancel")
    assert status == 404 and "correlation_id" in body
