"""The gateway's handlers over HTTP, through its middleware, with the broker faked: what a
client sees when the store lags or a request carries values no handler foresaw."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sqlite3
import threading
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.structs import ConsumerRecord, RecordMetadata

from tako_stream.core.errors import ErrorType, Status
from tako_stream.core.jobtypes import JobTypes
from tako_stream.core.models import (
    CORRELATION_HEADER,
    MAX_CORRELATION_CHARS,
    CancelRequest,
    DLQRecord,
    ErrorInfo,
    ExecutionRequest,
    ExecutionResult,
    SourcePosition,
    Timing,
)
from tako_stream.gateway import openapi, pages, views
from tako_stream.gateway.api import ROUTES, Route
from tako_stream.gateway.app import Gateway
from tako_stream.gateway.routes import MAX_OFFSET, RECORD_READS
from tako_stream.gateway.shapes import (
    ErrorBody,
    ForkBody,
    RerunBody,
    execution_record,
    iso_ms,
    tako_dlq_item,
)
from tako_stream.gateway.store import Job, Request
from tako_stream.kafka.codec import correlation_id, dumps
from tako_stream.settings import Settings
from tests.fakes import bounded, eventually

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
        **{"finished_at": datetime(2026, 1, 1, tzinfo=UTC), **fields},
    )


def stored_raw(
    gateway: Gateway,
    topic: str,
    offset: int,
    key: bytes,
    value: bytes | None,
    *,
    timestamp: int = 1_700_000_000_000,
) -> None:
    """Fold a record of anyone's into the gateway's store as read from ``topic``."""
    record = ConsumerRecord(
        topic=topic,
        partition=0,
        offset=offset,
        timestamp=timestamp,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=[],
    )
    gateway.view.store.apply([record], gateway.settings.topics)


def stored_result(gateway: Gateway, offset: int, result: ExecutionResult) -> None:
    """Fold ``result`` into the gateway's store as read from the results topic."""
    topic = gateway.settings.results_topic
    stored_raw(gateway, topic, offset, result.execution_id.encode(), dumps(result))


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
    value = orjson.dumps(huge).replace(b'"exit_code":0', b'"exit_code":' + b"1" * 30)
    stored_raw(gateway, gateway.settings.results_topic, 1, b"huge", value)
    resp = await client.get("/executions")
    assert resp.status == 200, await resp.text()
    assert [item["execution_id"] for item in (await resp.json())["items"]] == ["fine"]
    assert (await client.get("/jobs/huge")).status != 500


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


# -- pages: /executions and /dlq in bounded memory, off the event loop --------------------------


def stored(gateway: Gateway, topic: str, key: str, value: bytes | None, offset: int) -> None:
    """Fold one record into the gateway's store as read from ``topic``."""
    stored_raw(gateway, topic, offset, key.encode(), value, timestamp=1_700_000_000_000 + offset)


def finished(n: int, **fields: Any) -> ExecutionResult:
    """Result ``r<n>``, finished ``n`` seconds into the day (a later one is listed first)."""
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=n)
    return succeeded(f"r{n:03}", finished_at=when, **fields)


def store_results(gateway: Gateway, count: int, **fields: Any) -> list[ExecutionResult]:
    """``count`` results, newest last; every third with its request read too."""
    results = [finished(n, **fields) for n in range(count)]
    for n, result in enumerate(results):
        stored(gateway, gateway.settings.results_topic, result.execution_id, dumps(result), n)
        if n % 3 == 0:
            stored(gateway, gateway.settings.requests_topic, result.execution_id, b"{}", n)
    return results


def old_page(
    gateway: Gateway, results: list[ExecutionResult], *, limit: int, offset: int, full: bool
) -> bytes:
    """The page as the gateway answered before pages were streamed: every record built, then
    the whole page encoded at once (newest first)."""
    newest = sorted(results, key=lambda r: r.finished_at, reverse=True)
    items = []
    for result in newest[offset : offset + limit]:
        request = gateway.view.store.request(result.execution_id)
        created = iso_ms(request.produced_ms) if request else None
        items.append(execution_record(result, created_at=created, full=full))
    total = len(results)
    page = {
        "items": items,
        "limit": limit,
        "offset": offset,
        "has_more": offset + len(items) < total,
        "count": len(items),
        "total": total,
    }
    return orjson.dumps(page)


@pytest.mark.parametrize("batch_bytes", [pages.BATCH_BYTES, 1])
@pytest.mark.parametrize(
    ("query", "limit", "offset", "full"),
    [
        ("", 100, 0, False),
        ("?limit=4&offset=3&view=full", 4, 3, True),
        ("?offset=12", 100, 12, False),
    ],
)
async def test_a_page_is_the_answer_it_was_byte_for_byte(
    gateway: Gateway,
    client: TestClient[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    batch_bytes: int,
    query: str,
    limit: int,
    offset: int,
    full: bool,
) -> None:
    # In one batch (a Content-Length, as before) and one row a batch (streamed, chunked).
    monkeypatch.setattr(pages, "BATCH_BYTES", batch_bytes)
    results = store_results(gateway, 10)
    resp = await client.get(f"/executions{query}", headers={"X-Correlation-ID": "page-1"})
    body = await resp.read()
    assert resp.status == 200 and body == old_page(
        gateway, results, limit=limit, offset=offset, full=full
    )
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["X-Correlation-ID"] == "page-1" and resp.headers["X-Frame-Options"]
    streamed = batch_bytes == 1 and offset < 9  # more than one row: more than one batch
    assert ("Content-Length" not in resp.headers) == streamed
    assert (resp.headers.get("Transfer-Encoding") == "chunked") == streamed
    head = await client.head(f"/executions{query}")
    assert head.status == 200 and await head.read() == b""


@pytest.mark.parametrize("batch_bytes", [pages.BATCH_BYTES, 1])
async def test_a_dlq_page_is_the_answer_it_was_byte_for_byte(
    gateway: Gateway,
    client: TestClient[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    batch_bytes: int,
) -> None:
    monkeypatch.setattr(pages, "BATCH_BYTES", batch_bytes)
    for n in range(6):  # stored newest first: listed oldest first
        stored(gateway, gateway.settings.dlq_topic, f"d{n}", dumps(dead_letter(f"d{n}", -n)), n)
    resp = await client.get("/dlq?limit=4&offset=1")
    summaries = [gateway.view.store.dead_letter(f"d{n}") for n in (4, 3, 2, 1)]
    items = [tako_dlq_item(summary) for summary in summaries if summary is not None]
    page = {"items": items, "limit": 4, "offset": 1, "has_more": True, "count": 4, "total": 6}
    assert resp.status == 200 and await resp.read() == orjson.dumps(page)
    assert ("Content-Length" in resp.headers) == (batch_bytes > 1)


async def test_paging_by_limit_reads_every_row_once_in_order(
    gateway: Gateway, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pages, "BATCH_BYTES", 1500)  # a row or two a batch
    results = store_results(gateway, 23, stdout="x" * 1000)
    seen: list[str] = []
    offset, has_more = 0, True
    while has_more:
        page = await (await client.get(f"/executions?limit=5&offset={offset}")).json()
        assert page["total"] == 23 and page["count"] == len(page["items"]) <= 5
        seen += [item["execution_id"] for item in page["items"]]
        offset += page["limit"]
        has_more = page["has_more"]
    assert seen == [r.execution_id for r in reversed(results)]


async def test_a_row_left_out_does_not_make_the_last_page_look_unfinished(
    gateway: Gateway, client: TestClient[Any, Any]
) -> None:
    # has_more counts the rows read: a client paging by count (offset += count) stopped only
    # when a page came back whole, so a row no item is made of had it ask for it forever.
    store_results(gateway, 2)
    stored(gateway, gateway.settings.results_topic, "noise", b'{"status": "succeeded", '
           b'"finished_at": "2026-01-01T00:00:00Z"}', 5)  # fmt: skip
    page = await (await client.get("/executions")).json()
    assert (page["total"], page["count"], page["has_more"]) == (3, 2, False), page


async def test_pages_are_validated_and_encoded_off_the_event_loop(
    gateway: Gateway, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every stored value is validated (and encoded) in a reader thread: on the event loop, a
    # page of large results stalled every other request of the gateway, /health included.
    store_results(gateway, 5)
    stored(gateway, gateway.settings.dlq_topic, "d1", dumps(dead_letter("d1")), 0)
    threads: list[int] = []

    def watched(model: type[Any]) -> None:
        validate = model.model_validate_json

        def recorded(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.get_ident())
            return validate(*args, **kwargs)

        monkeypatch.setattr(model, "model_validate_json", recorded)

    watched(ExecutionResult)
    watched(DLQRecord)
    for path in ("/executions", "/dlq"):
        threads.clear()
        resp = await client.get(path)
        assert resp.status == 200 and (await resp.json())["count"] >= 1
        assert threads and threading.get_ident() not in threads, path


async def test_a_page_holds_a_batch_of_its_rows_at_once_not_the_page(
    gateway: Gateway, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 512 results of 32 KiB: a 16 MiB page.  Read, validated and encoded at once, it was held
    # three times over (bodies, models and records, the encoded page); now a batch is (and
    # what orjson reserves while it encodes one item: up to 34 times its longest string).
    monkeypatch.setattr(pages, "BATCH_BYTES", 256 * 1024)
    store_results(gateway, 512, stdout="x" * 32 * 1024)
    tracemalloc.start()
    try:
        resp = await client.get("/executions?limit=1000")
        size, last = 0, b""
        async for chunk in resp.content.iter_chunked(1 << 16):  # as read, let go
            size += len(chunk)
            last = (last + chunk)[-64:]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.status == 200 and size > 512 * 32 * 1024 and last.endswith(b'"total":512}')
    assert peak < 4 * 1024 * 1024, f"{peak / 2**20:.1f} MiB held at once for a 16 MiB page"


async def test_a_failure_after_the_headers_breaks_the_answer_instead_of_cutting_it_short(
    gateway: Gateway,
    client: TestClient[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(pages, "BATCH_BYTES", 1)  # a row a batch
    store_results(gateway, 5)
    read = gateway.view.store.result_bodies
    calls, failing_call = 0, 3

    def failing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == failing_call:
            raise sqlite3.OperationalError("disk I/O error")
        return read(*args, **kwargs)

    monkeypatch.setattr(gateway.view.store, "result_bodies", failing)
    resp = await client.get("/executions", headers={"X-Correlation-ID": "broken-1"})
    assert resp.status == 200 and resp.headers["X-Correlation-ID"] == "broken-1"
    with pytest.raises(aiohttp.ClientPayloadError):  # no chunked terminator: not a page
        await resp.read()
    assert any("failed after its headers were sent" in r.getMessage() for r in caplog.records)
    # The gateway goes on serving; a failure before the headers is still a status.
    calls, failing_call = 0, 0
    resp = await client.get("/executions")
    assert resp.status == 200 and (await resp.json())["count"] == 5
    calls, failing_call = 0, 1
    resp = await client.get("/executions", headers={"X-Correlation-ID": "broken-2"})
    assert resp.status == 500 and (await resp.json())["correlation_id"] == "broken-2"


async def test_a_client_that_takes_nothing_is_dropped_and_its_batch_let_go(
    gateway: Gateway,
    client: TestClient[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Far more than the socket buffers hold, so the gateway's writes wait on the client.
    monkeypatch.setattr(pages, "WRITE_WAIT", 0.2)
    caplog.set_level(logging.INFO, logger=pages.__name__)
    store_results(gateway, 48, stdout="x" * 256 * 1024)
    dropped = asyncio.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "cut short" in record.getMessage():
                dropped.set()

    handler = Seen()
    logging.getLogger(pages.__name__).addHandler(handler)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((client.host, client.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /executions HTTP/1.1\r\nHost: gw\r\n\r\n")
        await asyncio.wait_for(dropped.wait(), 30)  # nothing read meanwhile
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(1 << 16):
                answer += chunk
    finally:
        logging.getLogger(pages.__name__).removeHandler(handler)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and not answer.endswith(b"0\r\n\r\n")
    assert len(answer) < 48 * 256 * 1024


def dead_letter(dlq_id: str, seconds: int = 0) -> DLQRecord:
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    return DLQRecord(
        dlq_id=dlq_id,
        execution_id=dlq_id,
        correlation_id="c",
        error=ErrorInfo(type=ErrorType.INVALID_REQUEST, message="x"),
        attempts=1,
        first_failure_at=when,
        last_failure_at=when,
        worker_id="w",
        source=SourcePosition(topic="tako.requests", partition=0, offset=0),
        original_value=None,
    )


async def test_pages_past_the_bound_wait_a_little_then_are_a_503_with_a_retry_after(
    gateway: Gateway, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each page in flight holds a batch (1-2 MiB) for as long as its client takes it: without
    # a bound, any number of slow clients held any number of batches.
    monkeypatch.setattr(pages, "PAGE_WAIT", 0.01)
    monkeypatch.setattr(pages, "BATCH_BYTES", 1)  # a row a batch: streamed
    results = store_results(gateway, 3)
    slots = gateway.view.page_slots
    assert slots.size == views.PAGES
    async with contextlib.AsyncExitStack() as taken:
        for _ in range(slots.size):
            await taken.enter_async_context(slots.slot(0))
        for path in ("/executions", "/dlq"):
            resp = await client.get(path, headers={"X-Correlation-ID": "busy-1"})
            assert resp.status == 503 and resp.headers["Retry-After"] == "1", path
            assert (await resp.json())["correlation_id"] == "busy-1"
            # ... as the API document says it may.
            declared = openapi.document()["paths"][path]["get"]["responses"]["503"]
            assert declared["headers"]["Retry-After"]["schema"] == {"type": "integer"}, path
        # Other routes do not wait for page slots.
        lookup = await client.get(f"/executions/{results[0].execution_id}")
        assert lookup.status == 200
    assert slots.taken == 0
    # A streamed page holds its slot until its last byte, then lets it go.
    held: list[int] = []
    read = gateway.view.store.result_bodies

    def watched(*args: Any, **kwargs: Any) -> Any:
        held.append(slots.taken)
        return read(*args, **kwargs)

    monkeypatch.setattr(gateway.view.store, "result_bodies", watched)
    resp = await client.get("/executions")
    assert resp.status == 200 and (await resp.json())["count"] == 3
    assert held == [1, 1, 1] and slots.taken == 0


async def test_pages_are_read_in_their_own_threads_never_a_lookup_s(
    gateway: Gateway, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch is ~50 ms of validation and encoding holding the GIL: in the store's reader
    # threads, a few concurrent pages had every lookup (and /health) queue behind them.
    monkeypatch.setattr(pages, "BATCH_BYTES", 1)
    results = store_results(gateway, 4)
    store = gateway.view.store
    threads: dict[str, set[str]] = {"page": set(), "lookup": set()}

    def watched(name: str, kind: str) -> None:
        method = getattr(store, name)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            threads[kind].add(threading.current_thread().name)
            return method(*args, **kwargs)

        monkeypatch.setattr(store, name, recorded)

    watched("execution_rows", "page")
    watched("result_bodies", "page")
    watched("job", "lookup")
    answers = await asyncio.gather(
        *(client.get("/executions") for _ in range(2 * views.READERS)),
        *(client.get(f"/executions/{r.execution_id}") for r in results),
    )
    assert all(resp.status == 200 for resp in answers)
    assert 1 <= len(threads["page"]) <= views.PAGE_READERS < views.READERS
    assert threads["lookup"] and not threads["page"] & threads["lookup"]
    assert all(name.startswith("tako-store-pages") for name in threads["page"])


async def test_pages_whose_batches_do_not_end_leave_lookups_answered(
    gateway: Gateway, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A huge batch, a slow disk: every page thread busy, and more pages waiting for one.
    monkeypatch.setattr(pages, "BATCH_BYTES", 1)
    results = store_results(gateway, 4)
    store = gateway.view.store
    go, blocked = threading.Event(), 0
    read = store.result_bodies

    def stuck(*args: Any, **kwargs: Any) -> Any:
        nonlocal blocked
        blocked += 1
        go.wait(30)  # bounded: the test ends whatever happens
        return read(*args, **kwargs)

    monkeypatch.setattr(store, "result_bodies", stuck)
    stuck_pages = [asyncio.ensure_future(client.get("/executions")) for _ in range(views.READERS)]
    try:
        await eventually(
            lambda: (
                blocked >= views.PAGE_READERS and gateway.view.page_slots.taken == views.READERS
            ),
            "every page thread stuck, and more pages in flight",
        )
        # a lookup still answers (bounded: without its own threads it waited for ever)
        lookup = await bounded(
            client.get(f"/executions/{results[0].execution_id}"), "a lookup", timeout=20
        )
        assert lookup.status == 200 and blocked == views.PAGE_READERS
    finally:
        go.set()
        for resp in await asyncio.gather(*stuck_pages):
            assert resp.status == 200 and (await resp.json())["count"] == 4


async def test_a_streamed_page_past_its_deadline_is_aborted_and_lets_its_slot_go(
    gateway: Gateway,
    client: TestClient[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A client that takes a few bytes now and then is never dropped by WRITE_WAIT: without a
    # deadline, it held its slot and its batch for as long as it liked.
    caplog.set_level(logging.INFO, logger=pages.__name__)
    monkeypatch.setattr(pages, "PAGE_DEADLINE", 0.0)  # every streamed page is late
    monkeypatch.setattr(pages, "BATCH_BYTES", 1)  # a row a batch: streamed
    store_results(gateway, 5)
    resp = await client.get("/executions")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):  # no chunked terminator: not a page
        await resp.read()
    assert any("was not done within" in r.getMessage() for r in caplog.records)
    assert gateway.view.page_slots.taken == 0
    # A page answered at once (one batch) has nothing left to be late with.
    resp = await client.get("/executions?limit=1")
    assert resp.status == 200 and (await resp.json())["count"] == 1


# -- the API document against what the routes answer -------------------------------------------

DOCUMENTED = [r for r in ROUTES if r.documented]
#: A body each route taking one accepts (an idempotency key: a submit then reads the store).
BODIES: dict[type[Any], dict[str, Any]] = {
    ExecutionRequest: {"code": "print(1)", "idempotency_key": "order-12345"},
    RerunBody: {},
    ForkBody: {"code": "print(2)"},
}


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[Gateway, TestClient[Any, Any]]]:
    """A gateway with these settings whose store is empty and not caught up, and whose producer
    only records, over HTTP."""
    gateway = Gateway(Settings(gateway_state_dir=tmp_path, **settings), JobTypes.load())
    gateway.view.producer = Sent()  # type: ignore[assignment]
    app = gateway.app()
    app.on_startup.clear()
    app.on_cleanup.clear()
    try:
        async with TestClient(TestServer(app)) as client:
            yield gateway, client
    finally:
        await gateway.view.stop()


async def ask(
    client: TestClient[Any, Any], route: Route, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, Any, Any]:
    """The route's status, body (None when it has none) and headers, for made-up ids."""
    path = route.path.replace("{id}", "no-such-id").replace("{name}", "default")
    if route.body is not None and "data" not in kw:
        kw["json"] = BODIES[route.body]
    async with client.request(route.method, path, headers=headers, **kw) as resp:
        data = await resp.read()
        return resp.status, orjson.loads(data) if data else None, resp.headers


def declared(route: Route, status: int) -> dict[str, Any]:
    """What the API document says of ``route``'s ``status`` (failing when it says nothing)."""
    responses = openapi.document()["paths"][route.path][route.method.lower()]["responses"]
    assert str(status) in responses, f"{route.method} {route.path} answered {status}"
    answer: dict[str, Any] = responses[str(status)]
    return answer


def error_body(route: Route, status: int, body: Any) -> None:
    """The answer is the error body the document declares for it."""
    schema = declared(route, status)["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (route.path, status)
    if route.method != "HEAD":  # aiohttp sends no body for HEAD
        ErrorBody.model_validate(body)


@pytest.mark.parametrize("route", DOCUMENTED, ids=lambda r: f"{r.method} {r.path}")
async def test_what_each_route_answers_while_the_store_lags_is_in_the_api_document(
    route: Route, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every route that waits for the store answers 503 until it has caught up: the document
    # said so of /ready alone, and clients generated from it had no such answer to handle.
    async with serving(tmp_path, gateway_ready_wait=0.01) as (gateway, client):

        async def no_broker() -> bool:
            return False  # /health: its 503, with no broker to wait for

        monkeypatch.setattr(gateway.view, "broker_available", no_broker)
        status, body, _ = await ask(client, route)
        declared(route, status)
        if route.reads is not None:
            assert status == 503, body
            error_body(route, 503, body)
        else:
            assert status != 503 or 503 in route.responses, body  # its own: /ready, /health


@pytest.mark.parametrize("route", DOCUMENTED, ids=lambda r: f"{r.method} {r.path}")
async def test_what_the_protections_answer_on_each_route_is_in_the_api_document(
    route: Route, tmp_path: Path
) -> None:
    settings = {
        "gateway_api_keys": "a-key-1234",
        "gateway_rate_limit": 2,
        "gateway_max_payload_bytes": 64 * 1024,
        "gateway_ready_wait": 0.01,
    }
    async with serving(tmp_path, **settings) as (_, client):
        # No key: 401 where one is wanted.
        status, body, headers = await ask(client, route)
        if route.keyed:
            assert status == 401, body
            error_body(route, 401, body)
            assert "WWW-Authenticate" in headers
            assert "WWW-Authenticate" in declared(route, 401)["headers"]
        else:
            assert status != 401
            declared(route, status)
        # A body past the cap: 413, on any route.
        key = {"X-API-Key": "a-key-1234"}
        status, body, _ = await ask(client, route, key, data=b"x" * (64 * 1024 + 1))
        assert status == 413, body
        error_body(route, 413, body)
        # Past the rate limit: 429 with a Retry-After, where the limit applies.
        status, body, headers = await ask(client, route, key)
        if route.limited:
            assert status == 429, body
            error_body(route, 429, body)
            assert int(headers["Retry-After"]) >= 1
            assert "Retry-After" in declared(route, 429)["headers"]
        else:
            assert status != 429
            declared(route, status)


@pytest.mark.parametrize("path", ["/jobs/no-such-id/cancel", "/jobs/no-such-id/result"])
async def test_a_wait_out_of_bounds_is_a_declared_422(path: str, tmp_path: Path) -> None:
    # The cancel's 422 was not in the document.
    async with serving(tmp_path) as (_, client):
        route = next(r for r in DOCUMENTED if path.endswith(r.path.rsplit("/", 1)[-1]))
        method = client.post if route.method == "POST" else client.get
        resp = await method(path, params={"wait": "true", "timeout": "0"})
        assert resp.status == 422
        error_body(route, 422, await resp.json())
