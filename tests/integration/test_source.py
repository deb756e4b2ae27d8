"""The intake's Kafka source on the real broker: pausing fetches loses and repeats nothing."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from tako_stream.kafka.clients import producer_options
from tako_stream.kafka.message import Incoming
from tako_stream.kafka.topics import ensure_topics
from tako_stream.worker.stream import KafkaSource
from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration]


async def fetch_until(source: KafkaSource, count: int, timeout: float = 30) -> list[Incoming]:
    got: list[Incoming] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            got += await source.fetch(0.2)
    return got


async def test_a_paused_source_returns_nothing_and_resumes_where_it_stopped(
    new_stack: Stack,
) -> None:
    """The intake pauses its source while requests wait for capacity (no long-polls for
    records it could not start): records fetched ahead before the pause, or produced during it,
    must all come after ``resume``, once each and in order."""
    settings = new_stack.settings
    await ensure_topics(settings)
    assigned: set[TopicPartition] = set()
    ready = asyncio.Event()

    async def on_assigned(tps: set[TopicPartition]) -> None:
        assigned.update(tps)
        if tps:
            ready.set()

    async def on_revoked(tps: set[TopicPartition]) -> None:
        assigned.difference_update(tps)

    source = KafkaSource(settings)
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    await source.start(on_revoked, on_assigned)
    try:
        await asyncio.wait_for(ready.wait(), 60)

        async def produce(first: int, last: int) -> None:
            for n in range(first, last):
                await producer.send_and_wait(settings.requests_topic, str(n).encode(), partition=0)

        await produce(0, 3)
        got = await fetch_until(source, 3)
        # Fetched ahead and buffered when the pause comes (as when the intake pauses while
        # its requests wait), then resumed without a fetch in between, as the intake does.
        await produce(3, 6)
        await asyncio.sleep(0.5)  # many 20 ms fetch waits: aiokafka has fetched 3-5 ahead
        source.pause()
        await asyncio.sleep(0.3)
        source.resume()
        got += await fetch_until(source, 6 - len(got))
        # Produced while paused: nothing is returned until resumed (a fetch while paused, which
        # the intake never makes, returns nothing), then everything, once.
        source.pause()
        await produce(6, 9)
        await asyncio.sleep(0.5)
        assert await source.fetch(0.3) == [], "a paused source returned records"
        source.resume()
        source.resume()  # resuming twice (or with nothing paused) is harmless
        got += await fetch_until(source, 9 - len(got))
        await asyncio.sleep(0.5)
        got += await source.fetch(0.3)
        assert [m.value for m in got] == [str(n).encode() for n in range(9)]
        assert [m.offset for m in got] == list(range(9))
    finally:
        await source.stop()
        await producer.stop()
