"""The intake's seams over Kafka: a consumer group's partitions in, an acks=all producer out.

aiokafka's errors are mapped to ours here, at the boundary, so the intake knows only
``BrokerError`` (retry) and ``PublishRefusedError`` (never retry).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)
from aiokafka.structs import OffsetAndMetadata, RecordMetadata

from tako_stream.core.errors import BrokerError, PublishRefusedError
from tako_stream.kafka.clients import consumer, producer_options
from tako_stream.kafka.message import Headers, Incoming
from tako_stream.settings import Settings
from tako_stream.worker.seams import Assigned, Outcome, Outgoing, Revoked

log = logging.getLogger(__name__)

#: What the broker (or the producer, for its own size limit) refuses for good: retrying the
#: same message cannot help.
REFUSALS = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    InvalidTopicError,
)


def mapped(exc: KafkaError) -> BrokerError:
    """aiokafka's error as ours: a refusal for good, or a fault worth retrying."""
    if isinstance(exc, REFUSALS):
        return PublishRefusedError(str(exc) or type(exc).__name__)
    return BrokerError(str(exc) or type(exc).__name__)


def _outcome(ack: asyncio.Future[RecordMetadata] | BrokerError) -> Outcome:
    if isinstance(ack, BrokerError):
        return ack
    if ack.cancelled():
        return BrokerError("the send was cancelled")
    exc = ack.exception()
    if exc is None:
        landed = ack.result()
        return landed.partition, landed.offset
    if isinstance(exc, KafkaError):
        return mapped(exc)
    return BrokerError(repr(exc))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_revoked: Revoked, on_assigned: Assigned) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        await self._on_assigned(set(assigned))


def pause_fetching(consumer: AIOKafkaConsumer) -> None:
    """Pause every partition ``consumer`` is assigned now (see ``resume_fetching``)."""
    _flow(consumer.pause, consumer.assignment)


def resume_fetching(consumer: AIOKafkaConsumer) -> None:
    """Resume only what is paused now: a rebalance since the pause assigns partitions
    unpaused, and resuming one no longer assigned raises."""
    _flow(consumer.resume, consumer.paused)


def _flow(change: Callable[..., None], partitions: Callable[[], Iterable[TopicPartition]]) -> None:
    """Pausing only saves polls: a partition taken by a rebalance in between must not end the
    intake's loop (aiokafka raises ``IllegalStateError`` for one no longer assigned)."""
    try:
        change(*partitions())
    except KafkaError as exc:
        log.debug("pausing or resuming fetches: %r", exc)


class KafkaSource:
    """The requests topic through the worker's consumer group; commits are the intake's."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self, on_revoked: Revoked, on_assigned: Assigned) -> None:
        s = self.settings
        self._consumer = consumer(
            s,
            group_id=s.consumer_group,
            client_id=f"tako-intake-{s.worker_id}",
            auto_offset_reset="earliest",
            # A worker that waits on a full pool does not poll; heartbeats go on regardless.
            max_poll_interval_ms=int((300 + s.timeout_grace) * 2 * 1000),
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
            # A member gets this long to rejoin a rebalance, and revocation waits for running
            # jobs (Settings.revoke_wait): left at the session timeout (aiokafka's default),
            # a worker waiting for a 30 s job would be dropped from the group, its jobs run a
            # second time elsewhere, and its late join start the next rebalance.
            rebalance_timeout_ms=int((s.revoke_wait + 15) * 1000),
            group_instance_id=s.worker_id if s.kafka_static_membership else None,
            # Short fetch waits by default: a request must not sit on the broker for the default
            # 500 ms (the embedded broker holds a fetch for the whole wait even once data arrives).
            fetch_max_wait_ms=s.kafka_fetch_wait_ms,
            fetch_max_bytes=16 * 1024 * 1024,
        )
        self._consumer.subscribe([s.requests_topic], listener=_Rebalance(on_revoked, on_assigned))
        await self._consumer.start()

    async def fetch(self, timeout: float) -> list[Incoming]:
        if self._consumer is None:
            return []
        try:
            batches = await self._consumer.getmany(timeout_ms=int(timeout * 1000), max_records=100)
        except KafkaError as exc:
            raise BrokerError(str(exc) or type(exc).__name__) from exc
        return [Incoming.of(record) for records in batches.values() for record in records]

    def assignment(self) -> set[TopicPartition]:
        if self._consumer is None:
            return set()
        return set(self._consumer.assignment())

    def pause(self) -> None:
        if self._consumer is not None:
            pause_fetching(self._consumer)

    def resume(self) -> None:
        if self._consumer is not None:
            resume_fetching(self._consumer)

    async def commit(self, positions: dict[TopicPartition, int]) -> None:
        if self._consumer is None:
            return
        try:
            await self._consumer.commit(
                {tp: OffsetAndMetadata(pos, "") for tp, pos in positions.items()}
            )
        except (CommitFailedError, KafkaError) as exc:
            raise BrokerError(str(exc) or type(exc).__name__) from exc

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


class KafkaSink:
    """An acks=all producer; ``send`` returns once the broker acknowledged the message."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(**producer_options(self.settings))
        await self._producer.start()

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> tuple[int, int]:
        if self._producer is None:
            raise BrokerError("the producer is not started")
        try:
            ack = await self._producer.send(topic, value=value, key=key, headers=list(headers))
            landed = await ack
            return landed.partition, landed.offset
        except KafkaError as exc:
            raise mapped(exc) from exc

    async def send_all(self, messages: Sequence[Outgoing]) -> list[Outcome]:
        """Every message handed to the producer first (it batches them per partition), then
        the acks awaited together: one round trip for a burst, not one per message."""
        if self._producer is None:
            return [BrokerError("the producer is not started")] * len(messages)
        acks: list[asyncio.Future[RecordMetadata] | BrokerError] = []
        for topic, key, value, headers in messages:
            try:
                acks.append(
                    await self._producer.send(topic, value=value, key=key, headers=list(headers))
                )
            except KafkaError as exc:
                acks.append(mapped(exc))
        waiting = [ack for ack in acks if isinstance(ack, asyncio.Future)]
        if waiting:
            # asyncio.wait, not gather: a caller's timeout must not cancel the producer's
            # futures (the messages are in its batches whatever happens to this wait).
            await asyncio.wait(waiting)
        return [_outcome(ack) for ack in acks]

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
