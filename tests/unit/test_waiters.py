"""Waiting for a record by key: woken by it, and nothing left behind however a wait ends."""

from __future__ import annotations

import asyncio

import pytest

from tako_stream.kafka.waiters import Waiters


async def test_every_waiter_of_a_key_is_woken_and_then_forgotten() -> None:
    waiters: Waiters[int] = Waiters()

    async def wait(key: str) -> int:
        with waiters.waiting(key) as future:
            return await future

    tasks = [asyncio.create_task(wait("a")) for _ in range(3)]
    other = asyncio.create_task(wait("b"))
    await asyncio.sleep(0)
    assert len(waiters) == 2
    waiters.wake("a", 7)
    waiters.wake("nobody", 1)  # no one waits: nothing happens
    assert await asyncio.gather(*tasks) == [7, 7, 7]
    assert len(waiters) == 1 and not other.done()
    other.cancel()
    with pytest.raises(asyncio.CancelledError):
        await other
    assert len(waiters) == 0


async def test_a_wait_that_times_out_leaves_nothing_behind() -> None:
    waiters: Waiters[None] = Waiters()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            with waiters.waiting("k") as future:
                await future
    assert len(waiters) == 0
    waiters.wake("k", None)  # late: harmless


async def test_a_value_that_came_before_the_wait_began_is_kept() -> None:
    """Registered before the lookup: a record read meanwhile is not missed."""
    waiters: Waiters[str] = Waiters()
    with waiters.waiting("k") as future:
        waiters.wake("k", "read during the lookup")
        assert await future == "read during the lookup"
