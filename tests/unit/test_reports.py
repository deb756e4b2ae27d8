"""Workers' reports: what a worker publishes of its engine, and what the gateway makes of them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from tako_stream.core.errors import BrokerError, SandboxSetupError, SandboxUnavailableError
from tako_stream.core.models import (
    MAX_IMAGES,
    MAX_IN_FLIGHT,
    MAX_POOL_SIZE,
    MAX_RUNTIMES,
    WorkerReport,
)
from tako_stream.gateway.workers import MAX_REPORTS, WorkerReports
from tako_stream.kafka.codec import dumps
from tako_stream.settings import Settings
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
    reports = WorkerReports(clock=lambda: NOW)
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
    reports = WorkerReports(clock=lambda: NOW)
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


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def test_dead_workers_reports_are_dropped_not_kept() -> None:
    clock = Clock()
    reports = WorkerReports(clock=clock)
    reports.apply(b"w1", report("w1"))
    for n in range(1000):  # the compacted topic read again: dead workers' last reports
        reports.apply(f"dead-{n}".encode(), report(f"dead-{n}", age=31))
    assert len(reports) == 1
    clock.now += timedelta(seconds=31)  # w1 stopped reporting three intervals ago
    reports.apply(b"w2", report("w2", age=-31))
    assert [r.worker_id for r in reports.live()] == ["w2"] and len(reports) == 1


def test_reports_are_capped_in_number() -> None:
    reports = WorkerReports(clock=lambda: NOW)
    for n in range(MAX_REPORTS + 10):  # anyone may write to the workers topic
        reports.apply(f"w{n}".encode(), report(f"w{n}"))
    assert len(reports) == MAX_REPORTS and reports.slots(NOW) == 4 * MAX_REPORTS
    reports.apply(b"w0", report("w0", pool_size=1))  # a kept worker's next report is taken
    reports.apply(b"w1", None)  # and one that stops makes room
    reports.apply(b"new", report("new"))
    assert {"w0", "new"} <= {r.worker_id for r in reports.live(NOW)}
    assert len(reports) == MAX_REPORTS and reports.slots(NOW) == 4 * MAX_REPORTS - 3


def test_a_report_dated_ahead_is_not_live() -> None:
    reports = WorkerReports(clock=lambda: NOW)
    reports.apply(b"skewed", report("skewed", age=-5))  # a clock a little ahead: counted
    reports.apply(b"future", report("future", age=-3600, pool_size=1000))  # never stale
    assert [r.worker_id for r in reports.live(NOW)] == ["skewed"] and reports.slots(NOW) == 4
    assert len(reports) == 1
    # the future one is not counted when that time comes either: it was never kept
    assert reports.slots(NOW + timedelta(seconds=3600)) == 0


def test_a_record_keyed_other_than_its_worker_is_no_report() -> None:
    reports = WorkerReports(clock=lambda: NOW)
    reports.apply(b"x" * 100_000, report("w1"))  # keys were kept whatever their size
    assert len(reports) == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"images": {f"img-{n}:1": True for n in range(90_000)}},  # 1.1 MB, 8.6 MB parsed
        {"runtimes": [f"rt-{n}" for n in range(MAX_RUNTIMES + 1)]},
        {"images": {f"img-{n}:1": True for n in range(MAX_IMAGES + 1)}},
        {"images": {"i" * 513: True}},
        {"runtimes": ["r" * 129]},
    ],
)
def test_a_report_listing_more_than_a_worker_could_is_skipped(fields: dict[str, Any]) -> None:
    reports = WorkerReports(clock=lambda: NOW)
    reports.apply(b"w", report("w", **fields))
    assert len(reports) == 0
    # what a worker sends: its job types' images and its engine's runtimes
    many = {f"img-{n}:1": True for n in range(MAX_IMAGES)}
    reports.apply(b"w", report("w", images=many, runtimes=["runc", "runsc"]))
    assert len(reports) == 1


def test_capacity_no_encoder_can_carry_is_no_report() -> None:
    """The gateway adds up the live workers' pool sizes as Tako VM's ``max_workers`` (served by
    /health and /pool/stats, written by orjson): two forged reports at the 64-bit limit made a
    sum orjson cannot write, a 500 on both for as long as they stayed live."""
    reports = WorkerReports(clock=lambda: NOW)
    for worker in ("f1", "f2"):
        reports.apply(worker.encode(), report(worker, pool_size=2**63 - 1))
    orjson.dumps(reports.slots(NOW))  # raised TypeError: "Integer exceeds 64-bit range"
    reports.apply(b"f3", report("f3", pool_size=MAX_POOL_SIZE + 1))
    reports.apply(b"f4", report("f4", in_flight=MAX_IN_FLIGHT + 1))
    assert len(reports) == 0
    # what a worker may report: the largest pool TAKO_POOL_SIZE allows
    for n in range(MAX_REPORTS):
        reports.apply(f"w{n}".encode(), report(f"w{n}", pool_size=MAX_POOL_SIZE))
    assert reports.slots(NOW) == MAX_POOL_SIZE * MAX_REPORTS
    assert Settings(pool_size=MAX_POOL_SIZE).pool_size == MAX_POOL_SIZE
