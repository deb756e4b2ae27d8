"""The worker's view of the control topic: who is cancelled, and waking the running job."""

from __future__ import annotations

import asyncio
import tracemalloc
from datetime import UTC, datetime

from tako_stream.core.models import CancelRequest
from tako_stream.kafka.codec import dumps
from tako_stream.worker.cancel import Cancellations


def cancel(execution_id: str) -> bytes:
    return dumps(CancelRequest(execution_id=execution_id, requested_at=datetime.now(UTC)))


async def test_a_running_job_is_woken_and_a_later_one_starts_cancelled() -> None:
    c = Cancellations()
    with c.watch("job-1") as event:
        assert not event.is_set()
        c.apply(b"job-1", cancel("job-1"))
        assert event.is_set()
    assert c.requested("job-1")
    with c.watch("job-1") as again:  # redelivered after a crash: still cancelled
        assert again.is_set()
    with c.watch("job-2") as other:
        assert not other.is_set()


def test_tombstones_garbage_and_the_bound() -> None:
    c = Cancellations(keep=3)
    c.apply(b"x", b"not json")
    c.apply(b"x", b'{"action": "explode", "execution_id": "x"}')
    assert not c.requested("x")
    for n in range(5):
        c.apply(f"j{n}".encode(), cancel(f"j{n}"))
    assert [c.requested(f"j{n}") for n in range(5)] == [False, False, True, True, True]
    c.apply(b"j4", None)
    assert not c.requested("j4")


async def test_watch_forgets_the_job_when_it_ends() -> None:
    c = Cancellations()
    with c.watch("job-1"):
        pass
    c.apply(b"job-1", cancel("job-1"))  # no running job to wake: no error
    assert c.requested("job-1")
    await asyncio.sleep(0)


def test_each_cancel_costs_little_more_than_its_id() -> None:
    """Only the ids are kept: whole requests (a reason of 1000 characters, a correlation id of
    128) once cost kilobytes each, hundreds of megabytes at the default bound."""
    c = Cancellations()
    records = [
        (
            f"j{n:0127d}".encode(),
            dumps(
                CancelRequest(
                    execution_id=f"j{n:0127d}",
                    requested_at=datetime.now(UTC),
                    reason="r" * 1000,
                    correlation_id="c" * 128,
                )
            ),
        )
        for n in range(1000)
    ]
    tracemalloc.start()
    try:
        for key, value in records:
            c.apply(key, value)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held / len(records) < 600, held / len(records)
    assert c.requested(f"j{999:0127d}") and not c.requested("j1")
