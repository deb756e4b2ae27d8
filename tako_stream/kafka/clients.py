"""How every Kafka client of the service is configured: one producer and one consumer factory.

Only standard Kafka APIs and options are used, so Apache Kafka, Redpanda and the embedded broker
all work unchanged.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer

from tako_stream.kafka.records import install as tolerate_bad_header_keys
from tako_stream.settings import Settings

#: The largest message any consumer of ours can be handed (``Settings.kafka_max_message_bytes``
#: may be set lower, never higher than topics made by others allow).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


#: Bytes of one partition's batch.  aiokafka has one batch in flight per partition; with its
#: default (16 KB) a burst of answers filled the next batch every dozen messages, and every
#: send then waited for a drain (measured: 1,100 refused requests answered a second; 2,300
#: with this).  Kept under the brokers' default message.max.bytes (1 MiB), which caps a batch.
BATCH_BYTES = 512 * 1024


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``, unsigned), which the
    Java client and aiokafka use to place a keyed message.  aiokafka's own is pure Python too,
    byte by byte; reading whole words makes it three times faster, and it was the largest
    single cost of answering a refused request (two keyed sends each)."""
    length = len(data)
    h = 0x9747B28C ^ length
    words = length >> 2
    for k in struct.unpack_from(f"<{words}I", data):
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail, base = length & 3, words << 2
    if tail >= 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h = ((h ^ data[base]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def partition_for(
    key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
) -> int:
    """The Java client's default partitioner (and aiokafka's): murmur2 of the key, or any
    partition for a message without one.  Keys must land where every other client puts them:
    a consumer reading one execution id's partition relies on it."""
    if key is None:
        return random.choice(list(available) or list(all_partitions))
    return all_partitions[(murmur2(key) & 0x7FFFFFFF) % len(all_partitions)]


def producer_options(settings: Settings) -> dict[str, Any]:
    """An acks=all producer: an answer counts as sent once every in-sync replica has it."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": f"tako-{settings.worker_id}",
        "acks": "all",
        "enable_idempotence": settings.kafka_idempotence,
        "linger_ms": 2,
        "partitioner": partition_for,
        "max_batch_size": min(BATCH_BYTES, settings.kafka_max_message_bytes),
        "max_request_size": settings.kafka_max_message_bytes,
        "compression_type": None,
    }


def consumer(settings: Settings, **options: Any) -> AIOKafkaConsumer:
    """A consumer that never commits by itself and can fetch the largest message a topic takes.

    Every consumer of the service is made here, so every one of them parses record batches with
    ``tolerate_bad_header_keys`` (a header key that is not UTF-8 must not stop a stream).
    """
    tolerate_bad_header_keys()
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
        **options,
    )
