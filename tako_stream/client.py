"""Producing requests and reading results, for the CLI, the tests and other Python services.

Results are read with manually assigned partitions rather than a consumer group: a reader that
only waits for its own answers needs no group, and so avoids a group join (20 s and more on
some brokers) and never steals partitions from other readers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tako_stream.codec import dumps, loads, new_id
from tako_stream.kafka import FETCH_WAIT_MS, MAX_MESSAGE_BYTES, producer_options, reader
from tako_stream.models import CORRELATION_HEADER, ExecutionResult
from tako_stream.settings import Settings


class ResultReader:
    """Reads the results topic from its end (or beginning) on every partition, without a group."""

    def __init__(self, settings: Settings, *, from_beginning: bool = False) -> None:
        self._settings = settings
        self._from_beginning = from_beginning
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> ResultReader:
        consumer = reader(
            self._settings, fetch_max_bytes=2 * MAX_MESSAGE_BYTES, fetch_max_wait_ms=FETCH_WAIT_MS
        )
        await consumer.start()
        self._consumer = consumer
        topic = self._settings.results_topic
        partitions: set[int] | None = None
        for _ in range(50):  # a fresh topic's metadata may take a moment to appear
            partitions = consumer.partitions_for_topic(topic)
            if partitions:
                break
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        if not partitions:
            await consumer.stop()
            raise LookupError(f"topic {topic!r} does not exist (is a worker running?)")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        if self._from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
            for tp in tps:  # resolve positions now, so results produced from here on are seen
                await consumer.position(tp)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def __aiter__(self) -> AsyncIterator[tuple[ExecutionResult | None, bytes]]:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    raw = record.value or b""
                    try:
                        yield ExecutionResult.model_validate(loads(raw)), raw
                    except ValueError:
                        yield None, raw

    async def wait_for(self, execution_ids: set[str], seconds: float) -> dict[str, ExecutionResult]:
        """The first result of each id, until all arrived or the timeout passed."""
        found: dict[str, ExecutionResult] = {}

        async def collect() -> None:
            async for result, _ in self:
                if result is not None and result.execution_id in execution_ids:
                    found.setdefault(result.execution_id, result)
                    if len(found) == len(execution_ids):
                        return

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(collect(), seconds)
        return found


class Producer:
    """Produces execution requests (key = execution_id, correlation id in a header)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer = AIOKafkaProducer(**producer_options(settings))

    async def __aenter__(self) -> Producer:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def submit(
        self,
        request: Mapping[str, Any],
        *,
        correlation_id: str | None = None,
        topic: str | None = None,
    ) -> str:
        """Send a request (a dict as in the JSON schema); returns its execution id."""
        body = dict(request)
        body.setdefault("execution_id", new_id())
        headers = [(CORRELATION_HEADER, (correlation_id or new_id()).encode())]
        await self.send_raw(
            dumps(body), key=str(body["execution_id"]).encode(), headers=headers, topic=topic
        )
        return str(body["execution_id"])

    async def send_raw(
        self,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        topic: str | None = None,
    ) -> None:
        """Send bytes as they are: for replays, and for tests of malformed messages."""
        await self._producer.send_and_wait(
            topic or self._settings.requests_topic, value=value, key=key, headers=headers or []
        )
