"""Producing requests and reading results: ``Client`` (and ``SyncClient``) for Python services,
``Producer`` and ``ResultReader`` underneath, used by the CLI and the tests.

Results are read with manually assigned partitions rather than a consumer group: a reader that
only waits for its own answers needs no group, and so avoids a group join (20 s and more on
some brokers) and never steals partitions from other readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from tako_stream.core.models import (
    CORRELATION_HEADER,
    CancelRequest,
    ExecutionRequest,
    ExecutionResult,
)
from tako_stream.kafka.codec import dumps, loads, new_id
from tako_stream.kafka.topics import MAX_MESSAGE_BYTES, producer_options, reader
from tako_stream.settings import Settings

T = TypeVar("T")


class ResultReader:
    """Reads the results topic from its end (or beginning) on every partition, without a group."""

    def __init__(self, settings: Settings, *, from_beginning: bool = False) -> None:
        self._settings = settings
        self._from_beginning = from_beginning
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> ResultReader:
        self._consumer = await _assigned_reader(self._settings, from_beginning=self._from_beginning)
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
        self._kafka: AIOKafkaProducer | None = None

    @property
    def _producer(self) -> AIOKafkaProducer:
        if self._kafka is None:
            raise RuntimeError("Producer is not started (use 'async with')")
        return self._kafka

    async def __aenter__(self) -> Producer:
        # made here, not in __init__: aiokafka binds to the loop running when it is created
        self._kafka = AIOKafkaProducer(**producer_options(self._settings))
        await self._kafka.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._kafka is not None:
            await self._kafka.stop()
            self._kafka = None

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


class CancelRefused(Exception):
    """A finished job cannot be cancelled; ``result`` is how it ended."""

    def __init__(self, execution_id: str, result: ExecutionResult) -> None:
        super().__init__(f"job {execution_id} already finished ({result.status.value})")
        self.execution_id = execution_id
        self.result = result


class Client:
    """Submit jobs and get their results, for Python services (async; see ``SyncClient``).

    One background reader follows the results topic from the moment the client starts and
    hands each result to whoever waits for it, so many concurrent ``result()`` calls cost one
    consumer. A result that arrived before the client started is found by reading its key's
    partition from the beginning: results are keyed by execution id on a compacted topic.
    """

    def __init__(
        self, settings: Settings | None = None, *, keep: int = 10_000, history: bool = False
    ) -> None:
        self.settings = settings or Settings()
        self._history = history
        self._producer = Producer(self.settings)
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[str, list[asyncio.Future[ExecutionResult]]] = {}
        self._subscribers: set[asyncio.Queue[ExecutionResult]] = set()
        self._recent: dict[str, ExecutionResult] = {}  # insertion-ordered, capped at ``keep``
        self._keep = keep

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self._producer.__aenter__()
        try:
            self._consumer = await _assigned_reader(self.settings, from_beginning=self._history)
        except BaseException:
            await self._producer.__aexit__()
            raise
        self._reader = asyncio.create_task(self._follow(self._consumer), name="tako-client-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._consumer is not None:
            await self._consumer.stop()
        await self._producer.__aexit__()

    async def submit(
        self,
        code: str,
        input_data: Mapping[str, Any] | None = None,
        *,
        execution_id: str | None = None,
        correlation_id: str | None = None,
        **fields: Any,
    ) -> str:
        """Validate and produce one request; returns its execution id.

        ``fields`` are the request's other fields (``timeout``, ``job_type``, ``memory_limit``,
        ``reply_to``, ``metadata``). An invalid request raises ``pydantic.ValidationError``
        here rather than coming back as an ``invalid_request`` result.
        """
        request = ExecutionRequest.model_validate(
            {
                "code": code,
                "input_data": dict(input_data or {}),
                "execution_id": execution_id or new_id(),
                **fields,
            }
        )
        body = request.model_dump(mode="json", exclude_none=True)
        return await self._producer.submit(body, correlation_id=correlation_id)

    async def result(self, execution_id: str, timeout: float | None = None) -> ExecutionResult:
        """The result of a job, waiting up to ``timeout`` seconds (forever when None).

        Raises ``TimeoutError`` when it has not arrived in time.
        """
        if execution_id in self._recent:
            return self._recent[execution_id]
        future: asyncio.Future[ExecutionResult] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(execution_id, []).append(future)
        try:
            async with asyncio.timeout(timeout):
                earlier = await self._lookup(execution_id)
                if earlier is not None:
                    return earlier
                return await asyncio.shield(future)
        finally:
            waiting = self._waiters.get(execution_id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiters.pop(execution_id, None)

    async def run(
        self,
        code: str,
        input_data: Mapping[str, Any] | None = None,
        *,
        wait: float | None = None,
        **fields: Any,
    ) -> ExecutionResult:
        """Submit and wait for the result (``wait`` seconds at most)."""
        execution_id = await self.submit(code, input_data, **fields)
        return await self.result(execution_id, timeout=wait)

    async def cancel(
        self,
        execution_id: str,
        *,
        reason: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        """Cancel a queued or running job: its result will say ``cancelled``.

        Raises ``CancelRefused`` (holding the result) when the job has already finished.  A
        job that finishes while the cancel is on its way keeps its own result.
        """
        finished = self._recent.get(execution_id) or await self._lookup(execution_id)
        if finished is not None:
            raise CancelRefused(execution_id, finished)
        corr = correlation_id or new_id()
        message = CancelRequest(
            execution_id=execution_id,
            requested_at=datetime.now(UTC),
            reason=reason,
            correlation_id=corr,
        )
        await self._producer.send_raw(
            dumps(message),
            key=execution_id.encode(),
            headers=[(CORRELATION_HEADER, corr.encode())],
            topic=self.settings.control_topic,
        )

    async def results(self) -> AsyncIterator[ExecutionResult]:
        """Every result published from now on, by any worker, for any producer."""
        queue: asyncio.Queue[ExecutionResult] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    result = _parse_result(record.value)
                    if result is not None:
                        self._deliver(result)

    def _deliver(self, result: ExecutionResult) -> None:
        self._recent.pop(result.execution_id, None)
        self._recent[result.execution_id] = result
        while len(self._recent) > self._keep:
            del self._recent[next(iter(self._recent))]
        for future in self._waiters.get(result.execution_id, []):
            if not future.done():
                future.set_result(result)
        for queue in self._subscribers:
            queue.put_nowait(result)

    async def _lookup(self, execution_id: str) -> ExecutionResult | None:
        """Its latest result already on the topic, read from its key's partition."""
        record = await latest_record(self.settings, self.settings.results_topic, execution_id)
        return _parse_result(record.value) if record is not None else None

    def seen(self) -> list[ExecutionResult]:
        """The results this client has read, oldest first (at most ``keep``)."""
        return list(self._recent.values())


async def latest_record(
    settings: Settings, topic: str, key: str
) -> ConsumerRecord[Any, Any] | None:
    """The last record with ``key`` on ``topic`` now, reading only the partition the default
    partitioner puts that key in (how every tako-stream producer keys its messages)."""
    consumer = reader(settings, fetch_max_bytes=2 * MAX_MESSAGE_BYTES)
    await consumer.start()
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = sorted(consumer.partitions_for_topic(topic) or ())
        if not partitions:
            return None
        wanted = key.encode()
        tp = TopicPartition(topic, DefaultPartitioner()(wanted, partitions, partitions))
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await consumer.seek_to_beginning(tp)
        found: ConsumerRecord[Any, Any] | None = None
        idle = 0
        while idle < 4 and await consumer.position(tp) < end:  # idle: a compacted tail
            batches = await consumer.getmany(tp, timeout_ms=500)
            idle = 0 if batches else idle + 1
            for records in batches.values():
                for record in records:
                    if record.key == wanted and record.offset < end:
                        found = record
        return found
    finally:
        await consumer.stop()


def _parse_result(raw: bytes | None) -> ExecutionResult | None:
    try:
        return ExecutionResult.model_validate(loads(raw or b""))
    except ValueError:
        return None


async def _assigned_reader(settings: Settings, *, from_beginning: bool) -> AIOKafkaConsumer:
    """A started group-less consumer assigned every partition of the results topic."""
    consumer = reader(
        settings,
        fetch_max_bytes=2 * MAX_MESSAGE_BYTES,
        fetch_max_wait_ms=settings.kafka_fetch_wait_ms,
    )
    await consumer.start()
    topic = settings.results_topic
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
    if from_beginning:
        await consumer.seek_to_beginning(*tps)
    else:
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve positions now, so results produced from here on are seen
            await consumer.position(tp)
    return consumer


class SyncClient:
    """``Client`` for code without an event loop: each call runs on a private loop thread.

    ::

        with SyncClient() as tako:
            result = tako.run("print(2 + 2)", wait=30)
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        try:
            self._client = self._call(self._started(settings))
        except BaseException:
            self._stop_loop()
            raise
        self.settings = self._client.settings

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._call(self._client.close())
        finally:
            self._stop_loop()

    def submit(self, code: str, input_data: Mapping[str, Any] | None = None, **fields: Any) -> str:
        return self._call(self._client.submit(code, input_data, **fields))

    def result(self, execution_id: str, timeout: float | None = None) -> ExecutionResult:
        return self._call(self._client.result(execution_id, timeout))

    def run(
        self, code: str, input_data: Mapping[str, Any] | None = None, **fields: Any
    ) -> ExecutionResult:
        return self._call(self._client.run(code, input_data, **fields))

    def cancel(self, execution_id: str, *, reason: str | None = None) -> None:
        self._call(self._client.cancel(execution_id, reason=reason))

    @staticmethod
    async def _started(settings: Settings | None) -> Client:
        client = Client(settings)  # made on the loop thread: aiokafka binds to the running loop
        await client.start()
        return client

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()
