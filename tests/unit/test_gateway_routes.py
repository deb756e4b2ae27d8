"""The gateway's handlers over HTTP, through its middleware, with the broker faked: what a
client sees when the store lags or a request carries values no handler foresaw."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.structs import ConsumerRecord, RecordMetadata

from tako_stream.core.errors import Status
from tako_stream.core.jobtypes import JobTypes
from tako_stream.core.models import (
    CORRELATION_HEADER,
    MAX_CORRELATION_CHARS,
    CancelRequest,
    ExecutionResult,
    Timing,
)
from tako_stream.gateway.app import Gateway
from tako_stream.gateway.routes import MAX_OFFSET, RECORD_READS
from tako_stream.gateway.store import Job, Request
from tako_stream.kafka.codec import correlation_id, dumps
from tako_stream.settings import Settings

#: A number past 64 bits: pydantic reads it as an int, orjson cannot write it.
HUGE = 123456789012345678901234567890

# The gateway keeps the correlation id under a string key, as aiohttp allows (with a warning,
# which this suite's settings would turn into an error).
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")


class Sent:
    """What the gateway produced, each landing at the next offset of partition 0."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def send_raw(self, value: bytes | None, **kw: Any) -> RecordMetadata:
        self.records.append({"value": value, **kw})
        topic = kw.get("topic") or "tako.requests"
        return RecordMetadata(topic, 0, None, len(self.records) - 1, -1, -1, -1)

    async def __aexit__(self, *exc: object) -> None:
        pass


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway whose store is empty and caught up, and whose producer only records."""
    gateway = Gateway(Settings(gateway_state_dir=tmp_path), JobTypes.load())
    gateway.view.ready.set()
    gateway.view.producer = Sent()  # type: ignore[assignment]
    yield gateway
    await gateway.view.stop()


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[TestClient[Any, Any]]:
    app = gateway.app()
    app.on_startup.clear()  # no broker: the view is driven by hand
    app.on_cleanup.clear()
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_an_idempotent_submit_whose_read_back_times_out_is_a_503_not_a_409(
    gateway: Gateway, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def lagging(*_: object) -> None:
        raise TimeoutError  # the store has not read the record back in time

    monkeypatch.setattr(gateway.view, "wait_for_position", lagging)
    body = {"code": "print(1)", "idempotency_key": "order-12345"}
    resp = await client.post("/execute/async", json=body, headers={"X-Correlation-ID": "c-1"})
    answer = await resp.json()
    # The job is queued: a 409 would have the client retry under a new key and run it twice.
    assert resp.status == 503, answer
    assert answer["correlation_id"] == "c-1" and "retry" in answer["detail"]
    assert len(gateway.view.producer.records) == 1  # type: ignore[attr-defined]


async def raw_get(client: TestClient[Any, Any], path: str, header: bytes) -> tuple[int, bytes]:
    """GET with an ``X-Correlation-ID`` of exactly these bytes (aiohttp's client encodes
    header text as UTF-8, so it cannot send the bytes a hostile client can)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        b"X-Correlation-ID: " + header + b"\r\n\r\n"
    )
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), head + b"\n" + body


def fresh(correlation_id: str) -> bool:
    return str(uuid.UUID(correlation_id)) == correlation_id


@pytest.mark.parametrize("header", [b"caf\xe9-latin-1", b"\xff\xfe", b"ok-\xe2\x80\xa8-u2028"])
async def test_a_correlation_id_that_is_not_printable_utf8_is_replaced_not_a_500(
    client: TestClient[Any, Any], header: bytes
) -> None:
    status, answer = await raw_get(client, "/job-types/nope", header)
    assert status == 404, answer  # the handler's own answer, in its JSON shape
    head, _, body = answer.partition(b"\n{")
    correlation_id = orjson.loads(b"{" + body)["correlation_id"]
    assert fresh(correlation_id) and f"X-Correlation-ID: {correlation_id}".encode() in head


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("é-trace-1", True),
        ("x" * MAX_CORRELATION_CHARS, True),
        ("x" * (MAX_CORRELATION_CHARS + 1), False),
    ],
)
async def test_correlation_ids_follow_the_rule_kafka_headers_do(
    client: TestClient[Any, Any], sent: str, kept: bool
) -> None:
    resp = await client.get("/job-types/nope", headers={"X-Correlation-ID": sent})
    answer = await resp.json()
    assert resp.status == 404 and answer["correlation_id"] == resp.headers["X-Correlation-ID"]
    if kept:
        assert answer["correlation_id"] == sent
        assert correlation_id([(CORRELATION_HEADER, sent.encode())]) == sent  # as on Kafka
    else:
        assert fresh(answer["correlation_id"])  # not cut short: a fresh one, as on Kafka


async def test_a_cancel_carries_the_longest_correlation_id_the_gateway_takes(
    gateway: Gateway, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def queued(execution_id: str) -> tuple[str, None, Job]:
        return "queued", None, Job(request=Request(None, 0, 0, None))

    monkeypatch.setattr(gateway.view, "find", queued)
    longest = "c" * MAX_CORRELATION_CHARS
    resp = await client.post("/jobs/j-1/cancel", headers={"X-Correlation-ID": longest})
    assert resp.status == 200, await resp.text()
    (sent,) = gateway.view.producer.records  # type: ignore[attr-defined]
    cancel = CancelRequest.model_validate_json(sent["value"])
    assert cancel.execution_id == "j-1" and cancel.correlation_id == longest


@pytest.mark.parametrize("path", ["/executions", "/dlq"])
@pytest.mark.parametrize("offset", [str(MAX_OFFSET + 1), "100000000000000000000"])
async def test_an_offset_past_any_store_is_a_422(
    client: TestClient[Any, Any], path: str, offset: str
) -> None:
    resp = await client.get(f"{path}?offset={offset}")
    answer = await resp.json()
    assert resp.status == 422 and "offset" in answer["detail"], answer  # SQLite: no such int
    resp = await client.get(f"{path}?offset={MAX_OFFSET}")
    assert resp.status == 200 and (await resp.json())["items"] == []


@pytest.mark.parametrize(
    ("name", "when"),
    [("since", "0001-01-01T00:00:00+01:00"), ("until", "9999-12-31T23:59:59-01:00")],
)
async def test_a_dlq_bound_utc_cannot_hold_is_a_422(
    client: TestClient[Any, Any], name: str, when: str
) -> None:
    resp = await client.get("/dlq", params={name: when})  # '+' sent as %2B, as clients do
    answer = await resp.json()
    assert resp.status == 422 and answer["detail"].startswith(f"{name}: "), answer
    assert "UTC" in answer["detail"]
    resp = await client.get("/dlq", params={name: "0001-01-01T00:00:00-01:00"})  # year 1 in UTC
    assert resp.status == 200, await resp.text()


def succeeded(execution_id: str, **fields: Any) -> ExecutionResult:
    """A valid result, stored as any (its finished_at is an ordinary time)."""
    return ExecutionResult(
        execution_id=execution_id,
        correlation_id="c",
        status=Status.SUCCEEDED,
        success=True,
        worker_id="w",
        finished_at=datetime(2026, 1, 1, tzinfo=UTC),
        **fields,
    )


def stored_result(gateway: Gateway, offset: int, result: ExecutionResult) -> None:
    """Fold ``result`` into the gateway's store as read from the results topic."""
    record = ConsumerRecord(
        topic=gateway.settings.results_topic,
        partition=0,
        offset=offset,
        timestamp=1_700_000_000_000,
        timestamp_type=0,
        key=result.execution_id.encode(),
        value=dumps(result),
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=[],
    )
    gateway.view.store.apply([record], gateway.settings.topics)


async def test_results_whose_times_or_figures_no_answer_holds_are_served_not_a_500(
    gateway: Gateway, client: TestClient[Any, Any]
) -> None:
    # No request record: created_at falls back to started_at, past year 9999 in UTC
    stored_result(
        gateway,
        0,
        succeeded(
            "late",
            started_at=datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(-timedelta(hours=1))),
        ),
    )
    # milliseconds no integer holds
    stored_result(gateway, 1, succeeded("long", execution_time=1e308, timing=Timing(sandbox=1e308)))
    resp = await client.get("/executions")
    page = await resp.json()
    assert resp.status == 200 and page["total"] == page["count"] == 2, page
    late, long = sorted(page["items"], key=lambda item: str(item["execution_id"]))
    assert late["created_at"] == "9999-12-31T23:59:59-01:00"  # the same instant, as given
    assert long["duration_ms"] is None and long["timing"]["total_ms"] is None
    for execution_id in ("late", "long"):
        assert (await client.get(f"/executions/{execution_id}")).status == 200


async def test_a_result_with_a_number_past_64_bits_fails_no_page(
    gateway: Gateway, client: TestClient[Any, Any]
) -> None:
    # Anyone's record on the results topic: pydantic reads a 30-digit exit code as an int,
    # which orjson cannot write back, so every /executions page holding it was a 500.
    fine = succeeded("fine")
    stored_result(gateway, 0, fine)
    body = orjson.loads(dumps(fine))
    huge = {**body, "execution_id": "huge", "exit_code": 0}
    record = ConsumerRecord(
        topic=gateway.settings.results_topic,
        partition=0,
        offset=1,
        timestamp=1_700_000_000_000,
        timestamp_type=0,
        key=b"huge",
        value=orjson.dumps(huge).replace(b'"exit_code":0', b'"exit_code":' + b"1" * 30),
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=[],
    )
    gateway.view.store.apply([record], gateway.settings.topics)
    resp = await client.get("/executions")
    assert resp.status == 200, await resp.text()
    assert [item["execution_id"] for item in (await resp.json())["items"]] == ["fine"]
    assert (await client.get("/jobs/huge")).status != 500


def stored_raw(gateway: Gateway, topic: str, offset: int, key: bytes, value: bytes) -> None:
    """Fold a record of anyone's into the gateway's store as read from ``topic``."""
    record = ConsumerRecord(
        topic=topic,
        partition=0,
        offset=offset,
        timestamp=1_700_000_000_000,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=[],
    )
    gateway.view.store.apply([record], gateway.settings.topics)


FORGED = [
    ("exit_code", HUGE),
    ("attempts", HUGE),
    ("resource_usage", {"cpu_time_ms": HUGE}),
    ("artifacts", [{"name": "a.txt", "size_bytes": HUGE, "sha256": "0" * 64, "content_type": ""}]),
    ("output", {"n": [HUGE]}),  # Any: pydantic keeps the int, no bound can be declared
    ("metadata", {"n": HUGE}),
    ("correlation_id", "c" * (MAX_CORRELATION_CHARS + 1)),
]


@pytest.mark.parametrize(("field", "value"), FORGED, ids=[f for f, _ in FORGED])
async def test_a_foreign_result_no_answer_can_carry_is_no_result_on_any_route(
    gateway: Gateway, client: TestClient[Any, Any], field: str, value: Any
) -> None:
    """Anyone's record on the results topic for a queued job: a number past 64 bits (which
    orjson cannot write: a 500 on the routes serving the record), or a correlation id longer
    than any request's (served as is).  No worker writes such a result (its publisher answers
    an output it cannot write with invalid_output), so it counts as none: the job is pending,
    as /executions leaves it out of its pages."""
    request = orjson.dumps({"execution_id": "forged", "code": "print(1)"})
    stored_raw(gateway, gateway.settings.requests_topic, 0, b"forged", request)
    body = orjson.loads(dumps(succeeded("forged", exit_code=0)))
    body[field] = value
    stored_raw(gateway, gateway.settings.results_topic, 0, b"forged", json.dumps(body).encode())

    async def answer(method: str, path: str) -> tuple[int, Any]:
        resp = await client.request(method, path)
        assert resp.status < 500, (path, await resp.text())
        return resp.status, await resp.json() if method != "HEAD" else None

    for path in ("/executions/forged", "/executions/forged?view=full"):
        assert (await answer("GET", path))[0] == 404
    status, job = await answer("GET", "/jobs/forged")
    assert status == 200 and job["status"] == "pending", job
    for path in ("/jobs/forged/result", "/jobs/forged/result?view=full"):
        status, record = await answer("GET", path)
        assert status == 200 and record["status"] == "pending", record
    assert (await answer("GET", "/jobs/forged/result?wait=true&timeout=1"))[0] == 408
    for method in ("GET", "HEAD"):
        assert (await answer(method, "/jobs/forged/artifacts/a.txt"))[0] == 404
    assert (await answer("POST", "/jobs/forged/rerun"))[0] == 400  # not completed
    status, cancelled = await answer("POST", "/jobs/forged/cancel?wait=true&timeout=1")
    assert status == 200 and "result" not in cancelled, cancelled
    # the same record with the field as a worker writes it is served
    body[field] = orjson.loads(dumps(succeeded("forged", exit_code=0)))[field]
    stored_raw(gateway, gateway.settings.results_topic, 1, b"forged", orjson.dumps(body))
    status, record = await answer("GET", "/executions/forged")
    assert status == 200 and record["status"] == "succeeded", record


async def test_reruns_read_their_originals_a_few_at_once(
    gateway: Gateway, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each original is read by a consumer of its own (a connection, a fetch buffer of up to
    # 8 MiB): a flood of reruns opened one each, all at once, as artifact reads no longer do.
    done = succeeded("p")

    async def finished(execution_id: str) -> tuple[str, ExecutionResult, Job]:
        return "completed", done, Job(request=Request(None, 0, 0, None))

    reading, most = 0, 0
    release = asyncio.Event()

    async def original(request: Request) -> dict[str, Any]:
        nonlocal reading, most
        reading += 1
        most = max(most, reading)
        await release.wait()
        reading -= 1
        return {"code": "print(1)"}

    monkeypatch.setattr(gateway.view, "find", finished)
    monkeypatch.setattr(gateway.view, "original_request", original)
    monkeypatch.setattr(gateway.view, "wait_for_position", lambda *_: asyncio.sleep(0))
    reruns = [
        asyncio.ensure_future(client.post("/jobs/p/rerun", json={}))
        for _ in range(3 * RECORD_READS)
    ]
    for _ in range(200):
        await asyncio.sleep(0.01)
        if most >= RECORD_READS:
            break
    await asyncio.sleep(0.05)
    assert most == RECORD_READS
    release.set()
    statuses = {(await r).status for r in reruns}
    assert statuses == {200}, statuses
