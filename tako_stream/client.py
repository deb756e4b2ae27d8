"""Producing requests and reading results: ``Client`` (and ``SyncClient``) for Python services,
``Producer`` and ``ResultReader`` underneath, used by the CLI and the tests.

Results are read with manually assigned partitions rather than a consumer group: a reader that
only waits for its own answers needs no group, and so avoids a group join (20 s and more on
some brokers) and never steals partitions from other readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from tako_stream.core.errors import BrokerError, CancelRefused
from tako_stream.core.models import (
    CORRELATION_HEADER,
    CancelRequest,
    ExecutionRequest,
    ExecutionResult,
)
from tako_stream.kafka.clients import producer_options
from tako_stream.kafka.codec import dumps, encodes, loads, new_id
from tako_stream.kafka.reader import TopicReader, latest
from tako_stream.kafka.view import KeyedView
from tako_stream.kafka.waiters import Waiters
from tako_stream.logs import Condition
from tako_stream.settings import Settings

T = TypeVar("T")

log = logging.getLogger(__name__)


class ResultReader:
    """Reads the results topic from its end (or beginning) on every partition, without a group."""

    def __init__(self, settings: Settings, *, from_beginning: bool = False) -> None:
        self._from_beginning = from_beginning
        self._reader = results_reader(settings)

    async def __aenter__(self) -> ResultReader:
        await self._reader.start()
        await (self._reader.from_beginning() if self._from_beginning else self._reader.from_end())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._reader.stop()

    async def __aiter__(self) -> AsyncIterator[tuple[ExecutionResult | None, bytes]]:
        while True:
            for record in await self._reader.fetch(timeout=0.5):
                raw = record.value or b""
                yield _parse_result(raw), raw

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
    ) -> RecordMetadata:
        """Send bytes as they are (replays, tests of malformed messages); where they landed."""
        meta: RecordMetadata = await self._producer.send_and_wait(
            topic or self._settings.requests_topic, value=value, key=key, headers=headers or []
        )
        return meta


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
        self._results = results_reader(self.settings)
        self._follower: asyncio.Task[None] | None = None
        self._waiters: Waiters[ExecutionResult] = Waiters()
        self._subscribers: set[asyncio.Queue[ExecutionResult]] = set()
        self._recent: KeyedView[ExecutionResult] = KeyedView(
            _result, keep=keep, name="results", key_of=lambda result: result.execution_id
        )

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self._producer.__aenter__()
        try:
            await self._results.start()
            reader = self._results
            await (reader.from_beginning() if self._history else reader.from_end())
        except BaseException:
            await self._results.stop()
            await self._producer.__aexit__()
            raise
        self._follower = asyncio.create_task(self._follow(), name="tako-client-reader")

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            # A follower that had stopped on an error told its waiters (BrokerError) already.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._follower
        await self._results.stop()
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
        known = self._recent.get(execution_id)
        if known is not None:
            return known
        with self._waiters.waiting(execution_id) as future:
            async with asyncio.timeout(timeout):
                # The lookup reads the key's partition of a topic that keeps every result, and
                # takes longer the more it holds: raced with the follower, which may bring the
                # answer first (once, the lookup outlasted the timeout of a result already in).
                lookup = asyncio.ensure_future(self._lookup(execution_id))
                try:
                    first: set[asyncio.Future[Any]] = {lookup, future}
                    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
                    if not future.done():
                        earlier = lookup.result()
                        if earlier is not None:
                            return earlier
                    return await self._arrival(future)
                finally:
                    if not lookup.done():
                        lookup.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await lookup

    async def run(
        self,
        code: str,
        input_data: Mapping[str, Any] | None = None,
        *,
        wait: float | None = None,
        **fields: Any,
    ) -> ExecutionResult:
        """Submit and wait for its result (``wait`` seconds at most): the one this submission
        gets, never an earlier result of the same ``execution_id``."""
        execution_id = fields.pop("execution_id", None) or new_id()
        # Waiting before the submit: a fast answer read meanwhile still wakes it.
        with self._waiters.waiting(execution_id) as future:
            await self.submit(code, input_data, execution_id=execution_id, **fields)
            async with asyncio.timeout(wait):
                return await self._arrival(future)

    async def _arrival(self, future: asyncio.Future[ExecutionResult]) -> ExecutionResult:
        """The result the follower wakes ``future`` with; ``BrokerError`` if the follower has
        stopped (a wait without a timeout would otherwise never end)."""
        follower = self._follower
        if follower is None:
            raise RuntimeError("the client is not started (use 'async with Client(...)')")
        either: set[asyncio.Future[Any]] = {future, follower}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if future.done():
            return future.result()
        reason = None if follower.cancelled() else follower.exception()
        raise BrokerError(f"the client's reader of the results topic has stopped ({reason!r})")

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
        await self.request_cancel(execution_id, reason=reason, correlation_id=correlation_id)

    async def request_cancel(
        self, execution_id: str, *, reason: str | None = None, correlation_id: str | None = None
    ) -> None:
        """Put a cancel on the control topic, whatever the job's state."""
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

    async def send_raw(
        self,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        topic: str | None = None,
    ) -> None:
        """Produce bytes as they are (to the requests topic unless ``topic`` is given)."""
        await self._producer.send_raw(value, key=key, headers=headers, topic=topic)

    def known(self, execution_id: str) -> ExecutionResult | None:
        """The result of a job if this client has read it (and not forgotten it yet)."""
        return self._recent.get(execution_id)

    async def _follow(self) -> None:
        """Read every result from where the client started, forever: a broker fault is
        retried every second (the consumer keeps its positions), never ends the reading."""
        failing = Condition("reading the results topic (retrying every second)", log)
        while True:
            try:
                records = await self._results.fetch(timeout=0.5)
            except (KafkaError, OSError) as exc:
                failing.wrong(exc)
                await asyncio.sleep(1)
                continue
            failing.right()
            for record in records:
                result = self._recent.apply(record.key, record.value)
                if result is not None:
                    self._deliver(result)

    def _deliver(self, result: ExecutionResult) -> None:
        self._waiters.wake(result.execution_id, result)
        for queue in self._subscribers:
            queue.put_nowait(result)

    async def _lookup(self, execution_id: str) -> ExecutionResult | None:
        """Its latest result already on the topic, read from its key's partition."""
        record = await latest(self.settings, self.settings.results_topic, execution_id)
        if record is None:
            return None
        # Kept like a followed one: the next question about this job (a cancel after a wait,
        # say) must not depend on a second read of the topic finishing in time.
        return self._recent.apply(record.key, record.value)

    def seen(self) -> list[ExecutionResult]:
        """The results this client has read, oldest first (at most ``keep``)."""
        return self._recent.values()

    @property
    def known_count(self) -> int:
        """How many results this client holds."""
        return len(self._recent)


def _parse_result(raw: bytes | None) -> ExecutionResult | None:
    try:
        return _result(raw or b"")
    except ValueError:
        return None


def _result(raw: bytes) -> ExecutionResult:
    """A result from the topic; ValueError for a record that is none of ours.  Anyone may write
    there: orjson reads values nested up to 1024 deep, but it and pydantic's ``model_dump``
    write at most about 254 levels, so an output or metadata nested deeper (which no worker
    publishes) failed whoever wrote the result again: ``tako-stream results`` or ``submit
    --wait`` printing it, say."""
    result = ExecutionResult.model_validate(loads(raw))
    if not encodes([result.output, result.metadata]):  # one level down, as in a result
        raise ValueError("a result whose output or metadata cannot be written again")
    return result


def results_reader(settings: Settings) -> TopicReader:
    """Every partition of the results topic, which may take a moment to appear once created."""
    return TopicReader(settings, settings.results_topic, wait_for_topic=5.0)


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
