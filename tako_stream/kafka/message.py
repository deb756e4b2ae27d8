"""A consumed request as the worker sees it: its bytes and where it was read from.

Plain data, with no client library in it, so the intake's logic runs the same on records from
Kafka and on records a unit test makes up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from tako_stream.core.models import SourcePosition

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True)
class Incoming:
    """One consumed record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=tuple)
    #: Milliseconds since the epoch when it was produced, if the producer said.
    timestamp_ms: int | None = None

    @classmethod
    def of(cls, record: Any) -> Incoming:
        """From an aiokafka ``ConsumerRecord``."""
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            headers=tuple(record.headers or ()),
            timestamp_ms=record.timestamp,
        )

    @property
    def size(self) -> int:
        """Bytes it holds: value, key and headers."""
        headers = sum(len(k) + len(v or b"") for k, v in self.headers)
        return len(self.value or b"") + len(self.key or b"") + headers

    @property
    def position_id(self) -> str:
        return position_id(self.topic, self.partition, self.offset)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def source(self) -> SourcePosition:
        return SourcePosition(
            topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            timestamp_ms=self.timestamp_ms,
        )


def position_id(topic: str, partition: int, offset: int) -> str:
    """An id derived from where a record is (the same at every delivery), usable as an
    execution id: ``topic:partition:offset``, the topic hashed when the whole is too long."""
    if len(topic) > 80:
        topic = hashlib.sha256(topic.encode()).hexdigest()[:32]
    return f"{topic}:{partition}:{offset}"
