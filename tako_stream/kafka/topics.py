"""Plain-Kafka plumbing shared by the worker and the CLI: client options and topic creation.

Only standard Kafka APIs are used, so Apache Kafka, Redpanda and the embedded broker all work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from tako_stream.kafka.records import install as tolerate_bad_header_keys
from tako_stream.settings import Settings

log = logging.getLogger(__name__)

#: Requests carry up to 100k chars of code and 1 MiB of input; results up to 1 MiB of output
#: and two 64 KiB streams: above Kafka's 1 MB default, so topics and clients allow 8 MiB.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
DAY_MS = 24 * 3600 * 1000


def producer_options(settings: Settings) -> dict[str, Any]:
    """An acks=all producer: an answer counts as sent once every in-sync replica has it."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": f"tako-{settings.worker_id}",
        "acks": "all",
        "enable_idempotence": settings.kafka_idempotence,
        "linger_ms": 2,
        "max_request_size": MAX_MESSAGE_BYTES,
        "compression_type": None,
    }


def topic_specs(settings: Settings) -> list[NewTopic]:
    common = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
    return [
        NewTopic(
            settings.requests_topic,
            settings.topic_partitions,
            settings.topic_replication,
            topic_configs=common,
        ),
        # Keyed by execution_id and compacted: a re-run answer replaces the earlier one.
        NewTopic(
            settings.results_topic,
            settings.topic_partitions,
            settings.topic_replication,
            topic_configs={**common, "cleanup.policy": "compact"},
        ),
        NewTopic(
            settings.dlq_topic,
            settings.topic_partitions,
            settings.topic_replication,
            topic_configs=common,
        ),
        # Read whole by every worker and gateway: compacted per job, and kept a week (a cancel
        # for a request still queued after that is moot), a day for running states.
        NewTopic(
            settings.control_topic,
            settings.topic_partitions,
            settings.topic_replication,
            topic_configs={"cleanup.policy": "compact,delete", "retention.ms": str(7 * DAY_MS)},
        ),
        NewTopic(
            settings.status_topic,
            settings.topic_partitions,
            settings.topic_replication,
            topic_configs={"cleanup.policy": "compact,delete", "retention.ms": str(DAY_MS)},
        ),
    ]


async def ensure_topics(settings: Settings, extra: list[NewTopic] | None = None) -> None:
    """Create the service's topics when missing; existing topics are left as they are."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"tako-admin-{settings.worker_id}",
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topic_specs(settings) + (extra or []) if t.name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
                log.info("created topics %s", [t.name for t in missing])
            except TopicAlreadyExistsError:
                pass  # another worker created them first
    finally:
        await admin.close()


def reader(settings: Settings, **options: Any) -> AIOKafkaConsumer:
    """A consumer with no group, for reading topics whole (partitions assigned by the caller)."""
    tolerate_bad_header_keys()  # a header key that is not UTF-8 must not stop the stream
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
        **options,
    )


async def tail(
    settings: Settings,
    topic: str,
    apply: Callable[[bytes | None, bytes | None], None],
    caught_up: asyncio.Event | None = None,
) -> None:
    """Feed every record of ``topic``, from its beginning and forever, to ``apply(key, value)``.

    No consumer group: every caller sees every partition, which is what a local view of a
    shared, keyed topic (the DLQ, a table's changelog) needs.  A broker fault restarts the read
    from the beginning (the views are folds, so replaying records is harmless), never ends it.
    ``caught_up`` is set once what the topic held at the start has been applied.
    """
    while True:
        try:
            await _tail_once(settings, topic, apply, caught_up)
        except KafkaError as exc:
            log.warning("reading %s failed (%s); starting over", topic, exc)
            await asyncio.sleep(1)


async def _tail_once(
    settings: Settings,
    topic: str,
    apply: Callable[[bytes | None, bytes | None], None],
    caught_up: asyncio.Event | None,
) -> None:
    consumer = reader(settings)
    await consumer.start()
    try:
        partitions: set[int] = set()
        while not partitions:
            await consumer._client.force_metadata_update()  # no public API to refresh metadata
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                await asyncio.sleep(1)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps) if caught_up is not None else {}
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    apply(record.key, record.value)
            if (
                caught_up is not None
                and not caught_up.is_set()
                and all([await consumer.position(tp) >= end[tp] for tp in tps])
            ):
                caught_up.set()
    finally:
        await consumer.stop()
