"""The request stream: requests in, one result (and maybe a DLQ record) out, offsets committed last.

Why not a faust agent: a faust agent that raises gets its message acked and skipped, and with
``concurrency > 1`` faust may commit past an event still in flight (its issue #606).  Jobs run
concurrently and finish out of order, so the intake keeps its own ``OffsetTracker`` and commits a
partition's position only up to the lowest job not yet answered, and only after the broker
acknowledged the result and the DLQ record.  A worker killed at any moment therefore loses
nothing: uncommitted jobs are run again by whoever gets the partition (at-least-once; results
are keyed by ``execution_id`` so consumers can de-duplicate).

Kafka itself stays behind two small seams, ``Source`` (a consumer group's partitions) and
``Sink`` (a producer that returns once the broker has a message, or has many), implemented in
``stream`` and faked in the unit tests, so offsets, capacity, revocation and poison handling are
tested in milliseconds.

Refused requests need no container, so a burst of them is answered as fast as Kafka allows:
the refused records of a fetch are answered by one task, their results and DLQ records sent in
two batches (``Publisher.publish_all``), each record's offset finished as its answer lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime

from aiokafka import TopicPartition

from tako_stream.core.errors import BrokerError, InvalidRequestError
from tako_stream.core.models import (
    CORRELATION_HEADER,
    PAYLOAD_HEADER,
    ExecutionRequest,
    ExecutionResult,
    JobStatus,
)
from tako_stream.kafka.clients import MAX_MESSAGE_BYTES
from tako_stream.kafka.codec import correlation_id, decode_request, dumps, header
from tako_stream.kafka.message import Incoming
from tako_stream.logs import Condition, job_context
from tako_stream.settings import ReplyTo, Topics
from tako_stream.worker.budget import ByteBudget
from tako_stream.worker.cancel import Cancellations
from tako_stream.worker.execute import Executor
from tako_stream.worker.offsets import OffsetTracker
from tako_stream.worker.publish import Publisher
from tako_stream.worker.seams import Answers, Sink, Source, TopicExists
from tako_stream.worker.verdict import Job, Verdict, answer, now

log = logging.getLogger(__name__)

#: Seconds a worker given new partitions waits for the answered index to read every result
#: published so far, before taking their records.
ANSWERS_CURRENT = 15.0
#: Seconds each step of stopping may take past the grace period (the final commit, closing the
#: consumer and the producer, removing containers): a broker that is gone must not keep a
#: stopping worker alive.
STOP_STEP = 3.0
#: Bytes of valid requests (as received) a fetch keeps decoded while they wait for capacity; the
#: rest keep only their bytes (which the fetch holds anyway) and are decoded again once they get
#: a slot.  A decoded request takes up to ~25 times its JSON (1 MiB of ``[{}, {}, ...]``
#: input: 21 MiB), so a 16 MiB fetch of 1 MiB requests once held 300-400 MB waiting; this keeps
#: that under ~25 MiB, while a fetch of ordinary (KiB) requests is still decoded only once.
DECODED_AHEAD = 1024 * 1024


@dataclass(frozen=True)
class Rejection:
    """A request that cannot run as sent: its problems, and the id it names if any."""

    problems: list[str]
    execution_id: str | None


def rejection_cost(message: Incoming) -> int:
    """Bytes an invalid request holds while it is answered: its original, then the DLQ record
    that carries it in base64, that record encoded, and the producer's copy (about five times
    its size), plus the answer and the task around it."""
    return 5 * message.size + 64 * 1024


def decode(message: Incoming) -> ExecutionRequest | Rejection:
    """The request a record holds, or why it cannot run; never raises.  A request naming no
    id and with no usable key is given one derived from its position, so that a re-delivery
    of the same record is answered under the same id."""
    try:
        return decode_request(message.value, message.key, message.position_id)
    except InvalidRequestError as exc:
        return Rejection(exc.errors, exc.execution_id)
    except Exception as exc:  # a decoder bug must not stop the stream
        log.exception("unexpected error decoding a request")
        return Rejection([f"request: cannot be decoded ({exc!r})"], None)


class Intake:
    """Consumes requests, runs them through the executor, publishes answers, commits."""

    def __init__(
        self,
        source: Source,
        sink: Sink,
        executor: Executor,
        *,
        topics: Topics,
        reply_to: ReplyTo,
        topic_exists: TopicExists,
        answers: Answers,
        cancellations: Cancellations | None = None,
        capacity: int,
        rejection_budget: int,
        publish_timeout: float,
        artifacts_timeout: float = 10.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        shutdown_grace: float,
        revoke_wait: float,
        commit_interval: float,
        decoded_ahead: int = DECODED_AHEAD,
    ) -> None:
        """``capacity``: jobs accepted but unanswered; a little above the pool size so the next
        job is already decoded when a container slot frees up, without hoarding a backlog.
        ``rejection_budget``: bytes of invalid requests held while their answers are sent.
        ``decoded_ahead``: bytes of requests kept decoded while they wait for capacity."""
        self.source = source
        self.sink = sink
        self.executor = executor
        self.topics = topics
        self.reply_to = reply_to
        self.topic_exists = topic_exists
        self.answers = answers
        self.publisher = Publisher(
            sink.send,
            topics,
            send_all=sink.send_all,
            reply_to_timeout=reply_to.timeout,
            publish_timeout=publish_timeout,
            artifacts_timeout=artifacts_timeout,
            max_message_bytes=max_message_bytes,
        )
        self.cancellations = cancellations or Cancellations()
        self.shutdown_grace = shutdown_grace
        self.revoke_wait = revoke_wait
        self.commit_interval = commit_interval
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._jobs: dict[tuple[TopicPartition, int], asyncio.Task[None]] = {}
        #: Execution ids of the requests being run (to skip repeats of idempotent ones).
        self._running_ids: Counter[str] = Counter()
        self._capacity = asyncio.Semaphore(capacity)
        self._rejections = ByteBudget(rejection_budget)
        self._decoded_ahead = decoded_ahead
        self._announcing: set[asyncio.Task[None]] = set()
        self._generation = 0
        self._accepting = True
        self._tasks: list[asyncio.Task[None]] = []
        self._commits = Condition("committing offsets (retrying)", log)
        self.answered = 0
        #: Told of each answer once the broker has it, with seconds since the request was produced.
        self.on_answered: Callable[[ExecutionResult, float | None], None] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    @property
    def assigned(self) -> bool:
        return bool(self.source.assignment())

    @property
    def worker_id(self) -> str:
        return self.executor.worker_id

    async def start(self) -> None:
        await self.sink.start()
        await self.source.start(self.partitions_revoked, self.partitions_assigned)
        self._tasks = [
            asyncio.ensure_future(self._consume()),
            asyncio.ensure_future(self._commit_every(self.commit_interval)),
        ]

    async def stop(self) -> bool:
        """Stop taking jobs, let running ones finish within the grace period, commit, close;
        whether every answer sent was committed.  Bounded whatever the broker does: at most
        ``shutdown_grace`` plus ``4 * STOP_STEP`` seconds."""
        self._accepting = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._settle(set(self._jobs), self.shutdown_grace)
        committed = await self._commit_within(STOP_STEP)
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("stopping the consumer", self.source.stop),
            ("stopping the producer", self.sink.stop),
            ("removing containers", lambda: self.executor.pool.sandbox.drain(STOP_STEP)),
        ]
        for what, step in steps:  # each on its own: one failing must not skip the others
            try:
                async with asyncio.timeout(STOP_STEP):
                    await step()
            except TimeoutError:
                log.warning("%s took more than %gs; going on", what, STOP_STEP)
            except Exception as exc:
                log.warning("%s failed (%r); going on", what, exc)
        return committed

    async def abandon(self) -> None:
        """Stop every job now (their containers are removed), for a stop that ran out of time."""
        self._accepting = False
        tasks = list(self._jobs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _commit_within(self, seconds: float) -> bool:
        """Commit what can be (the broker may be gone: bounded); whether nothing is left."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._commit()
        left = self.tracker.committable()
        if left:
            log.error("could not commit %d partition(s) before stopping", len(left))
        return not left

    async def _consume(self) -> None:
        failing = Condition("fetching requests (retrying every second)", log)
        while self._accepting:
            try:
                messages = await self.source.fetch(timeout=0.5)
            except BrokerError as exc:  # the broker away or a rebalance fault: keep trying
                failing.wrong(exc)
                await asyncio.sleep(1)
                continue
            failing.right()
            generation = self._generation
            # Decoding tells whether a record needs a container.  Rejections only need the
            # producer, so the batch's rejections are answered first, together (their sends
            # batched), never queued behind requests waiting for capacity; the requests then
            # take capacity one by one, in order.
            refused, waiting = self._sort(messages)
            for group, cost in self._within_budget(refused):
                size = await self._rejections.acquire(cost)
                # A rebalance while we waited may have taken the partition (or reset its
                # position): leave the record to whoever owns it now.
                if generation != self._generation or not self._accepting:
                    self._rejections.release(size)
                    break
                self._start_rejections(group, functools.partial(self._rejections.release, size))
            await self._take_in_turn(waiting, generation)

    async def _take_in_turn(
        self, waiting: deque[tuple[Incoming, ExecutionRequest | None]], generation: int
    ) -> None:
        """Start the fetch's requests in order as capacity frees up.  While one waits for it,
        the source fetches nothing ahead: fetching more could not start anything sooner, and
        a consumer with nothing new to return keeps long-polling (the embedded broker holds
        each poll its whole ``kafka_fetch_wait_ms``: 50 empty fetches a second at the default,
        worker and broker CPU taken from the containers of a saturated worker)."""
        paused = False
        try:
            while waiting:
                if self._capacity.locked():
                    # Before every wait, not once: a rebalance meanwhile assigns unpaused.
                    self.source.pause()
                    paused = True
                await self._capacity.acquire()
                # no local keeps a request: once answered, nothing here holds it any more
                self._take(waiting.popleft(), generation)
        finally:
            if paused:
                self.source.resume()

    def _sort(
        self, messages: list[Incoming]
    ) -> tuple[list[tuple[Incoming, Rejection]], deque[tuple[Incoming, ExecutionRequest | None]]]:
        """The batch's rejections, and its requests in order: each decoded while the bytes of
        those kept decoded stay within ``decoded_ahead``, past it None (decoded once it has a
        slot), so requests waiting for capacity hold a bounded amount of memory."""
        refused: list[tuple[Incoming, Rejection]] = []
        waiting: deque[tuple[Incoming, ExecutionRequest | None]] = deque()
        kept = 0
        for message in messages:
            # Started now, every record of the fetch: rejections are answered before the
            # requests waiting for capacity, and a rejection finished past a request its
            # tracker did not know yet moved the commit past that request (lost if the worker
            # died then).  A record left to a rebalance's next owner is forgotten with its
            # partition (``on_revoke``: every partition is revoked at a rebalance).
            self.tracker.start(message.tp, message.offset)
            decoded = decode(message)
            if isinstance(decoded, Rejection):
                refused.append((message, decoded))
                continue
            size = message.size
            if kept + size <= self._decoded_ahead:
                kept += size
                waiting.append((message, decoded))
            else:
                waiting.append((message, None))
        return refused, waiting

    def _take(self, pending: tuple[Incoming, ExecutionRequest | None], generation: int) -> None:
        """Start a request that has just taken capacity (the slot is released when it is done,
        or here when its record is no longer this worker's to run)."""
        if generation != self._generation or not self._accepting:
            self._capacity.release()
            return
        message, request = pending
        decoded = request if request is not None else decode(message)
        if isinstance(decoded, Rejection):  # the same bytes decoded the same way: not expected
            self._start_rejections([(message, decoded)], self._capacity.release)
            return
        self._start(message, decoded, self._capacity.release)

    def _within_budget(
        self, refused: list[tuple[Incoming, Rejection]]
    ) -> Iterator[tuple[list[tuple[Incoming, Rejection]], int]]:
        """The refused records in groups answered together, each group's cost within the
        rejection budget (a record larger than the whole budget alone), and each cost."""
        group: list[tuple[Incoming, Rejection]] = []
        total = 0
        for pair in refused:
            cost = rejection_cost(pair[0])
            if group and total + cost > self._rejections.total:
                yield group, total
                group, total = [], 0
            group.append(pair)
            total += cost
        if group:
            yield group, total

    def _start(
        self, message: Incoming, request: ExecutionRequest, release: Callable[[], None]
    ) -> None:
        self._track([message], self._handle(message, request), release)

    def _start_rejections(
        self, refused: list[tuple[Incoming, Rejection]], release: Callable[[], None]
    ) -> None:
        self._track([m for m, _ in refused], self._handle_rejections(refused), release)

    def _track(
        self,
        messages: list[Incoming],
        handling: Coroutine[None, None, None],
        release: Callable[[], None],
    ) -> None:
        """Run ``handling`` as the task answering ``messages`` (their offsets started here,
        finished by it); ``release`` once it is done."""
        keys = [(message.tp, message.offset) for message in messages]
        for message in messages:
            self.tracker.start(message.tp, message.offset)
        task = asyncio.ensure_future(handling)
        for key in keys:
            self._jobs[key] = task

        def finished(_: asyncio.Task[None]) -> None:
            for key in keys:
                self._jobs.pop(key, None)
            release()

        task.add_done_callback(finished)

    def _skipped(self, message: Incoming, execution_id: str, corr: str) -> bool:
        """Whether the record is a repeat not to answer again (said, and its offset finished)."""
        skip = None
        if self.answers.answered(execution_id, message.position_id):
            skip = "already answered (delivered again after a failure): not run again"
        elif header(message.headers, PAYLOAD_HEADER) is not None and (
            execution_id in self._running_ids or self.answers.has_answer(execution_id)
        ):
            # An idempotent submit that lost the race: its key's first request is the job.
            skip = "a repeat of an idempotent request that is running or answered: skipped"
        if skip is None:
            return False
        with job_context(execution_id, corr):
            log.info(skip)
        self.tracker.finish(message.tp, message.offset)
        return True

    async def _handle(self, message: Incoming, request: ExecutionRequest) -> None:
        """Answer one record; its offset is done once the broker has the answer.

        Whatever goes wrong while answering, the record gets an answer or, failing that, a DLQ
        record, and its offset is finished: one record never stops its partition's commits.
        Only a cancellation (revoke, shutdown) leaves it unfinished, to be run again.
        """
        corr = correlation_id(message.headers)
        execution_id = request.execution_id or message.position_id
        if self._skipped(message, execution_id, corr):
            return
        with job_context(execution_id, corr), self._running(execution_id):
            final, refused = await self._answer(message, request, execution_id, corr)
            self._answered(message, execution_id, final, refused)

    async def _handle_rejections(self, refused: list[tuple[Incoming, Rejection]]) -> None:
        """Answer refused records together: their answers built here, their sends batched
        (``Publisher.publish_all``), then each one finished as ``_handle`` finishes one."""
        first_failure = now()
        todo: list[tuple[Incoming, ExecutionResult, str]] = []
        with contextlib.ExitStack() as running:
            for message, rejection in refused:
                corr = correlation_id(message.headers)
                execution_id = rejection.execution_id or message.position_id
                if self._skipped(message, execution_id, corr):
                    continue
                # noted at once: a repeat later in the same batch is seen as one
                running.enter_context(self._running(execution_id))
                result = answer(
                    Job(execution_id, corr, self.worker_id), Verdict.rejected(rejection.problems)
                )
                todo.append((message, result, "; ".join(rejection.problems)))
            try:
                finals = await self.publisher.publish_all(
                    [(message, result) for message, result, _ in todo], first_failure
                )
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug of ours: each answer then takes the one-by-one path
                log.exception("internal error while publishing answers together")
                finals = [
                    await self._publish_one(message, result, None, first_failure)
                    for message, result, _ in todo
                ]
        for (message, result, why), final in zip(todo, finals, strict=True):
            with job_context(result.execution_id, result.correlation_id):
                self._answered(message, result.execution_id, final, why)

    def _answered(
        self,
        message: Incoming,
        execution_id: str,
        final: ExecutionResult | None,
        refused: str | None,
    ) -> None:
        """The record is answered (or could not be): its one log line, its offset finished."""
        if final is not None:
            self.answers.record(execution_id, message.position_id)
        log.info(
            "answered: status=%s error=%s in %.3fs%s",
            final.status.value if final else "unpublished",
            final.error.type.value if final and final.error else None,
            final.execution_time if final else 0.0,
            f" (invalid request: {refused})" if refused else "",
        )
        self.tracker.finish(message.tp, message.offset)
        self.answered += 1
        if self.on_answered is not None and final is not None:
            since = time.time() - message.timestamp_ms / 1000 if message.timestamp_ms else None
            self.on_answered(final, since)

    async def _answer(
        self,
        message: Incoming,
        request: ExecutionRequest,
        execution_id: str,
        corr: str,
    ) -> tuple[ExecutionResult | None, str | None]:
        """Run (or refuse) and publish: the answer on the results topic, if any could be, and
        why the request was refused, if it was (for its one "answered" line)."""
        first_failure = now()
        queued = (
            max(0.0, time.time() - message.timestamp_ms / 1000) if message.timestamp_ms else None
        )
        reply_to: str | None = None
        problem = await self._reply_to_problem(request.reply_to)
        if problem is not None:  # answered here only: never copied to that topic
            result = answer(
                self._job(request, execution_id, corr, queued), Verdict.rejected([problem])
            )
        else:
            reply_to = request.reply_to
            result = await self._run(request, execution_id, corr, queued)
        return await self._publish_one(message, result, reply_to, first_failure), problem

    async def _publish_one(
        self,
        message: Incoming,
        result: ExecutionResult,
        reply_to: str | None,
        first_failure: datetime,
    ) -> ExecutionResult | None:
        """Publish one answer; a bug of ours on the way is answered instead (internal_error),
        and when nothing can be published the record is still finished (None)."""
        try:
            return await self.publisher.publish(
                message, result, reply_to=reply_to, first_failure_at=first_failure
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug of ours while answering: answer that instead
            log.exception("internal error while publishing the answer")
            try:
                return await self.publisher.publish(
                    message,
                    # still the same request's answer: its provenance and usage stay
                    answer(Job.of(result, keep_metadata=False), Verdict.internal(exc)),
                    first_failure_at=first_failure,
                )
            except Exception:  # nothing more can be done; the partition must move on
                log.exception("could not publish any answer; the record is skipped")
                return None

    @contextlib.contextmanager
    def _running(self, execution_id: str) -> Iterator[None]:
        """Note ``execution_id`` as being run (or answered) here for the block."""
        self._running_ids[execution_id] += 1
        try:
            yield
        finally:
            self._running_ids[execution_id] -= 1
            if self._running_ids[execution_id] <= 0:
                del self._running_ids[execution_id]

    async def _run(
        self, request: ExecutionRequest, execution_id: str, corr: str, queued: float | None
    ) -> ExecutionResult:
        job = self._job(request, execution_id, corr, queued)
        try:
            if self.cancellations.requested(execution_id):
                log.info("cancelled before it ran")
                return answer(job, Verdict.cancelled_before_start())
            with self.cancellations.watch(execution_id) as cancel:
                return await self.executor.execute(
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
            return answer(job, Verdict.internal(exc), attempts=1)

    def _job(
        self, request: ExecutionRequest, execution_id: str, corr: str, queued: float | None
    ) -> Job:
        return Job.for_request(
            request,
            execution_id=execution_id,
            correlation_id=corr,
            worker_id=self.worker_id,
            job_types=self.executor.job_types,
            queued=queued,
        )

    def _announce_running(self, execution_id: str, corr: str) -> None:
        """Tell the status topic the job runs (best effort, never delaying the job: the result
        is what counts, and a missing ``running`` only shows the job as queued a bit longer)."""
        status = JobStatus(
            execution_id=execution_id, worker_id=self.worker_id, correlation_id=corr, at=now()
        )

        async def send() -> None:
            with contextlib.suppress(BrokerError):
                await self.sink.send(
                    self.topics.status,
                    execution_id.encode(),
                    dumps(status),
                    [(CORRELATION_HEADER, corr.encode())],
                )

        task = asyncio.ensure_future(send())
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _reply_to_problem(self, topic: str | None) -> str | None:
        """Why ``reply_to`` cannot be used, or None.  When the broker cannot say whether the
        topic exists, the job runs: the copy's delivery is bounded, and its failure is
        written into the result."""
        if topic is None or topic == self.topics.results:
            return None
        problem = self.reply_to.problem(topic)
        if problem is not None:
            return problem
        try:
            exists = await self.topic_exists(topic)
        except BrokerError as exc:
            log.warning("cannot tell whether reply_to %s exists (%s)", topic, exc)
            return None
        return None if exists else f"reply_to: topic {topic!r} does not exist"

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Before running records of new partitions: know which of them a previous owner
        answered without committing (bounded: past it, such records may run again)."""
        if assigned:
            await self.answers.wait_until_current(ANSWERS_CURRENT)

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before giving partitions up: let their jobs finish (they end by their own deadline,
        ``revoke_wait`` at most, which the group's rebalance timeout covers), commit, forget
        them.  A job stopped half-way would run again from the start on the next owner."""
        self._generation += 1
        running = {key for key in self._jobs if key[0] in revoked}
        if running:
            log.info("rebalance: waiting for %d running job(s) of revoked partitions", len(running))
        await self._settle(running, self.revoke_wait)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_STEP):
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
        owned = self.source.assignment()
        positions = {
            tp: pos
            for tp, pos in self.tracker.committable().items()
            if (only is None or tp in only) and (tp in owned or only is not None)
        }
        if not positions:
            return
        try:
            await self.source.commit(positions)
        except BrokerError as exc:
            self._commits.wrong(exc)
            return
        self._commits.right()
        self.tracker.committed(positions)
