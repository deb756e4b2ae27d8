"""The intake's seams: where requests come from, where answers go, what was answered.

Kafka implements ``Source`` and ``Sink`` (``worker.stream``), the results topic ``Answers``
(``worker.answered``); the unit tests implement all three in memory (``tests/fakes.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from aiokafka import TopicPartition

from tako_stream.core.errors import BrokerError
from tako_stream.kafka.message import Headers, Incoming

Revoked = Callable[[set[TopicPartition]], Awaitable[None]]
Assigned = Callable[[set[TopicPartition]], Awaitable[None]]
#: Whether a topic exists (``BrokerError`` when the broker cannot tell).
TopicExists = Callable[[str], Awaitable[bool]]
#: A message to send: topic, key, value, headers.
Outgoing = tuple[str, bytes | None, bytes | None, Headers]
#: What became of one message of ``Sink.send_all``: where it landed (partition, offset) when
#: known, or why not (``PublishRefusedError`` for good, ``BrokerError`` otherwise).
Outcome = tuple[int, int] | None | BrokerError


class Source(Protocol):
    """Where requests come from: partitions this worker owns, and their committed positions."""

    async def start(self, on_revoked: Revoked, on_assigned: Assigned) -> None:
        """Start consuming; ``on_revoked`` runs before partitions are handed to another,
        ``on_assigned`` once new ones are this worker's, before any of their records."""
        ...

    async def fetch(self, timeout: float) -> list[Incoming]:
        """The next records ([] after ``timeout``); ``BrokerError`` when the broker fails."""
        ...

    def assignment(self) -> set[TopicPartition]: ...

    def pause(self) -> None:
        """Stop fetching ahead from every assigned partition until ``resume`` (records already
        fetched and not yet returned are not lost: they come after ``resume``)."""
        ...

    def resume(self) -> None: ...

    async def commit(self, positions: dict[TopicPartition, int]) -> None:
        """Store positions (the next offset to read); ``BrokerError`` when it failed."""
        ...

    async def stop(self) -> None: ...


class Answers(Protocol):
    """Which request records already have their answer on the results topic (see
    ``worker.answered``)."""

    def answered(self, execution_id: str, position: str) -> bool: ...

    def has_answer(self, execution_id: str) -> bool: ...

    def record(self, execution_id: str, position: str) -> None: ...

    async def wait_until_current(self, timeout: float) -> bool: ...


class Sink(Protocol):
    """Where answers go: returns once the broker acknowledged the message."""

    async def start(self) -> None: ...

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> tuple[int, int] | None:
        """Where it landed (partition, offset), if known; ``PublishRefusedError`` when the
        broker refuses it for good, ``BrokerError`` when it did not answer."""
        ...

    async def send_all(self, messages: Sequence[Outgoing]) -> list[Outcome]:
        """Send every message at once (batched by the producer, no wait for each ack in
        turn); returns when the broker answered for all of them, one outcome per message, in
        order.  Never raises for a message's failure: that is its outcome."""
        ...

    async def stop(self) -> None: ...
