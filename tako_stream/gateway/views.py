"""What the gateway knows of the cluster, all of it read from topics into its local store.

One group-less reader follows the results, status, requests and DLQ topics and applies every
batch to the store (``gateway.store``) in the store's writer thread; the breakers come from
their table's changelog.  Each gateway has its own store, so any number run side by side.

The store resumes from the positions it saved, so a restart reads only what is new.  Until it
has read up to the end offsets seen when it started, the gateway is not ready: requests that
need the store wait for it a little, then answer 503, never a wrong 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from tako_stream.client import Producer
from tako_stream.core.errors import BrokerError
from tako_stream.core.models import ExecutionResult
from tako_stream.gateway.store import Job, Request, Store, fingerprint
from tako_stream.gateway.workers import WorkerReports
from tako_stream.kafka.codec import encodes
from tako_stream.kafka.reader import EndOffsets, TopicReader, read_record, tail
from tako_stream.kafka.topics import TopicDirectory, ensure_topics, partitions
from tako_stream.kafka.waiters import Waiters
from tako_stream.logs import Condition
from tako_stream.settings import Settings
from tako_stream.worker.breaker.shared import BreakerStates

log = logging.getLogger(__name__)

T = TypeVar("T")
V = TypeVar("V")
State = Literal["done", "running", "queued", "unknown"]

#: Seconds the broker has to answer a health check.
BROKER_CHECK = 5.0
#: Reader threads for the store: lookups of concurrent HTTP requests run side by side.
READERS = 4
#: Threads for the batches of pages (``gateway.pages``), apart from ``READERS``: a batch is up
#: to a MiB validated and encoded (~50 ms holding the GIL), and in the readers' pool a few
#: concurrent pages left every lookup and ``/health`` queued behind them.  Two: pages go on
#: side by side while one is read, and never take more than two cores' worth of the process.
PAGE_READERS = 2
#: Pages in flight at once, streamed ones until their last byte: each holds a batch (1-2 MiB
#: with its items) for as long as its client takes it, so this bounds what pages hold together.
PAGES = 8
#: Seconds a page waits for one of the ``PAGES`` slots before it is answered 503 (with a
#: Retry-After of as many seconds): a client is told to come back rather than kept waiting.
PAGE_WAIT = 5.0


def servable(body: bytes) -> ExecutionResult | None:
    """The stored result ``body``, or None when it is no result this gateway can serve.

    Anyone may write to the results topic, and the store keeps any record with a status and a
    finish time.  One that fails the model (a number past 64 bits, a correlation id longer than
    a request's) or whose ``output`` or ``metadata`` orjson cannot write (an integer past 64
    bits: those fields are the job's and the caller's JSON, typed ``Any``) was written by no
    worker: the publisher answers such an output with ``invalid_output`` instead.  It is
    treated as no result at all, as ``/executions`` leaves it out of its pages: serving it with
    the field replaced would hand a Tako VM client an output (or metadata) the job never
    returned, indistinguishable from a real one (``null`` is a valid output), and a 500 would
    fail every reader of the job.  The job stays pending until a result of ours replaces it
    (the topic is keyed by execution id)."""
    try:
        result = ExecutionResult.model_validate_json(body)
    except ValueError:  # pydantic's ValidationError is a ValueError
        log.debug("a stored result that is no result of ours is not served", exc_info=True)
        return None
    if not encodes([result.output, result.metadata]):
        log.debug("a stored result whose output or metadata cannot be written is not served")
        return None
    return result


class NotReady(Exception):
    """The store has not caught up with the topics yet: answer 503, not a wrong 404."""


class Busy(NotReady):
    """As many pages as the gateway serves at once are in flight: answer 503 with a
    Retry-After of ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PageSlots:
    """A bound on pages in flight (``PAGES``), each held from before its rows are picked until
    its last byte is written or it is dropped."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.taken = 0
        self._free = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def slot(self, wait: float) -> AsyncIterator[None]:
        """A slot for one page, waited for at most ``wait`` seconds (``Busy`` past it: raised
        before the page has sent anything, so it is still a status)."""
        try:
            async with asyncio.timeout(wait):
                await self._free.acquire()
        except TimeoutError:
            raise Busy(
                f"the gateway is serving {self.size} pages already: try again shortly",
                retry_after=max(1, math.ceil(wait)),
            ) from None
        self.taken += 1
        try:
            yield
        finally:
            self.taken -= 1
            self._free.release()


def store_path(settings: Settings) -> Path:
    """The store's file: one per cluster and results topic, in the gateway's state directory."""
    cluster = hashlib.sha256(
        f"{settings.kafka_bootstrap_servers}|{settings.results_topic}".encode()
    ).hexdigest()[:16]
    return settings.gateway_state_dir / f"gateway-{cluster}.sqlite3"


class ClusterView:
    """The store and what keeps it current; results can be waited for."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(store_path(settings), cache_mb=settings.gateway_cache_mb)
        self.producer = Producer(settings)
        self.breakers = BreakerStates(settings.breaker)
        self.workers = WorkerReports()
        self.topics = TopicDirectory(settings)
        self.broker = Condition("the Kafka broker is unreachable", log)
        self.ready = asyncio.Event()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tako-store-writer")
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="tako-store-reader")
        # Their own threads, so lookups never queue behind pages (each thread has its own
        # connection to the store, as every reader's: ``Store._db``).
        self._page_readers = ThreadPoolExecutor(PAGE_READERS, thread_name_prefix="tako-store-pages")
        self.page_slots = PageSlots(PAGES)
        self._waiters: Waiters[None] = Waiters()
        #: Records read from the topics since this process started (a restart reads only the
        #: new ones).
        self.records_read = 0
        #: Entries in the DLQ, counted after each batch that touched it (the gauge cannot wait).
        self.dlq_size = 0
        #: Per partition, the next offset whose record is not in the store yet: what a catch-up
        #: round compares with the end offsets (the reader's own position runs ahead of it while
        #: a fetched batch is being written).
        self._applied: dict[TopicPartition, int] = {}
        #: The partitions being read into the store, while they are (None otherwise).
        self._reading: list[TopicPartition] | None = None
        self._end_offsets = EndOffsets(settings)
        self._advanced = asyncio.Event()  # set (and replaced) each time ``_applied`` moves
        #: The catch-up round still taking callers (its question to the broker not asked yet).
        self._open_round: asyncio.Future[Exception | None] | None = None
        self._round_tasks: set[asyncio.Task[None]] = set()
        self._asking = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        #: The materialiser stopped on something no handler expected (a bug of ours, a record
        #: nothing foresaw): over once the store has caught up again.
        self._broken = Condition(
            "the gateway's store is not kept current (starting over every second)", log
        )

    async def start(self) -> None:
        s = self.settings
        await ensure_topics(s)
        await self.producer.__aenter__()
        self._tasks = [
            asyncio.create_task(self._materialise()),
            asyncio.create_task(tail(s, s.breaker_changelog_topic, self.breakers.apply)),
            asyncio.create_task(tail(s, s.workers_topic, self.workers.apply)),
        ]

    async def stop(self) -> None:
        for task in [*self._tasks, *self._round_tasks]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.producer.__aexit__()
        await self._end_offsets.stop()
        await asyncio.get_running_loop().run_in_executor(self._writer, self.store.close)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._page_readers.shutdown(wait=True)

    # -- keeping the store current --------------------------------------------------------------

    async def _materialise(self) -> None:
        """Follow the four topics into the store forever; a broker fault starts over from the
        stored positions, and so does any other failure, with readiness to be earned anew."""
        failing = Condition("reading the topics into the gateway's store", log)
        ends: dict[TopicPartition, int] | None = None
        while True:
            try:
                ends = await self._follow(failing, ends)
            except (KafkaError, LookupError, OSError) as exc:
                failing.wrong(exc)
                await asyncio.sleep(1)
            except Exception as exc:
                # Ending here would leave the gateway ready but its store never current again
                # (submits waiting out their read-back, lookups of new ids 503).  Not ready
                # until it has read up to the end offsets of its next start; the traceback
                # once, not once a second if it fails the same way each time.
                if self._broken.ok:
                    log.exception("reading the topics into the gateway's store failed")
                self._broken.wrong(repr(exc))
                self.ready.clear()
                ends = None
                await asyncio.sleep(1)

    async def _follow(
        self, failing: Condition, ends: dict[TopicPartition, int] | None
    ) -> dict[TopicPartition, int] | None:
        """Read until a fault (raised) or a reset (None: start over, readiness anew)."""
        s = self.settings
        topics = (s.results_topic, s.status_topic, s.requests_topic, s.dlq_topic)
        tps = [tp for topic in topics for tp in await partitions(s, topic, wait=5)]
        if not tps:
            raise LookupError("the service's topics do not exist yet")
        last = await self._write(self.store.last_records)
        async with TopicReader(s, s.results_topic, only=tps) as reader:
            failing.right()
            now = await reader.end_offsets()
            if any(now.get(TopicPartition(*key), 0) == 0 for key in last):
                await self._reset("a topic the store had read is empty now")
                last, ends = {}, None
            # Each partition again from its last record read, to check it is still there.
            checks = {TopicPartition(*key): seen for key, seen in last.items()}
            await reader.from_offsets({tp: checks[tp][0] if tp in checks else 0 for tp in tps})
            if ends is None:  # readiness: the end offsets seen at the first start
                ends = now
            self.dlq_size = await self._write(self.store.dead_letter_total)
            self._reading = tps
            try:
                await self._read_on(reader, tps, checks, ends)
            finally:
                self._reading = None
            return None

    async def _read_on(
        self,
        reader: TopicReader,
        tps: list[TopicPartition],
        checks: dict[TopicPartition, tuple[int, str]],
        ends: dict[TopicPartition, int],
    ) -> None:
        """Apply batch after batch; return on a reset (the topics were recreated)."""
        s = self.settings
        while True:
            if not self.ready.is_set() and await reader.reached(ends):
                log.info("the store has caught up with the topics: ready")
                self.ready.set()
                self._broken.right()
            records = await reader.fetch(timeout=1.0)
            for record in records:
                check = checks.pop(TopicPartition(record.topic, record.partition), None)
                if check is not None and check != (record.offset, fingerprint(record)):
                    await self._reset(f"{record.topic}[{record.partition}] was recreated")
                    return None
            if records:
                answered = await self._write(self.store.apply, records, s.topics)
                self.records_read += len(records)
                if any(record.topic == s.dlq_topic for record in records):
                    self.dlq_size = await self._write(self.store.dead_letter_total)
                self._wake(answered)
            # Everything fetched so far is written: the reader's positions are applied ones.
            self._applied = {tp: await reader.position(tp) for tp in tps}
            self._advanced.set()
            self._advanced = asyncio.Event()

    async def _reset(self, why: str) -> None:
        log.warning("the gateway's store is out of date (%s): reading the topics again", why)
        self.ready.clear()
        await self._write(self.store.reset)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    async def _page_read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._page_readers, fn, *args)

    def _wake(self, answered: list[str]) -> None:
        for execution_id in answered:
            self._waiters.wake(execution_id, None)  # the waiter reads its result from the store

    # -- reading --------------------------------------------------------------------------------

    async def until_ready(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the store to catch up; ``NotReady`` otherwise."""
        if self.ready.is_set():
            return
        try:
            async with asyncio.timeout(timeout):
                await self.ready.wait()
        except TimeoutError:
            raise NotReady("the gateway is still reading the topics into its store") from None

    async def job(self, execution_id: str) -> Job:
        await self.until_ready(self.settings.gateway_ready_wait)
        return await self._read(self.store.job, execution_id)

    async def request(self, execution_id: str) -> Request | None:
        """The first request record for ``execution_id`` (the job's, for an idempotency key)."""
        await self.until_ready(self.settings.gateway_ready_wait)
        return await self._read(self.store.request, execution_id)

    async def caught_up(self, timeout: float) -> None:
        """Until the store holds every record on the topics as of this call (one produced by
        anyone before it, say); ``NotReady`` after ``timeout``.

        Callers share rounds, as in a group commit: one question about the end offsets is in
        flight at a time, and the callers that come meanwhile form the next round, asked as soon
        as the current one is answered.  Every caller's round is asked after it came, and any
        number of concurrent callers cost at most two questions' time (the embedded broker
        takes longer to answer the more records it holds; parallel questions only queue).
        """
        round_ = self._open_round
        if round_ is None:
            round_ = self._open_round = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._catch_up_round(round_, timeout))
            self._round_tasks.add(task)
            task.add_done_callback(self._round_tasks.discard)
        try:
            async with asyncio.timeout(timeout):
                failed = await asyncio.shield(round_)
        except TimeoutError:
            raise NotReady("the gateway's store is behind the topics") from None
        if failed is not None:
            raise NotReady(f"the gateway cannot tell where the topics end now ({failed})")

    async def _catch_up_round(self, done: asyncio.Future[Exception | None], timeout: float) -> None:
        """One round: its outcome is handed over as a value, so no exception goes unread."""
        outcome: Exception | None = RuntimeError("the gateway is stopping")
        try:
            async with asyncio.timeout(timeout):
                async with self._asking:  # the previous round's question answered
                    self._open_round = None  # from here on, newcomers need a later round
                    if self._reading is None:
                        raise LookupError("the topics are not being read now")
                    ends = await self._end_offsets(self._reading)
                while any(self._applied.get(tp, 0) < end for tp, end in ends.items()):
                    await self._advanced.wait()
            outcome = None
        except (TimeoutError, KafkaError, LookupError, OSError) as exc:
            outcome = exc
        finally:
            if self._open_round is done:
                self._open_round = None
            if not done.done():
                done.set_result(outcome)

    async def find(self, execution_id: str) -> tuple[State, ExecutionResult | None, Job]:
        """("done", result), ("running" | "queued", None) or ("unknown", None), and the row.

        An id the store does not know is looked up again once the store holds everything on
        the topics now: a job produced a moment ago by another client is not a wrong 404.
        A stored result that cannot be served (``servable``) counts as none.
        """
        job = await self.job(execution_id)
        if job.result is None and job.running is None and job.request is None:
            await self.caught_up(self.settings.gateway_ready_wait)
            job = await self._read(self.store.job, execution_id)
        result = servable(job.result) if job.result is not None else None
        if result is not None:
            return "done", result, job
        if job.running is not None:
            return "running", None, job
        return ("queued" if job.request is not None else "unknown"), None, job

    async def result(self, execution_id: str, timeout: float) -> ExecutionResult:
        """The job's result, waiting up to ``timeout`` seconds; ``TimeoutError`` after."""
        async with asyncio.timeout(timeout):
            while True:
                with self._waiters.waiting(execution_id) as stored:
                    _, result, _ = await self.find(execution_id)
                    if result is not None:
                        return result
                    await stored  # then read from the store

    async def page_rows(
        self, rows: Callable[[Store], tuple[int, list[int]]]
    ) -> tuple[int, list[int]]:
        """A page's total and row ids, as ``rows`` reads them from the store (one of its
        ``*_rows`` methods), once the store has caught up (in a page thread: a count over a
        large table is no lookup's wait either)."""
        await self.until_ready(self.settings.gateway_ready_wait)
        return await self._page_read(rows, self.store)

    async def page_items(
        self,
        read: Callable[[Store, Sequence[int]], list[V | None]],
        rowids: Sequence[int],
        item: Callable[[V], bytes | None],
    ) -> tuple[int, list[bytes]]:
        """(how many of ``rowids`` were read, their items): the stored values ``read`` gets
        for the first of ``rowids`` (a batch of them), each made its item's JSON by ``item``
        (None: a value no item can be made of, left out) in the same page thread
        (``PAGE_READERS``), never on the event loop nor in a lookup's thread; each value is let
        go as soon as its item is made."""

        def batch() -> tuple[int, list[bytes]]:
            values = read(self.store, rowids)
            items: list[bytes] = []
            for n, value in enumerate(values):
                values[n] = None
                encoded = item(value) if value is not None else None
                if encoded is not None:
                    items.append(encoded)
            return len(values), items

        return await self._page_read(batch)

    async def queue_position(self, execution_id: str) -> int | None:
        return await self._read(self.store.queue_position, execution_id)

    async def queue_counts(self) -> tuple[int, int]:
        """(jobs waiting, jobs running), as the store knows them now."""
        return await self._read(self.store.queue_counts)

    async def original_request(self, request: Request) -> dict[str, Any] | None:
        """The request record ``request`` points at, as produced (a JSON object), or None when
        the requests topic no longer holds it or it is not one."""
        tp = TopicPartition(self.settings.requests_topic, request.partition)
        try:
            record = await read_record(
                self.settings, tp, request.offset, timeout=self.settings.gateway_ready_wait
            )
        except (TimeoutError, KafkaError, OSError) as exc:
            raise NotReady(f"the requests topic did not hand the record over ({exc!r})") from exc
        if record is None or record.value is None:
            return None
        try:
            body = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            return None
        return body if isinstance(body, dict) else None

    async def known(self) -> int:
        return await self._read(self.store.known)

    async def dead_letter_stats(self) -> dict[str, Any]:
        """The seed's shape: ``{"total": N, "by_error_type": {type: n}}``."""
        counts = await self._read(self.store.dead_letter_counts)
        return {"total": sum(counts.values()), "by_error_type": counts}

    async def dead_letter(self, dlq_id: str) -> bytes | None:
        await self.until_ready(self.settings.gateway_ready_wait)
        return await self._read(self.store.dead_letter, dlq_id)

    async def wait_for_position(self, tp: TopicPartition, offset: int, timeout: float) -> None:
        """Until the store has read ``tp`` past ``offset`` (a record this gateway produced)."""
        async with asyncio.timeout(timeout):
            while self._applied.get(tp, 0) <= offset:
                await self._advanced.wait()

    # -- the rest -------------------------------------------------------------------------------

    async def reply_to_problem(self, topic: str | None) -> str | None:
        """Why a request's ``reply_to`` would be refused by the workers, or None (also when the
        broker cannot tell now: the workers check again)."""
        if topic is None or topic == self.settings.results_topic:
            return None
        problem = self.settings.reply_to.problem(topic)
        if problem is not None:
            return problem
        try:
            exists = await self.topics.exists(topic)
        except BrokerError:
            return None
        return None if exists else f"reply_to: topic {topic!r} does not exist"

    async def broker_available(self) -> bool:
        """Whether the broker answers a metadata request within ``BROKER_CHECK`` seconds
        (``broker.since`` says since when it has not)."""
        try:
            async with asyncio.timeout(BROKER_CHECK):
                await partitions(self.settings, self.settings.results_topic)
        except Exception as exc:
            self.broker.wrong(f"no answer to a metadata request ({exc!r})")
            return False
        self.broker.right()
        return True
