"""tako_stream.Client and SyncClient against a real worker, and the seed-style example."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import orjson
import pydantic
import pytest
from aiokafka.errors import KafkaConnectionError

from tako_stream import Client, SyncClient
from tako_stream.client import Producer
from tako_stream.core.errors import BrokerError
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


async def test_a_result_arrives_while_a_slow_lookup_still_reads(one: Stack) -> None:
    """The lookup reads the key's partition of a topic that keeps every result: on a large
    one it outlasted the wait, though the follower had the answer (raced now)."""
    async with Client(one.settings) as client:
        stuck = asyncio.Event()

        async def slow_lookup(execution_id: str) -> None:
            await stuck.wait()  # a scan of years of results

        client._lookup = slow_lookup  # type: ignore[method-assign]
        execution_id = await client.submit("print('raced')")
        result = await client.result(execution_id, timeout=120)
    assert result.success and result.stdout == "raced\n", result


async def test_run_again_under_the_same_id_returns_the_new_result(one: Stack) -> None:
    async with Client(one.settings) as client:
        execution_id = f"again-{uuid.uuid4()}"
        first = await client.run("print('first')", execution_id=execution_id, wait=120)
        second = await client.run("print('second')", execution_id=execution_id, wait=120)
    assert first.stdout == "first\n", first
    assert second.stdout == "second\n", second  # not the earlier answer the client had read


async def test_a_broker_fault_while_following_is_retried(one: Stack) -> None:
    async with Client(one.settings) as client:
        real = client._results.fetch
        faults = [KafkaConnectionError("injected")]

        async def fetch(timeout: float = 0.5) -> Any:
            if faults:
                raise faults.pop()
            return await real(timeout=timeout)

        client._results.fetch = fetch  # type: ignore[method-assign]
        result = await client.run("print('after the fault')", wait=120)
    assert result.stdout == "after the fault\n", result


async def test_a_wait_ends_when_the_follower_stops(one: Stack) -> None:
    async with Client(one.settings) as client:

        async def broken(timeout: float = 0.5) -> Any:
            raise RuntimeError("a bug in the reader")

        client._results.fetch = broken  # type: ignore[method-assign]
        with pytest.raises(BrokerError, match="a bug in the reader"):
            await client.result(f"never-{uuid.uuid4()}", timeout=None)
