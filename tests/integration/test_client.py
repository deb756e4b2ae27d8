"""tako_stream.Client and SyncClient against a real worker, and the seed-style example."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import orjson
import pydantic
import pytest

from tako_stream import Client, SyncClient
from tako_stream.client import Producer
from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def one(
    bootstrap: str, docker: aiodocker.Docker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    s = Stack(bootstrap=bootstrap, workdir=tmp_path_factory.mktemp("client"))
    await s.start_worker().wait_ready()
    try:
        yield s
    finally:
        s.stop_all()


async def test_run_returns_the_result_with_its_correlation_id(one: Stack) -> None:
    async with Client(one.settings) as client:
        result = await client.run(
            "import json\nd = json.load(open('/input/data.json'))\n"
            "json.dump({'twice': d['n'] * 2}, open('/output/result.json', 'w'))",
            {"n": 21},
            correlation_id="client-corr-1",
            metadata={"who": "test"},
            wait=120,
        )
    assert result.success, result
    assert result.output == {"twice": 42}
    assert result.correlation_id == "client-corr-1"
    assert result.metadata == {"who": "test"}


async def test_many_waiters_share_one_reader(one: Stack) -> None:
    async with Client(one.settings) as client:
        ids = [await client.submit(f"print({n})") for n in range(12)]
        results = await asyncio.gather(*(client.result(i, timeout=180) for i in ids))
        # asking again is answered from what the client has already seen
        again = await client.result(ids[0], timeout=1)
    assert [r.execution_id for r in results] == ids
    assert [r.stdout for r in results] == [f"{n}\n" for n in range(12)]
    assert again == results[0]


async def test_result_of_a_job_answered_before_the_client_started(one: Stack) -> None:
    async with Client(one.settings) as first:
        done = await first.run("print('early')", wait=120)
    async with Client(one.settings) as later:
        found = await later.result(done.execution_id, timeout=30)
    assert found.execution_id == done.execution_id and found.stdout == "early\n"


async def test_result_times_out_for_an_unknown_id(one: Stack) -> None:
    async with Client(one.settings) as client:
        with pytest.raises(TimeoutError):
            await client.result(f"never-{uuid.uuid4()}", timeout=2)


async def test_invalid_request_is_refused_before_it_is_sent(one: Stack) -> None:
    async with Client(one.settings) as client:
        with pytest.raises(pydantic.ValidationError) as info:
            await client.submit("print(1)", timeout=999)
    assert "timeout" in str(info.value)


async def test_results_iterator_sees_other_producers_results(one: Stack) -> None:
    async with Client(one.settings) as client, Producer(one.settings) as producer:
        seen = client.results()
        wanted = await producer.submit({"code": "print('from elsewhere')"})

        async def first_match() -> str:
            async for result in seen:
                if result.execution_id == wanted:
                    return result.stdout
            raise AssertionError("iterator ended")

        stdout = await asyncio.wait_for(first_match(), 120)
    assert stdout == "from elsewhere\n"


async def test_sync_client(one: Stack) -> None:
    def use() -> tuple[bool, str, int]:
        with SyncClient(one.settings) as tako:
            result = tako.run("print(6 * 7)", wait=120)
            failed = tako.run("1 / 0", wait=120)
        assert failed.error is not None
        return result.success, result.stdout, int(failed.exit_code or 0)

    success, stdout, exit_code = await asyncio.to_thread(use)
    assert success and stdout == "42\n" and exit_code == 1


async def test_seed_style_error_handling_example(one: Stack) -> None:
    env = {**os.environ, **{f"TAKO_{k.upper()}": str(v) for k, v in one.env_settings().items()}}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "client_errors.py"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err.decode()
    lines = {line["case"]: line for line in map(orjson.loads, out.splitlines())}
    assert lines["ok"] == {"case": "ok", "attempts": 1, "output": {"sum": 3}}
    assert lines["name_error"]["raised"] == "ValueError"  # permanent: not retried
    assert lines["name_error"]["attempts"] == 1
    assert lines["timeout"]["raised"] == "ResourceError" and lines["timeout"]["attempts"] == 1
    assert lines["timeout"]["message"] == "Resource limit exceeded: Execution timeout exceeded (2s)"
    assert lines["value_error"]["raised"] == "RuntimeError"
