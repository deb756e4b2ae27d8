"""The request stream: Kafka in, one result (and maybe a DLQ record) out, offsets committed last.

Why aiokafka here and not a faust agent: a faust agent that raises gets its message acked and
skipped, and with ``concurrency > 1`` faust may commit past an event still in flight (its issue
#606).  Jobs run concurrently and finish out of order, so this service keeps its own
``OffsetTracker`` and commits a partition's position only up to the lowest job not yet answered,
and only after the broker acknowledged the result and the DLQ record.  A worker killed at any
moment therefore loses nothing: uncommitted jobs are run again by whoever gets the partition
(at-least-once; results are keyed by ``execution_id`` so consumers can de-duplicate).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError, MessageSizeTooLargeError
from aiokafka.structs import OffsetAndMetadata
from mode import Service

from tako_stream.core.errors import ErrorType, InvalidRequestError, Status
from tako_stream.core.models import (
    CORRELATION_HEADER,
    DLQRecord,
    ErrorInfo,
    ExecutionRequest,
    ExecutionResult,
    JobStatus,
    SourcePosition,
)
from tako_stream.dlq import DEAD_LETTER_TYPES, build_record
from tako_stream.kafka.codec import correlation_id, decode_request, dumps, new_id
from tako_stream.kafka.records import install as tolerate_bad_header_keys
from tako_stream.kafka.topics import ensure_topics, producer_options
from tako_stream.logs import job_context
from tako_stream.settings import Settings
from tako_stream.worker.cancel import Cancellations
from tako_stream.worker.execute import Executor, now
from tako_stream.worker.offsets import OffsetTracker

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, intake: Intake) -> None:
        self._intake = intake

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._intake.partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class Intake(Service):
    """Consumes requests, runs them through the executor, publishes answers, commits."""

    def __init__(
        self,
        settings: Settings,
        executor: Executor,
        *,
        cancellations: Cancellations | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.executor = executor
        self.cancellations = cancellations or Cancellations()
        self._announcing: set[asyncio.Task[None]] = set()
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._jobs: dict[tuple[TopicPartition, int], asyncio.Task[None]] = {}
        # Jobs accepted but unanswered; a little above the pool size so the next job is already
        # decoded when a container slot frees up, without hoarding a partition's backlog.
        self._capacity = asyncio.Semaphore(settings.pool_size * 2)
        #: Rejections in flight (no container, just an answer to publish).
        self._light = asyncio.Semaphore(256)
        self._generation = 0
        self._accepting = True
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self.answered = 0
        #: Told of each answer once the broker has it, with seconds since the request was produced.
        self.on_answered: Callable[[ExecutionResult, float | None], None] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    @property
    def assigned(self) -> bool:
        return bool(self._consumer and self._consumer.assignment())

    async def on_start(self) -> None:
        s = self.settings
        await ensure_topics(s)
        self._producer = AIOKafkaProducer(**producer_options(s))
        await self._producer.start()
        tolerate_bad_header_keys()  # a header key that is not UTF-8 must not stop the stream
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            group_id=s.consumer_group,
            client_id=f"tako-intake-{s.worker_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # A worker that waits on a full pool does not poll; heartbeats go on regardless.
            max_poll_interval_ms=int((300 + s.timeout_grace) * 2 * 1000),
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            # Short fetch waits by default: a request must not sit on the broker for the default
            # 500 ms (the embedded broker holds a fetch for the whole wait even once data arrives).
            fetch_max_wait_ms=s.kafka_fetch_wait_ms,
            fetch_max_bytes=16 * 1024 * 1024,
        )
        self._consumer.subscribe([s.requests_topic], listener=_Rebalance(self))
        await self._consumer.start()
        self._loop_task = asyncio.ensure_future(self._consume())
        self.add_future(self._commit_every(s.commit_interval))

    async def on_stop(self) -> None:
        """Stop taking jobs, let running ones finish within the grace period, commit, close."""
        self._accepting = False
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await self._settle(set(self._jobs), self.settings.shutdown_grace)
        await self._commit()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        await self.executor.pool.sandbox.drain()

    async def _consume(self) -> None:
        assert self._consumer is not None
        while self._accepting:
            try:
                batches = await self._consumer.getmany(timeout_ms=500, max_records=100)
            except KafkaError as exc:  # the broker away or a rebalance fault: keep trying
                log.warning("fetching requests failed (%s); retrying", exc)
                await asyncio.sleep(1)
                continue
            generation = self._generation
            for tp, records in batches.items():
                for record in records:
                    # Decoding is cheap and tells whether the record needs a container: those
                    # that do wait for capacity; rejections only need the producer, so a burst
                    # of bad messages is answered fast and never queues behind running jobs.
                    try:
                        decoded: ExecutionRequest | InvalidRequestError = decode_request(
                            record.value, record.key
                        )
                    except InvalidRequestError as exc:
                        decoded = exc
                    except Exception as exc:  # a decoder bug must not stop the stream
                        log.exception("unexpected error decoding a request")
                        decoded = InvalidRequestError([f"request: cannot be decoded ({exc!r})"])
                    limit = (
                        self._light if isinstance(decoded, InvalidRequestError) else self._capacity
                    )
                    await limit.acquire()
                    # A rebalance while we waited may have taken the partition (or reset its
                    # position): leave the record to whoever owns it now.
                    if generation != self._generation or not self._accepting:
                        limit.release()
                        continue
                    self._start(tp, record, decoded, limit)

    def _start(
        self,
        tp: TopicPartition,
        record: Record,
        decoded: ExecutionRequest | InvalidRequestError,
        limit: asyncio.Semaphore,
    ) -> None:
        self.tracker.start(tp, record.offset)
        task = asyncio.ensure_future(self._handle(tp, record, decoded))
        self._jobs[(tp, record.offset)] = task

        def finished(_: asyncio.Task[None]) -> None:
            self._jobs.pop((tp, record.offset), None)
            limit.release()

        task.add_done_callback(finished)

    async def _handle(
        self, tp: TopicPartition, record: Record, decoded: ExecutionRequest | InvalidRequestError
    ) -> None:
        """Answer one record; marks its offset done only once the broker has the answer."""
        headers = list(record.headers or ())
        corr = correlation_id(headers)
        source = SourcePosition(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
        )
        first_failure = now()
        reply_to: str | None = None
        if isinstance(decoded, InvalidRequestError):
            exc = decoded
            execution_id = exc.execution_id or new_id()
            with job_context(execution_id, corr):
                log.info("invalid request: %s", "; ".join(exc.errors))
                result = self.executor.rejected(exc, execution_id=execution_id, correlation_id=corr)
        else:
            request = decoded
            execution_id = request.execution_id or new_id()
            reply_to = request.reply_to
            with job_context(execution_id, corr):
                queued = (
                    max(0.0, time.time() - record.timestamp / 1000) if record.timestamp else None
                )
                try:
                    if self.cancellations.requested(execution_id) is not None:
                        log.info("cancelled before it ran")
                        result = self.executor.cancelled(request, corr, queued=queued)
                    else:
                        with self.cancellations.watch(execution_id) as cancel:
                            result = await self.executor.execute(
                                request,
                                corr,
                                queued=queued,
                                cancel=cancel,
                                on_start=lambda: self._announce_running(execution_id, corr),
                            )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug of ours must not lose the job
                    log.exception("internal error while running the job")
                    result = self._internal_error(execution_id, corr, request.job_type, exc)
        with job_context(execution_id, corr):
            dead = None
            if result.error is not None and result.error.type in DEAD_LETTER_TYPES:
                dead = build_record(
                    key=record.key,
                    value=record.value,
                    headers=headers,
                    source=source,
                    execution_id=execution_id,
                    correlation_id=corr,
                    error=result.error,
                    attempts=result.attempts,
                    first_failure_at=first_failure,
                    last_failure_at=result.finished_at,
                    worker_id=self.settings.worker_id,
                )
            await self._publish(result, reply_to, dead)
            log.info(
                "answered: status=%s error=%s in %.3fs",
                result.status.value,
                result.error.type.value if result.error else None,
                result.execution_time,
            )
        self.tracker.finish(tp, record.offset)
        self.answered += 1
        if self.on_answered is not None:
            since = time.time() - record.timestamp / 1000 if record.timestamp else None
            self.on_answered(result, since)

    def _announce_running(self, execution_id: str, corr: str) -> None:
        """Tell the status topic the job runs (best effort, never delaying the job: the result
        is what counts, and a missing ``running`` only shows the job as queued a bit longer)."""
        status = JobStatus(
            execution_id=execution_id,
            worker_id=self.settings.worker_id,
            correlation_id=corr,
            at=now(),
        )

        async def send() -> None:
            assert self._producer is not None
            try:
                await self._producer.send(
                    self.settings.status_topic,
                    key=execution_id.encode(),
                    value=dumps(status),
                    headers=[(CORRELATION_HEADER, corr.encode())],
                )
            except KafkaError as exc:
                log.debug("status not published: %s", exc)

        task = asyncio.ensure_future(send())
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    def _internal_error(
        self, execution_id: str, corr: str, job_type: str | None, exc: Exception
    ) -> ExecutionResult:
        return ExecutionResult(
            execution_id=execution_id,
            correlation_id=corr,
            status=Status.FAILED,
            success=False,
            error=ErrorInfo(type=ErrorType.INTERNAL_ERROR, message=f"Internal error: {exc!r}"),
            job_type=job_type,
            attempts=1,
            worker_id=self.settings.worker_id,
            finished_at=now(),
        )

    async def _publish(
        self,
        result: ExecutionResult,
        reply_to: str | None,
        dead: tuple[DLQRecord, bytes, list[tuple[str, bytes]]] | None,
    ) -> None:
        """Send and await acknowledgement; retried until the broker takes it."""
        assert self._producer is not None
        key = result.execution_id.encode()
        value = dumps(result)
        headers = [
            (CORRELATION_HEADER, result.correlation_id.encode()),
            ("x-tako-status", result.status.value.encode()),
        ]
        sends: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = [
            (self.settings.results_topic, key, value, headers)
        ]
        if reply_to and reply_to != self.settings.results_topic:
            sends.append((reply_to, key, value, headers))
        if dead is not None:
            # keyed by its DLQ id, so a tombstone for that key deletes the entry
            record, dead_value, dead_headers = dead
            sends.append(
                (self.settings.dlq_topic, record.dlq_id.encode(), dead_value, dead_headers)
            )
        await asyncio.gather(*(self._send_until_acked(*send) for send in sends))

    async def _send_until_acked(
        self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        """One message, re-sent (alone) until the broker acknowledges it."""
        assert self._producer is not None
        delay = 0.2
        while True:
            try:
                ack = await self._producer.send(topic, value=value, key=key, headers=headers)
                await ack
                return
            except MessageSizeTooLargeError as exc:
                # Retrying cannot help and would stall the partition for good.  Results and DLQ
                # records are capped well below the limit, so this means a misconfigured topic.
                log.error("%s refused a %d-byte message, not retried: %s", topic, len(value), exc)
                return
            except KafkaError as exc:
                log.warning("publishing to %s failed (%s); retrying in %.1fs", topic, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before giving partitions up: let their jobs finish (bounded), commit, forget them."""
        self._generation += 1
        running = {key for key in self._jobs if key[0] in revoked}
        if running:
            log.info("rebalance: waiting for %d running job(s) of revoked partitions", len(running))
        await self._settle(running, self.settings.shutdown_grace)
        await self._commit(only=revoked)
        self.tracker.forget(revoked)

    async def _settle(self, keys: set[tuple[TopicPartition, int]], grace: float) -> None:
        tasks = [self._jobs[k] for k in keys if k in self._jobs]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()  # its container is removed; its offset stays uncommitted
        if pending:
            log.warning("handing back %d unfinished job(s) uncommitted", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    async def _commit_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._commit()

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        if self._consumer is None:
            return
        positions = self.tracker.committable()
        owned = self._consumer.assignment()
        positions = {
            tp: pos
            for tp, pos in positions.items()
            if (only is None or tp in only) and (tp in owned or only is not None)
        }
        if not positions:
            return
        try:
            await self._consumer.commit(
                {tp: OffsetAndMetadata(pos, "") for tp, pos in positions.items()}
            )
        except (CommitFailedError, KafkaError) as exc:
            log.warning("commit failed (%s); will retry", exc)
            return
        self.tracker.committed(positions)
