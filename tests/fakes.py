"""In-memory fakes behind the worker's seams (``Sandbox``, ``Source``, ``Sink``) and builders.

They let the orchestration (pool slots, warm containers, retries, the breaker, cancellation,
offsets, revocation, publishing) run in milliseconds with neither Docker nor Kafka.  Every wait
here is bounded by :data:`WAIT` seconds: a test that waits for something that never happens
fails with an ``AssertionError`` naming it, rather than hanging the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import orjson
from aiokafka import TopicPartition

from tako_stream.core.errors import (
    BrokerError,
    PublishRefusedError,
    SandboxError,
    SandboxUnavailableError,
)
from tako_stream.core.jobtypes import JobTypes, Limits, default_limits
from tako_stream.core.models import (
    CORRELATION_HEADER,
    CancelRequest,
    DLQRecord,
    ExecutionRequest,
    ExecutionResult,
    JobStatus,
)
from tako_stream.kafka.codec import dumps
from tako_stream.kafka.message import Headers, Incoming
from tako_stream.sandbox.base import Prepared, SandboxRun
from tako_stream.sandbox.pool import SandboxPool, WarmPool
from tako_stream.sandbox.protocol import Collected, Report
from tako_stream.settings import BreakerConfig, OutputCaps, ReplyTo, RetryPolicy, Topics
from tako_stream.worker.breaker.handle import Breaker
from tako_stream.worker.breaker.state import BreakerEvent, BreakerState, fold
from tako_stream.worker.cancel import Cancellations
from tako_stream.worker.execute import Executor
from tako_stream.worker.intake import DECODED_AHEAD, Intake
from tako_stream.worker.seams import Assigned, Outcome, Outgoing, Revoked

T = TypeVar("T")

#: The longest any wait in the fakes or the tests may take before the test fails.
WAIT = 5.0

TOPICS = Topics(
    requests="tako.requests",
    results="tako.results",
    dlq="tako.dlq",
    control="tako.control",
    status="tako.status",
)
#: Any topic but the service's own may be a reply_to, as by default.
REPLY_TO = ReplyTo(
    re.compile(".+"),
    frozenset({TOPICS.requests, TOPICS.dlq, TOPICS.control, TOPICS.status}),
    1.0,
)
#: The packaged job types (``default`` and ``data-processing``).
JOB_TYPES = JobTypes.load()


def limits_of(job_type: str = "default") -> Limits:
    """A job type's default container: the warm pool's shape for it."""
    return default_limits(JOB_TYPES[job_type])


# --- Waiting ------------------------------------------------------------------------------------


class Pulse:
    """Fired whenever a fake's state changes; ``until`` re-checks a predicate after each."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``predicate`` with short sleeps, for state no fake is told about (``sizes()``)."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - polls state nothing signals
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def bounded(awaitable: Awaitable[T], what: str, timeout: float = WAIT) -> T:
    """``await awaitable`` within ``timeout``, failing the test with ``what`` otherwise."""
    try:
        async with asyncio.timeout(timeout):
            return await awaitable
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def spin(turns: int = 20) -> None:
    """Let every ready task run a few steps (no time passes)."""
    for _ in range(turns):
        await asyncio.sleep(0)


# --- Sandbox ------------------------------------------------------------------------------------


@dataclass(eq=False)
class FakePrepared:
    """A "started" container waiting for a job; ``kill()`` makes ``alive()`` false."""

    limits: Limits
    name: str
    created: float = field(default_factory=time.monotonic)
    is_alive: bool = True

    def alive(self) -> bool:
        return self.is_alive

    def kill(self) -> None:
        self.is_alive = False


@dataclass
class Step:
    """What one ``FakeSandbox.run`` call does: raise, block, then report.

    ``block``: wait until that event is set (or, with ``honour_cancel``, until the run's
    cancel event is set, which ends it as the supervisor does: cancelled, exit 143).
    """

    exit_code: int | None = 0
    stdout: bytes = b""
    stderr: bytes = b""
    result: bytes | None = None
    elapsed: float = 0.01
    #: The supervisor's usage figures for the job's process (KiB, ms).
    max_rss_kb: int | None = 20480
    cpu_ms: int | None = 7
    exception: list[str] = field(default_factory=list)
    raises: BaseException | None = None
    block: asyncio.Event | None = None
    honour_cancel: bool = True
    #: Called with the call as it starts (before raising or blocking).
    effect: Callable[[RunCall], None] | None = None


def succeed(stdout: bytes = b"", result: bytes | None = None, **fields: Any) -> Step:
    return Step(stdout=stdout, result=result, **fields)


def raising(exc: BaseException) -> Step:
    return Step(raises=exc)


def blocking(release: asyncio.Event, **fields: Any) -> Step:
    return Step(block=release, **fields)


RunOutcome = Literal["running", "returned", "cancelled", "raised", "interrupted"]


@dataclass(eq=False)
class RunCall:
    """One ``run`` call as the fake saw it, and how it ended."""

    job: bytes
    limits: Limits
    execution_id: str
    caps: OutputCaps
    prepared: Prepared | None
    cancel: asyncio.Event | None
    #: returned (a report), cancelled (the cancel event ended it), raised (a SandboxError),
    #: interrupted (its task was cancelled while it ran).
    outcome: RunOutcome = "running"
    error: BaseException | None = None

    @property
    def header(self) -> dict[str, str]:
        """The job header fields ``encode_job`` wrote (``timeout``, ``stdout_cap``...)."""
        line = self.job[8:].split(b"\n", 1)[0].decode("ascii")
        return dict(part.split("=", 1) for part in line.split()[2:])

    @property
    def code(self) -> str:
        body = self.job[8:].split(b"\n", 1)[1]
        return body[: int(self.header["code"])].decode("utf-8", "surrogatepass")

    @property
    def input(self) -> Any:
        body = self.job[8:].split(b"\n", 1)[1]
        return orjson.loads(body[int(self.header["code"]) :])


class FakeSandbox:
    """The ``Sandbox`` protocol in memory, scriptable per call or per job.

    The step of a ``run`` is, in order of precedence: the next one scripted for its execution
    id (``script_job``), the next one queued (``then``), ``decide(call)`` if given, else
    ``default``.  A warm container that is not ``alive()`` is discarded and the run raises
    ``SandboxUnavailableError``, as ``DockerSandbox`` does, without consuming a step.
    """

    def __init__(self, decide: Callable[[RunCall], Step] | None = None) -> None:
        self.decide = decide
        self.default = Step()
        self._queue: deque[Step] = deque()
        self._per_job: dict[str, deque[Step]] = {}
        self.runs: list[RunCall] = []
        self.prepared: list[FakePrepared] = []
        self.prepare_calls: list[tuple[Limits, str]] = []
        #: Raised, in order, by the next ``prepare`` calls.
        self.prepare_errors: deque[SandboxError] = deque()
        self.discarded: list[FakePrepared] = []
        self.down = False
        self.pings = 0
        self.drains = 0
        self.running = 0
        self.max_running = 0
        self.changed = Pulse()
        self._names = itertools.count(1)
        self._blocks: set[asyncio.Event] = set()
        #: What ``distributions`` lists per image (normalised name → version; unknown images
        #: hold none), the images it was asked about, and errors its next calls raise.
        self.installed: dict[str, dict[str, str]] = {}
        self.listings: list[str] = []
        self.listing_errors: deque[SandboxError] = deque()

    # scripting
    def then(self, *steps: Step) -> None:
        self._queue.extend(steps)

    def script_job(self, execution_id: str, *steps: Step) -> None:
        self._per_job.setdefault(execution_id, deque()).extend(steps)

    def release_all(self) -> None:
        """Set every block event seen so far (test clean-up)."""
        for event in self._blocks:
            event.set()

    def _step_for(self, call: RunCall) -> Step:
        mine = self._per_job.get(call.execution_id)
        if mine:
            return mine.popleft()
        if self._queue:
            return self._queue.popleft()
        if self.decide is not None:
            return self.decide(call)
        return self.default

    # queries
    def runs_of(self, execution_id: str) -> list[RunCall]:
        return [call for call in self.runs if call.execution_id == execution_id]

    async def wait_started(self, execution_id: str, count: int = 1) -> RunCall:
        """The ``count``-th run of ``execution_id``, once it has started."""
        await self.changed.until(
            lambda: len(self.runs_of(execution_id)) >= count, f"run #{count} of {execution_id}"
        )
        return self.runs_of(execution_id)[count - 1]

    async def wait_running(self, count: int) -> None:
        await self.changed.until(lambda: self.running == count, f"{count} running job(s)")

    # the protocol
    async def ping(self) -> None:
        self.pings += 1
        if self.down:
            raise SandboxUnavailableError("fake engine is down")

    async def prepare(self, limits: Limits, *, execution_id: str = "warm") -> Prepared:
        self.prepare_calls.append((limits, execution_id))
        if self.prepare_errors:
            self.changed.fire()
            raise self.prepare_errors.popleft()
        prepared = FakePrepared(limits, f"fake-{next(self._names)}")
        self.prepared.append(prepared)
        self.changed.fire()
        return prepared

    async def discard(self, prepared: Prepared) -> None:
        assert isinstance(prepared, FakePrepared)
        self.discarded.append(prepared)
        self.changed.fire()

    async def drain(self, timeout: float = 10.0) -> None:
        self.drains += 1

    async def distributions(self, limits: Limits) -> Mapping[str, str]:
        self.listings.append(limits.image)
        self.changed.fire()
        if self.listing_errors:
            raise self.listing_errors.popleft()
        return dict(self.installed.get(limits.image, {}))

    async def run(
        self,
        job: bytes,
        limits: Limits,
        *,
        execution_id: str,
        caps: OutputCaps,
        prepared: Prepared | None = None,
        cancel: asyncio.Event | None = None,
    ) -> SandboxRun:
        call = RunCall(job, limits, execution_id, caps, prepared, cancel)
        self.runs.append(call)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.changed.fire()
        try:
            if prepared is not None and not prepared.alive():
                await self.discard(prepared)
                raise SandboxUnavailableError("a warm container lost its connection to Docker")
            step = self._step_for(call)
            run = await self._play(step, call)
            call.outcome = "cancelled" if run.cancel_sent else "returned"
            return run
        except asyncio.CancelledError:
            call.outcome = "interrupted"
            raise
        except BaseException as exc:
            call.outcome, call.error = "raised", exc
            raise
        finally:
            self.running -= 1
            self.changed.fire()

    async def _play(self, step: Step, call: RunCall) -> SandboxRun:
        if step.effect is not None:
            step.effect(call)
        await asyncio.sleep(0)  # a real run always lets other tasks in
        if step.raises is not None:
            raise step.raises
        cancel = call.cancel if step.honour_cancel else None
        if step.block is not None:
            self._blocks.add(step.block)
            waits = [asyncio.ensure_future(step.block.wait())]
            if cancel is not None:
                waits.append(asyncio.ensure_future(cancel.wait()))
            try:
                await bounded(
                    asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED),
                    f"the test to release the blocked run of {call.execution_id}",
                )
            finally:
                for waiter in waits:
                    waiter.cancel()
        if cancel is not None and cancel.is_set():
            report = Report(
                exit_code=143,
                elapsed=step.elapsed,
                cancelled=True,
                max_rss_kb=step.max_rss_kb,
                cpu_ms=step.cpu_ms,
            )
            return self._sandbox_run(Collected(report=report), call, cancel_sent=True)
        report = Report(
            exit_code=step.exit_code,
            elapsed=step.elapsed,
            exception=list(step.exception),
            stderr_tail=step.stderr.decode("utf-8", "replace")[-16384:],
            max_rss_kb=step.max_rss_kb,
            cpu_ms=step.cpu_ms,
        )
        collected = Collected(
            stdout=bytearray(step.stdout),
            stderr=bytearray(step.stderr),
            result=step.result,
            report=report,
        )
        return self._sandbox_run(collected, call)

    @staticmethod
    def _sandbox_run(
        collected: Collected, call: RunCall, *, cancel_sent: bool = False
    ) -> SandboxRun:
        report = collected.report
        return SandboxRun(
            collected=collected,
            oom_killed=False,
            container_exit=report.exit_code if report else None,
            outer_timeout=False,
            seconds=report.elapsed if report and report.elapsed is not None else 0.0,
            warm=call.prepared is not None,
            cancel_sent=cancel_sent,
        )


# --- Source -------------------------------------------------------------------------------------


class FakeSource:
    """The intake's ``Source``: records added by the test, an assignment, commits recorded."""

    def __init__(self, topic: str = TOPICS.requests, partitions: Iterable[int] = (0, 1)) -> None:
        self.topic = topic
        self._assigned = {TopicPartition(topic, p) for p in partitions}
        self._pending: deque[Incoming] = deque()
        self._offsets: dict[int, int] = {}
        self._arrived = asyncio.Event()
        self.on_revoked: Revoked | None = None
        self.started = False
        self.stopped = False
        #: Raise ``BrokerError`` on the next N fetches / commits.
        self.fetch_errors = 0
        self.commit_errors = 0
        self.fetches = 0
        self.delivered: list[Incoming] = []
        #: Every commit the source acknowledged, in order, and the latest position per partition.
        self.commits: list[dict[TopicPartition, int]] = []
        self.committed: dict[TopicPartition, int] = {}
        self.failed_commits: list[dict[TopicPartition, int]] = []
        #: ``assignment()`` calls: the intake makes one per commit round.
        self.assignment_calls = 0
        self.revoked: list[set[TopicPartition]] = []
        self.changed = Pulse()
        #: Whether fetching is paused (a paused consumer returns nothing), how often it was
        #: paused, and fetches made while it was.
        self.paused = False
        self.pauses = 0
        self.fetches_paused = 0

    def tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self.topic, partition)

    def add(
        self,
        value: bytes | None,
        *,
        partition: int = 0,
        key: bytes | None = None,
        headers: Headers = (),
        timestamp_ms: int | None = None,
    ) -> Incoming:
        """Queue a record at the next offset of ``partition``."""
        offset = self._offsets.get(partition, 0)
        self._offsets[partition] = offset + 1
        record = Incoming(
            topic=self.topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            headers=tuple(headers),
            timestamp_ms=timestamp_ms,
        )
        self._pending.append(record)
        self._arrived.set()
        return record

    def end(self, partition: int) -> int:
        """One past the last offset added to ``partition``."""
        return self._offsets.get(partition, 0)

    def commits_of(self, partition: int) -> list[int]:
        tp = self.tp(partition)
        return [commit[tp] for commit in self.commits if tp in commit]

    async def wait_committed(self, partition: int, position: int) -> None:
        tp = self.tp(partition)
        await self.changed.until(
            lambda: self.committed.get(tp) == position,
            f"{tp.topic}[{tp.partition}] committed at {position} (now {self.committed.get(tp)})",
        )

    async def commit_rounds(self, rounds: int = 3) -> None:
        """Wait until the intake has run ``rounds`` more commit rounds."""
        target = self.assignment_calls + rounds
        await self.changed.until(lambda: self.assignment_calls >= target, f"{rounds} commit rounds")

    async def revoke(self, partitions: Iterable[int]) -> None:
        """As a rebalance does: stop delivering, run the intake's callback, then unassign."""
        tps = {self.tp(p) for p in partitions}
        assert self.on_revoked is not None, "the intake never started the source"
        self._pending = deque(r for r in self._pending if r.tp not in tps)
        await self.on_revoked(set(tps))
        self._assigned -= tps
        self.revoked.append(tps)
        self.changed.fire()

    def redeliver(self, partition: int, offsets: Iterable[int]) -> None:
        """Deliver records again, as Kafka does to a partition's next owner after a crash
        before their offsets were committed."""
        tp, wanted = self.tp(partition), set(offsets)
        self._pending.extend(r for r in self.delivered if r.tp == tp and r.offset in wanted)
        self._arrived.set()

    # the protocol
    async def start(self, on_revoked: Revoked, on_assigned: Assigned) -> None:
        self.on_revoked = on_revoked
        self.started = True
        await on_assigned(set(self._assigned))

    async def fetch(self, timeout: float) -> list[Incoming]:
        self.fetches += 1
        if self.paused:
            self.fetches_paused += 1
            await asyncio.sleep(timeout)
            return []
        if self.fetch_errors:
            self.fetch_errors -= 1
            raise BrokerError("fake: fetch failed")
        if not self._deliverable():
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
        batch = self._deliverable()
        self._pending = deque(r for r in self._pending if r not in batch)
        self.delivered.extend(batch)
        return batch

    def _deliverable(self) -> list[Incoming]:
        return [r for r in self._pending if r.tp in self._assigned]

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1
        self.changed.fire()

    def resume(self) -> None:
        self.paused = False
        self.changed.fire()

    def assignment(self) -> set[TopicPartition]:
        self.assignment_calls += 1
        self.changed.fire()
        return set(self._assigned)

    async def commit(self, positions: dict[TopicPartition, int]) -> None:
        await asyncio.sleep(0)  # a real commit always waits for the broker
        if self.commit_errors:
            self.commit_errors -= 1
            self.failed_commits.append(dict(positions))
            raise BrokerError("fake: commit failed")
        self.commits.append(dict(positions))
        self.committed.update(positions)
        self.changed.fire()

    async def stop(self) -> None:
        self.stopped = True


# --- Sink ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> bytes | None:
        found = [v for k, v in self.headers if k.lower() == name.lower()]
        return found[-1] if found else None


class FakeSink:
    """The intake's ``Sink``: acknowledged sends recorded, failures and blocking per topic."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.attempts: list[Sent] = []
        #: The size of each ``send_all`` call.
        self.batches: list[int] = []
        self._failures: dict[str, deque[BrokerError]] = {}
        self._refused: dict[str, int] = {}
        self._gates: dict[str | None, asyncio.Event] = {}
        self.started = False
        self.stopped = False
        self.changed = Pulse()

    def fail(self, topic: str, times: int = 1, error: type[BrokerError] = BrokerError) -> None:
        """The next ``times`` sends to ``topic`` raise ``error``."""
        queue = self._failures.setdefault(topic, deque())
        queue.extend(error(f"fake: {topic} failed") for _ in range(times))

    def refuse(self, topic: str, larger_than: int = -1) -> None:
        """Every send to ``topic`` (of more than ``larger_than`` bytes) is refused for good
        (``PublishRefusedError``), as a topic's ``max.message.bytes`` does."""
        self._refused[topic] = larger_than

    def block(self, topic: str | None = None) -> asyncio.Event:
        """Sends (to ``topic``, or all) wait until the returned event is set."""
        gate = asyncio.Event()
        self._gates[topic] = gate
        return gate

    def release_all(self) -> None:
        for gate in self._gates.values():
            gate.set()

    # queries
    def on(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic]

    def tries(self, topic: str) -> list[Sent]:
        return [s for s in self.attempts if s.topic == topic]

    def results(self, topic: str = TOPICS.results) -> list[ExecutionResult]:
        return [ExecutionResult.model_validate_json(s.value or b"") for s in self.on(topic)]

    def result(self, execution_id: str, topic: str = TOPICS.results) -> ExecutionResult:
        (found,) = [r for r in self.results(topic) if r.execution_id == execution_id]
        return found

    def dead_letters(self) -> list[DLQRecord]:
        return [DLQRecord.model_validate_json(s.value or b"") for s in self.on(TOPICS.dlq)]

    def statuses(self) -> list[JobStatus]:
        return [JobStatus.model_validate_json(s.value or b"") for s in self.on(TOPICS.status)]

    async def wait_for(self, topic: str, count: int) -> list[Sent]:
        await self.changed.until(
            lambda: len(self.on(topic)) >= count,
            f"{count} message(s) on {topic} (got {len(self.on(topic))})",
        )
        return self.on(topic)

    async def wait_result(self, execution_id: str) -> ExecutionResult:
        key = execution_id.encode()
        await self.changed.until(
            lambda: any(s.key == key for s in self.on(TOPICS.results)),
            f"the result of {execution_id}",
        )
        return self.result(execution_id)

    # the protocol
    async def start(self) -> None:
        self.started = True

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> None:
        message = Sent(topic, key, value, tuple(headers))
        self.attempts.append(message)
        self.changed.fire()
        await asyncio.sleep(0)  # a real producer always waits for the broker
        gate = self._gates.get(topic) or self._gates.get(None)
        if gate is not None:
            await bounded(gate.wait(), f"the test to unblock sends to {topic}")
        if topic in self._refused and len(value or b"") > self._refused[topic]:
            raise PublishRefusedError(f"fake: {topic} refuses it")
        failures = self._failures.get(topic)
        if failures:
            raise failures.popleft()
        self.sent.append(message)
        self.changed.fire()

    async def send_all(self, messages: Sequence[Outgoing]) -> list[Outcome]:
        """Each message as ``send`` would take it, all at once; failures become outcomes."""
        self.batches.append(len(messages))

        async def one(message: Outgoing) -> Outcome:
            try:
                await self.send(*message)
            except BrokerError as exc:
                return exc
            return None

        return list(await asyncio.gather(*(one(m) for m in messages)))

    async def stop(self) -> None:
        self.stopped = True


# --- Breaker ------------------------------------------------------------------------------------


class BreakerTable:
    """The shared breaker table as its single writer keeps it: each event folded in at once."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.data: dict[str, BreakerState] = {}
        self.published: list[BreakerEvent] = []

    def read(self, endpoint: str) -> BreakerState | None:
        return self.data.get(endpoint)

    async def publish(self, event: BreakerEvent) -> None:
        self.published.append(event)
        self.data[event.endpoint] = fold(self.data.get(event.endpoint), event, self.config)

    def breaker(self, endpoint: str = "fake-docker") -> Breaker:
        return Breaker(
            endpoint=endpoint,
            config=self.config,
            worker_id="worker-1",
            read=self.read,
            publish=self.publish,
        )


# --- Builders -----------------------------------------------------------------------------------


def request_bytes(
    code: str = "print('hi')", *, execution_id: str | None = "job-1", **fields: Any
) -> bytes:
    """A request as a producer would send it (``fields``: any other request field)."""
    body: dict[str, Any] = {"code": code, **fields}
    if execution_id is not None:
        body["execution_id"] = execution_id
    return orjson.dumps(body)


def request(
    code: str = "print('hi')", *, execution_id: str = "job-1", **fields: Any
) -> ExecutionRequest:
    return ExecutionRequest.model_validate_json(
        request_bytes(code, execution_id=execution_id, **fields)
    )


def incoming(
    value: bytes | None,
    *,
    topic: str = TOPICS.requests,
    partition: int = 0,
    offset: int = 0,
    key: bytes | None = None,
    headers: Headers = (),
    timestamp_ms: int | None = None,
) -> Incoming:
    return Incoming(topic, partition, offset, key, value, tuple(headers), timestamp_ms)


def correlation(value: str) -> list[tuple[str, bytes]]:
    return [(CORRELATION_HEADER, value.encode())]


def cancel_bytes(execution_id: str) -> bytes:
    """A ``CancelRequest`` as the control topic carries it."""
    return dumps(CancelRequest(execution_id=execution_id, requested_at=datetime.now(UTC)))


def make_warm(
    sandbox: FakeSandbox,
    shapes: Sequence[tuple[Limits, int]],
    *,
    pool: Callable[[], SandboxPool | None] = lambda: None,
    max_idle: float = 3600.0,
    capacity: int = 2,
) -> WarmPool:
    """A warm pool whose ``busy`` is that of ``pool()`` once it exists (jobs running or
    waiting for a slot, as the worker's runtime wires it), and ``capacity`` the size of that
    pool."""

    def busy() -> int:
        current = pool()
        return current.busy if current is not None else 0

    return WarmPool(sandbox, shapes, max_idle=max_idle, busy=busy, capacity=capacity)


def make_executor(
    sandbox: FakeSandbox | None = None,
    *,
    size: int = 2,
    warm: WarmPool | None = None,
    retry: RetryPolicy | None = None,
    breaker: Breaker | None = None,
    caps: OutputCaps | None = None,
    worker_id: str = "worker-1",
) -> Executor:
    """An executor over ``SandboxPool(sandbox, size)``; retries at once (``base_delay=0``)."""
    pool = SandboxPool(sandbox or FakeSandbox(), size, warm)
    return Executor(
        pool,
        JOB_TYPES,
        worker_id=worker_id,
        caps=caps or OutputCaps(),
        retry=retry or RetryPolicy(max_attempts=2, base_delay=0),
        cancel_grace=1.0,
        breaker=breaker,
    )


def make_intake(
    source: FakeSource,
    sink: FakeSink,
    executor: Executor,
    *,
    cancellations: Cancellations | None = None,
    capacity: int = 2,
    rejection_budget: int = 64 * 1024 * 1024,
    shutdown_grace: float = 2.0,
    commit_interval: float = 0.01,
    existing_topics: Iterable[str] = (),
    reply_to_timeout: float = 1.0,
    publish_timeout: float = 30.0,
    revoke_wait: float | None = None,
    answers: FakeAnswers | None = None,
    decoded_ahead: int = DECODED_AHEAD,
) -> Intake:
    """An intake over the fakes; ``existing_topics`` are the topics besides the service's own
    that exist (what ``reply_to`` may name)."""
    existing = {*vars(TOPICS).values(), *existing_topics}

    async def topic_exists(topic: str) -> bool:
        return topic in existing

    return Intake(
        source,
        sink,
        executor,
        topics=TOPICS,
        reply_to=ReplyTo(REPLY_TO.pattern, REPLY_TO.forbidden, reply_to_timeout),
        topic_exists=topic_exists,
        answers=answers or FakeAnswers(),
        cancellations=cancellations,
        capacity=capacity,
        rejection_budget=rejection_budget,
        publish_timeout=publish_timeout,
        shutdown_grace=shutdown_grace,
        revoke_wait=revoke_wait if revoke_wait is not None else shutdown_grace,
        commit_interval=commit_interval,
        decoded_ahead=decoded_ahead,
    )


class FakeAnswers:
    """The answered index as a dict: what this worker (or a test) says was answered."""

    def __init__(self) -> None:
        self.positions: dict[str, str] = {}
        self.waits = 0

    def answered(self, execution_id: str, position: str) -> bool:
        return self.positions.get(execution_id) == position

    def has_answer(self, execution_id: str) -> bool:
        return execution_id in self.positions

    def record(self, execution_id: str, position: str) -> None:
        self.positions[execution_id] = position

    async def wait_until_current(self, timeout: float) -> bool:
        self.waits += 1
        return True


@dataclass
class Rig:
    """A started intake over fakes, and the fakes to drive and inspect it."""

    sandbox: FakeSandbox
    source: FakeSource
    sink: FakeSink
    executor: Executor
    intake: Intake
    cancellations: Cancellations

    def tp(self, partition: int) -> TopicPartition:
        return self.source.tp(partition)


@contextlib.asynccontextmanager
async def intake_rig(
    *,
    partitions: Iterable[int] = (0, 1),
    pool_size: int = 2,
    capacity: int = 2,
    shutdown_grace: float = 2.0,
    retry: RetryPolicy | None = None,
    **intake_options: Any,
) -> AsyncIterator[Rig]:
    """Start an intake over fresh fakes; on exit unblock everything and stop it (bounded).
    ``intake_options`` go to ``make_intake``."""
    sandbox, source, sink = FakeSandbox(), FakeSource(partitions=partitions), FakeSink()
    executor = make_executor(sandbox, size=pool_size, retry=retry)
    cancellations = Cancellations()
    intake = make_intake(
        source,
        sink,
        executor,
        cancellations=cancellations,
        capacity=capacity,
        shutdown_grace=shutdown_grace,
        **intake_options,
    )
    await intake.start()
    try:
        yield Rig(sandbox, source, sink, executor, intake, cancellations)
    finally:
        sandbox.release_all()
        sink.release_all()
        if not source.stopped:
            await bounded(intake.stop(), "the intake to stop", WAIT + shutdown_grace)
