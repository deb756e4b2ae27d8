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
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from tako_stream.core.errors import BrokerError
from tako_stream.settings import Settings

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
_UNKNOWN_TOPIC = 3  # Kafka's UNKNOWN_TOPIC_OR_PARTITION error code


def topic_specs(settings: Settings) -> list[NewTopic]:
    common = {"max.message.bytes": str(settings.kafka_max_message_bytes)}
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
        # Keyed by dlq_id, deleted by tombstones: compacted, and never expired (a dead letter
        # and its replay bytes stay until an operator deletes or replays it).
        NewTopic(
            settings.dlq_topic,
            settings.topic_partitions,
            settings.topic_replication,
            topic_configs={**common, "cleanup.policy": "compact", "retention.ms": "-1"},
        ),
        # Read whole by every worker and gateway: compacted per job, and kept a week (a cancel
        # for a request still queued after that is moot), a day for running states.
        NewTopic(
            settings.control_topic,
            settings.topic_partitions,
            settings.topic_replication,
            topic_configs={"cleanup.policy": "compact,delete", "retention.ms": str(7 * DAY_MS)},
        ),
        # Keyed by execution_id/name and compacted, like the results: a re-run's artifact
        # replaces the earlier one of the same name.
        NewTopic(
            settings.artifacts_topic,
            settings.topic_partitions,
            settings.topic_replication,
            topic_configs={**common, "cleanup.policy": "compact"},
        ),
        NewTopic(
            settings.status_topic,
            settings.topic_partitions,
            settings.topic_replication,
            topic_configs={"cleanup.policy": "compact,delete", "retention.ms": str(DAY_MS)},
        ),
        # One report per worker, read whole by the gateways: a few records, one partition.
        NewTopic(
            settings.workers_topic,
            1,
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


class TopicDirectory:
    """Which topics exist, as the broker's metadata says, cached for ``ttl`` seconds.

    A name not in the cache triggers a refresh at most every ``miss_refresh`` seconds, so a
    topic created a moment ago is found, yet a flood of requests naming missing topics costs
    one metadata request every few seconds, not one each.
    """

    def __init__(self, settings: Settings, *, ttl: float = 30.0, miss_refresh: float = 5.0) -> None:
        self.settings = settings
        self.ttl = ttl
        self.miss_refresh = miss_refresh
        self._names: frozenset[str] = frozenset()
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def exists(self, topic: str) -> bool:
        age = time.monotonic() - self._fetched_at
        if age > self.ttl or (topic not in self._names and age > self.miss_refresh):
            await self._refresh()
        return topic in self._names

    async def _refresh(self) -> None:
        """``BrokerError`` when the broker did not answer (the cache is kept as it was)."""
        async with self._lock:
            if time.monotonic() - self._fetched_at < 0.5:
                return  # another caller refreshed while this one waited
            admin = _admin(self.settings)
            try:
                async with asyncio.timeout(10):
                    await admin.start()
                    self._names = frozenset(await admin.list_topics())
            except (KafkaError, OSError) as exc:  # OSError covers TimeoutError
                raise BrokerError(f"listing topics failed: {exc!r}") from exc
            finally:
                await admin.close()
            self._fetched_at = time.monotonic()
