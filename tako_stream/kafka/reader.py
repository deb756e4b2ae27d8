"""Reading a topic without a consumer group: the one way the service reads a topic whole.

Local views of shared keyed topics (the DLQ, the control and status topics, the breaker's
changelog) need every partition, and readers waiting for their own answers need no group: a
group join takes 20 s and more on some brokers and would take partitions from other readers.
So partitions are assigned here, and positions are the reader's own business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from tako_stream.kafka.clients import MAX_MESSAGE_BYTES, consumer
from tako_stream.kafka.topics import partitions
from tako_stream.logs import Condition
from tako_stream.settings import Settings

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]
#: Folds one record (key, value) into a view; a ``None`` value is a tombstone.
Apply = Callable[[bytes | None, bytes | None], object]

#: Seconds without a record after which a read counts as at its end although a position is
#: short of the end offset: a compacted or transactional tail has no records to deliver there.
STALL_SECONDS = 5.0


class TopicReader:
    """A consumer with no group over the partitions of one topic (all of them by default)."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        *,
        wait_for_topic: float = 0.0,
        only: list[TopicPartition] | None = None,
        **options: Any,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.partitions: list[TopicPartition] = list(only or [])
        self._wait = wait_for_topic
        self._options = {
            "fetch_max_bytes": 2 * MAX_MESSAGE_BYTES,
            # The embedded broker holds a fetch for its whole wait even once records arrive:
            # the deployment's wait, short there, keeps readers from idling on it.
            "fetch_max_wait_ms": settings.kafka_fetch_wait_ms,
            **options,
        }
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> TopicReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def _kafka(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("TopicReader is not started")
        return self._consumer

    async def start(self) -> None:
        """Assign the topic's partitions; ``LookupError`` when the topic does not exist."""
        if not self.partitions:
            self.partitions = await partitions(self.settings, self.topic, wait=self._wait)
        if not self.partitions:
            raise LookupError(f"topic {self.topic!r} does not exist (is a worker running?)")
        self._consumer = consumer(self.settings, **self._options)
        await self._consumer.start()
        self._consumer.assign(self.partitions)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def from_beginning(self) -> None:
        await self._kafka.seek_to_beginning(*self.partitions)

    async def from_end(self) -> None:
        """Start after what the topic holds now: only records produced from here on are read."""
        await self._kafka.seek_to_end(*self.partitions)
        for tp in self.partitions:  # resolve the positions now, not at the first fetch
            await self._kafka.position(tp)

    async def from_offsets(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            self._kafka.seek(tp, offset)

    async def position(self, tp: TopicPartition) -> int:
        """The offset of the next record to be read from ``tp``."""
        position: int = await self._kafka.position(tp)
        return position

    async def end_offsets(self) -> dict[TopicPartition, int]:
        offsets: dict[TopicPartition, int] = await self._kafka.end_offsets(self.partitions)
        return offsets

    async def reached(self, end: dict[TopicPartition, int]) -> bool:
        """Whether every partition's position is at or past ``end``."""
        for tp in self.partitions:
            if await self._kafka.position(tp) < end[tp]:
                return False
        return True

    async def fetch(self, timeout: float = 0.5) -> list[Record]:
        """The records of one fetch, in order within each partition; [] after ``timeout``."""
        batches = await self._kafka.getmany(timeout_ms=int(timeout * 1000))
        return [record for records in batches.values() for record in records]

    async def read_to_end(self, each: Callable[[Record], object]) -> None:
        """Hand every record up to (at least) the end offsets as of now to ``each``.

        Everything fetched is handed over, even past those offsets: the embedded broker reports
        a partition's end as the base offset of its last batch, so a filter on the end offset
        would drop the rest of that batch (on Kafka the extra records are merely newer)."""
        end = await self.end_offsets()
        loop = asyncio.get_running_loop()
        last_record = loop.time()
        while not await self.reached(end):
            if loop.time() - last_record > STALL_SECONDS:
                log.debug("%s: nothing more to read short of its end offsets", self.topic)
                return
            records = await self.fetch(timeout=0.5)
            if records:
                last_record = loop.time()
            for record in records:
                each(record)


class EndOffsets:
    """Asks the broker where partitions end, on a connection of its own.

    A broker answers the requests of one connection in order, so on a reader's connection this
    question would wait behind the reader's long-polling fetch (its whole ``fetch_max_wait``).
    This consumer is assigned nothing and so never fetches; it connects on first use and again
    after a fault.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None

    async def __call__(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        if self._consumer is None:
            started = consumer(self.settings)
            try:
                await started.start()
            except BaseException:
                await started.stop()
                raise
            self._consumer = started
        try:
            offsets: dict[TopicPartition, int] = await self._consumer.end_offsets(tps)
        except (KafkaError, OSError):
            await self.stop()
            raise
        return offsets

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer_, self._consumer = self._consumer, None
            await consumer_.stop()


async def tail(
    settings: Settings, topic: str, apply: Apply, caught_up: asyncio.Event | None = None
) -> None:
    """Feed every record of ``topic``, from its beginning and forever, to ``apply(key, value)``
    (see ``tail_records``)."""
    await tail_records(settings, topic, lambda record: apply(record.key, record.value), caught_up)


async def tail_records(
    settings: Settings,
    topic: str,
    each: Callable[[Record], object],
    caught_up: asyncio.Event | None = None,
) -> None:
    """Hand every record of ``topic``, from its beginning and forever, to ``each``.

    A broker fault restarts the read from the beginning (views are folds, so replaying records
    is harmless), never ends it; a topic that does not exist yet is waited for.  ``caught_up`` is
    set once what the topic held at the start has been handed over.
    """
    failing = Condition(f"reading {topic} (starting over every second)", log)
    while True:
        try:
            await _tail_once(settings, topic, each, caught_up, failing)
        except (KafkaError, LookupError, OSError) as exc:
            failing.wrong(exc)
            await asyncio.sleep(1)


async def _tail_once(
    settings: Settings,
    topic: str,
    each: Callable[[Record], object],
    caught_up: asyncio.Event | None,
    failing: Condition,
) -> None:
    follow = settings.follow_wait_ms
    async with TopicReader(settings, topic, wait_for_topic=1.0, fetch_max_wait_ms=follow) as reader:
        failing.right()
        await reader.from_beginning()
        end = await reader.end_offsets() if caught_up is not None else {}
        while True:
            for record in await reader.fetch(timeout=1.0):
                each(record)
            if caught_up is not None and not caught_up.is_set() and await reader.reached(end):
                caught_up.set()


async def read_to_end(settings: Settings, topic: str, apply: Apply) -> None:
    """Fold the whole topic, up to its end as of now, into ``apply``; nothing if it is missing."""
    with contextlib.suppress(LookupError):
        async with TopicReader(settings, topic) as reader:
            await reader.from_beginning()
            await reader.read_to_end(lambda record: apply(record.key, record.value))


async def latest(settings: Settings, topic: str, key: str) -> Record | None:
    """The last record with ``key`` on ``topic`` now, reading only the partition the default
    partitioner puts that key in (how every tako-stream producer keys its messages)."""
    tps = await partitions(settings, topic)
    if not tps:
        return None
    wanted = key.encode()
    ids = [tp.partition for tp in tps]
    tp = TopicPartition(topic, DefaultPartitioner()(wanted, ids, ids))
    found: Record | None = None

    def keep(record: Record) -> None:
        nonlocal found
        if record.key == wanted:
            found = record

    async with TopicReader(settings, topic, only=[tp]) as reader:
        await reader.from_beginning()
        await reader.read_to_end(keep)
    return found


async def read_record(
    settings: Settings, tp: TopicPartition, offset: int, *, timeout: float
) -> Record | None:
    """The record at ``offset`` of ``tp``, or None when the partition no longer holds it
    (retention or compaction removed it, or the topic was recreated); ``TimeoutError`` when
    the broker does not hand it over within ``timeout`` seconds.

    A consumer of its own, assigned that one partition: the record is read where it is, so a
    request can be fetched back by the position the gateway's store keeps, however big the
    topic is.
    """
    async with asyncio.timeout(timeout):
        reader = consumer(settings, fetch_max_bytes=2 * MAX_MESSAGE_BYTES)
        try:
            await reader.start()
            reader.assign([tp])
            if offset < (await reader.beginning_offsets([tp]))[tp]:
                return None  # deleted by retention
            reader.seek(tp, offset)
            while True:
                batches = await reader.getmany(tp, timeout_ms=500)
                for record in batches.get(tp, []):
                    if record.offset == offset:
                        return record
                    if record.offset > offset:
                        return None  # compacted away: the next record is a later one
                if await reader.position(tp) > offset:
                    return None
        finally:
            await reader.stop()
