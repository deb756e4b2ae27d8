"""The service's topics: how they are created, and what partitions one has.

Only standard Kafka admin APIs are used, so Apache Kafka, Redpanda and the embedded broker all
work; topics that exist already (made by an operator, say) are left as they are.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from tako_stream.kafka.clients import MAX_MESSAGE_BYTES
from tako_stream.settings import Settings

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
_UNKNOWN_TOPIC = 3  # Kafka's UNKNOWN_TOPIC_OR_PARTITION error code


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


def _admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"tako-admin-{settings.worker_id}",
    )


async def ensure_topics(settings: Settings, extra: list[NewTopic] | None = None) -> None:
    """Create the service's topics when missing; existing topics are left as they are."""
    admin = _admin(settings)
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


async def partitions(settings: Settings, topic: str, *, wait: float = 0.0) -> list[TopicPartition]:
    """The topic's partitions as the broker's metadata has them now; empty when the topic does
    not exist, after waiting up to ``wait`` seconds for it to appear (a topic just created may
    take a moment to show in the metadata of every broker)."""
    admin = _admin(settings)
    await admin.start()
    try:
        deadline = time.monotonic() + wait
        while True:
            found: list[int] = []
            for described in await admin.describe_topics([topic]):
                if described["topic"] == topic and described["error_code"] != _UNKNOWN_TOPIC:
                    found = [p["partition"] for p in described["partitions"]]
            if found or time.monotonic() >= deadline:
                return [TopicPartition(topic, p) for p in sorted(found)]
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
