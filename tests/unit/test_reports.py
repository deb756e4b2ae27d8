"""Workers' reports: what a worker publishes of its engine, and what the gateway makes of them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from tako_stream.core.errors import BrokerError, SandboxSetupError, SandboxUnavailableError
from tako_stream.core.models import WorkerReport
from tako_stream.gateway.workers import WorkerReports
from tako_stream.kafka.codec import dumps
from tako_stream.worker.reports import Reporter

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


Send = Callable[[bytes, bytes | None], Awaitable[None]]


def reporter(
    sent: list[tuple[bytes, bytes | None]], *, engine: bool = True, send: Send | None = None
) -> Reporter:
    async def facts(images: list[str]) -> tuple[list[str], dict[str, bool]]:
        if not engine:
            raise SandboxUnavailableError("Docker daemon unreachable during info")
        return ["runc", "runsc"], {image: image.endswith(":1") for image in images}

    async def record(key: bytes, value: bytes | None) -> None:
        sent.append((key, value))

    return Reporter(
        worker_id="w1",
        images=["a:1", "b:2", "a:1"],
        pool_size=4,
        interval=0.01,
        facts=facts,
        send=send or record,
        in_flight=lambda: 3,
    )


async def test_a_report_says_what_the_engine_has() -> None:
    sent: list[tuple[bytes, bytes | None]] = []
    report = await reporter(sent).report()
    assert sent == [(b"w1", dumps(report))]
    parsed = WorkerReport.model_validate_json(sent[0][1] or b"")
    assert parsed.docker_available and parsed.runtimes == ["runc", "runsc"]
    assert parsed.images == {"a:1": True, "b:2": False}
    assert (parsed.pool_size, parsed.in_flight) == (4, 3)


async def test_an_engine_away_is_reported_not_raised() -> None:
    sent: list[tuple[bytes, bytes | None]] = []
    report = await reporter(sent, engine=False).report()
    assert not report.docker_available and report.runtimes == [] and report.images == {}
    assert len(sent) == 1


async def test_reporting_goes_on_after_a_broker_fault_and_retiring_is_bounded() -> None:
    sent: list[tuple[bytes, bytes | None]] = []
    calls = 0
    hang, two_sent = asyncio.Event(), asyncio.Event()

    async def flaky(key: bytes, value: bytes | None) -> None:
        nonlocal calls
        calls += 1
        if value is None:
            await hang.wait()  # a broker that never acknowledges the tombstone
        if calls == 1:
            raise BrokerError("broker away")
        sent.append((key, value))
        if len(sent) == 2:
            two_sent.set()

    worker = reporter(sent, send=flaky)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(two_sent.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls >= 3  # the failed report was not the last
    await asyncio.wait_for(worker.retire(0.05), 1)  # returns although the send hangs


def report(worker: str, *, age: float = 0, **fields: object) -> bytes:
    body = {
        "worker_id": worker,
        "at": (NOW - timedelta(seconds=age)).isoformat(),
        "interval": 10,
        "version": "0.1.0",
        "pool_size": 4,
        "in_flight": 0,
        "docker_available": True,
        "runtimes": ["runc"],
        "images": {"img:1": True},
        **fields,
    }
    return orjson.dumps(body)


def test_the_gateway_counts_live_workers_only() -> None:
    reports = WorkerReports()
    assert reports.docker_available(NOW) is None and reports.image_exists("img:1", NOW) is None
    assert reports.slots(NOW) == 0 and not reports.has_runtime("runsc", NOW)
    reports.apply(b"w1", report("w1"))
    reports.apply(b"w2", report("w2", runtimes=["runc", "runsc"], images={"img:1": False}))
    reports.apply(b"w3", report("w3", age=31, pool_size=100))  # three intervals old: dead
    reports.apply(None, report("nobody"))
    assert {r.worker_id for r in reports.live(NOW)} == {"w1", "w2"}
    assert reports.slots(NOW) == 8
    assert reports.has_runtime("runsc", NOW) and reports.image_exists("img:1", NOW) is True
    assert reports.image_exists("other:1", NOW) is False
    assert reports.docker_available(NOW) is True
    reports.apply(b"w1", None)  # w1 stopped
    reports.apply(b"w2", report("w2", docker_available=False))
    assert reports.docker_available(NOW) is False and reports.slots(NOW) == 4
    # an hour on, every report is stale
    assert reports.slots(NOW + timedelta(hours=1)) == 0


@pytest.mark.parametrize(
    "junk",
    [
        b"not a report",
        orjson.dumps({"worker_id": "w"}),
        report("w", at="2026-11-30T12:00:00"),  # no time zone: no comparing it with now
        report("w", interval=1e20),  # no timedelta holds it
        report("w", interval=-1),
    ],
)
def test_records_that_are_no_report_are_skipped(junk: bytes) -> None:
    reports = WorkerReports()
    reports.apply(b"w", junk)
    assert reports.live(NOW) == [] and reports.slots(NOW) == 0


async def test_an_engine_refusing_is_reported_unavailable_and_a_bug_does_not_stop_reports() -> None:
    calls = 0
    sent: list[tuple[bytes, bytes | None]] = []
    two = asyncio.Event()

    async def facts(images: list[str]) -> tuple[list[str], dict[str, bool]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise SandboxSetupError("Container info failed: 403 Forbidden")  # a socket proxy
        if calls == 2:
            raise RuntimeError("a bug")
        return [], {}

    async def send(key: bytes, value: bytes | None) -> None:
        sent.append((key, value))
        if len(sent) == 2:
            two.set()

    worker = Reporter(
        worker_id="w",
        images=[],
        pool_size=1,
        interval=0.01,
        facts=facts,
        send=send,
        in_flight=lambda: 0,
    )
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(two.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    first = WorkerReport.model_validate_json(sent[0][1] or b"")
    assert first.docker_available is False and calls >= 3
