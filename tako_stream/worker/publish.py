"""Publishing a request's answer: whatever fails on the way, the request still gets one.

The order is fixed: the job's artifacts first (each one record on the artifacts topic, all of a
job's bounded together by ``artifacts_timeout``: an artifact refused by the broker, too large
for a message or not acknowledged in time is dropped from the result's ``artifacts`` and named
in its ``artifacts_skipped`` with why, so the result is never lost nor held back for an
artifact, and lists only artifacts a reader can fetch), then the copy to ``reply_to`` (bounded
by ``ReplyTo.timeout``: a failure there is written into the main result, never blocks it), then
the result, then the DLQ record when the answer's error type calls for one. What cannot be
encoded or is refused by the broker becomes a classified answer that says why; what cannot be
answered at all goes to the DLQ with its original bytes. A send the broker does not acknowledge
is retried for ``publish_timeout`` seconds; a result not acknowledged by then is given up (a
results topic that keeps failing, such as one whose ``min.insync.replicas`` cannot be met, must
not hold its partition's commits back for good) and the original request is dead-lettered
instead. That last resort is retried until the broker takes it: while the broker is unreachable
nothing can be answered or committed, and nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime

import orjson

from tako_stream.core.errors import BrokerError, ErrorType, PublishRefusedError
from tako_stream.core.models import CORRELATION_HEADER, Artifact, ExecutionResult, SkippedArtifact
from tako_stream.dlq import DEAD_LETTER_TYPES, DeadLetter, dead_letter
from tako_stream.kafka import artifacts
from tako_stream.kafka.clients import MAX_MESSAGE_BYTES
from tako_stream.kafka.codec import dumps, encodes
from tako_stream.kafka.message import Headers, Incoming
from tako_stream.logs import job_context
from tako_stream.settings import Topics
from tako_stream.worker.answered import SOURCE_HEADER
from tako_stream.worker.artifacts import pending
from tako_stream.worker.seams import Outcome, Outgoing
from tako_stream.worker.verdict import Job, Verdict, answer, now

log = logging.getLogger(__name__)

#: Seconds between attempts at a send the broker did not acknowledge: doubling up to the cap.
RETRY_FIRST, RETRY_CAP = 0.2, 5.0

#: Sends one message; where it landed (partition, offset) when the sink can tell.
Send = Callable[[str, bytes | None, bytes | None, Headers], Awaitable[tuple[int, int] | None]]
#: Sends many at once: one outcome per message (see ``Sink.send_all``).
SendAll = Callable[[Sequence[Outgoing]], Awaitable[list[Outcome]]]


def _one_by_one(send: Send) -> SendAll:
    """``send_all`` for a sink that has only ``send``: each message concurrently."""

    async def send_all(messages: Sequence[Outgoing]) -> list[Outcome]:
        async def one(message: Outgoing) -> Outcome:
            try:
                return await send(*message)
            except BrokerError as exc:
                return exc

        return list(await asyncio.gather(*(one(m) for m in messages)))

    return send_all


def encode(result: ExecutionResult) -> tuple[ExecutionResult, bytes]:
    """The result and its bytes; a result that cannot be encoded is replaced by one saying why
    (``invalid_output`` for the job's output, ``invalid_request`` for the request's metadata,
    ``internal_error`` otherwise), which always can be."""
    try:
        return result, dumps(result)
    except (orjson.JSONEncodeError, TypeError, ValueError) as exc:
        reason = exc
    job = Job.of(result)
    if not encodes([result.output]):  # one level down, as inside a result
        verdict = Verdict.failure(
            ErrorType.INVALID_OUTPUT,
            result.exit_code,
            message=f"The job's output cannot be carried in a result ({reason})",
        )
    elif not encodes([result.metadata]):
        job = Job.of(result, keep_metadata=False)
        verdict = Verdict.rejected(
            [f"metadata: cannot be carried in a result ({reason})"]  # checked on entry too
        )
    else:
        verdict = Verdict.internal(reason)
    replaced = answer(job, verdict, attempts=result.attempts, started_at=result.started_at)
    # The artifacts were published already: the answer still lists them (plain, always encodes).
    replaced = replaced.model_copy(
        update={"artifacts": result.artifacts, "artifacts_skipped": result.artifacts_skipped}
    )
    try:
        return replaced, dumps(replaced)
    except (orjson.JSONEncodeError, TypeError, ValueError):  # metadata passed the check above
        bare = answer(Job.of(result, keep_metadata=False), verdict, attempts=result.attempts)
        return bare, dumps(bare)


def _without_headers(
    message: Incoming, final: ExecutionResult, exc: Exception, first_failure_at: datetime
) -> DeadLetter | None:
    """The DLQ record of a request whose own could not be built: its key and value (base64,
    always encodable) and an internal_error naming the answer's error and why."""
    error_type = final.error.type.value if final.error else "unknown"
    reduced = answer(
        Job.of(final, keep_metadata=False),
        Verdict.failure(
            ErrorType.INTERNAL_ERROR,
            message=f"No DLQ record could be built for this request's {error_type} answer "
            f"({exc!r}): kept without its headers",
        ),
        attempts=final.attempts,
    )
    try:
        return dead_letter(replace(message, headers=()), reduced, first_failure_at=first_failure_at)
    except Exception:
        log.exception("could not build even a reduced DLQ record: the request is not in the DLQ")
        return None


class Publisher:
    """Sends answers through ``send`` (the intake's sink): see the module docstring."""

    def __init__(
        self,
        send: Send,
        topics: Topics,
        *,
        send_all: SendAll | None = None,
        reply_to_timeout: float,
        publish_timeout: float,
        artifacts_timeout: float = 10.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._send = send
        self._send_many = send_all or _one_by_one(send)
        self.topics = topics
        self.reply_to_timeout = reply_to_timeout
        self.publish_timeout = publish_timeout
        self.artifacts_timeout = artifacts_timeout
        self.max_message_bytes = max_message_bytes

    async def publish(
        self,
        message: Incoming,
        result: ExecutionResult,
        *,
        reply_to: str | None = None,
        first_failure_at: datetime | None = None,
    ) -> ExecutionResult | None:
        """Publish the answer to ``message``; returns once the broker has all of it, with the
        answer on the results topic (None when even a reduced answer was refused there)."""
        source = message.position_id
        if result.artifacts:
            result = await self._artifacts(result)
        result, value = encode(result)
        if reply_to and reply_to != self.topics.results:
            failure = await self._copy(reply_to, result, value, source)
            if failure is not None:
                result, value = encode(result.model_copy(update={"reply_to_error": failure}))
        published: ExecutionResult | None = result
        try:
            async with asyncio.timeout(self.publish_timeout):
                await self._until_acked(self.topics.results, result, value, source)
        except PublishRefusedError as exc:
            published = await self._reduced(result, value, exc, source)
        except TimeoutError:
            log.error(
                "the results topic did not acknowledge the answer within %gs; "
                "dead-lettering the request",
                self.publish_timeout,
            )
            published = None
        record = self._dead_letter(message, result, published, first_failure_at)
        if record is not None:
            await self._send_dead(record)
        return published

    async def publish_all(
        self, answers: Sequence[tuple[Incoming, ExecutionResult]], first_failure_at: datetime
    ) -> list[ExecutionResult | None]:
        """Publish many plain answers (no artifacts, no ``reply_to``: a burst of refused
        requests) with their sends batched: every result at once, then every DLQ record their
        answers call for, each step's acknowledgements awaited together.  Whatever fails is
        done alone after, as ``publish`` would: a result not acknowledged or refused takes
        ``publish``'s whole path (retries, a reduced answer, dead-lettering); a DLQ record not
        acknowledged is re-sent until it is.  A batch not acknowledged within
        ``publish_timeout`` counts as failed, so an answer may take up to twice that before
        its request is dead-lettered.  Returns the answers published on the results topic, in
        order (None where even a reduced answer was refused)."""
        encoded = [encode(result) for _, result in answers]
        outcomes = await self._send_all_within(
            [
                self._result_message(self.topics.results, result, value, message.position_id)
                for (message, _), (result, value) in zip(answers, encoded, strict=True)
            ]
        )
        finals: list[ExecutionResult | None] = [None] * len(answers)
        alone: list[int] = []
        dead: list[DeadLetter] = []
        for i, ((message, _), (result, _), outcome) in enumerate(
            zip(answers, encoded, outcomes, strict=True)
        ):
            if isinstance(outcome, BrokerError):
                alone.append(i)
                continue
            finals[i] = result
            record = self._dead_letter(message, result, result, first_failure_at)
            if record is not None:
                dead.append(record)
        dead_outcomes = await self._send_all_within(
            [(self.topics.dlq, r.record.dlq_id.encode(), r.value, r.headers) for r in dead]
        )
        unsent = [r for r, o in zip(dead, dead_outcomes, strict=True) if isinstance(o, BrokerError)]

        async def one(i: int) -> None:
            message, result = answers[i]
            with job_context(result.execution_id, result.correlation_id):
                finals[i] = await self.publish(message, result, first_failure_at=first_failure_at)

        async def dead_again(record: DeadLetter) -> None:
            with job_context(record.record.execution_id, record.record.correlation_id):
                await self._send_dead(record)

        await asyncio.gather(*(one(i) for i in alone), *(dead_again(r) for r in unsent))
        return finals

    async def _send_all_within(self, messages: list[Outgoing]) -> list[Outcome]:
        """``send_all`` bounded by ``publish_timeout``: past it, every message counts as
        failed (each is then retried alone, under its own bound)."""
        if not messages:
            return []
        try:
            async with asyncio.timeout(self.publish_timeout):
                return await self._send_many(messages)
        except TimeoutError:
            failed = BrokerError(f"not acknowledged within {self.publish_timeout:g}s")
            return [failed] * len(messages)

    def _dead_letter(
        self,
        message: Incoming,
        result: ExecutionResult,
        published: ExecutionResult | None,
        first_failure_at: datetime | None,
    ) -> DeadLetter | None:
        """The DLQ record the answer calls for (its error type, or no answer published at
        all), or None."""
        dead = published is None or (
            published.error is not None and published.error.type in DEAD_LETTER_TYPES
        )
        if not dead:
            return None
        final = published or answer(
            Job.of(result),
            Verdict.failure(
                ErrorType.INTERNAL_ERROR,
                message="No answer could be published: the results topic refused it or did "
                f"not acknowledge it within {self.publish_timeout:g}s",
            ),
            attempts=result.attempts,
        )
        at = first_failure_at or now()
        try:
            return dead_letter(message, final, first_failure_at=at)
        except Exception as exc:
            # Raised here, after the answer was sent, it would have the intake send the answer
            # (and a batch's every answer) again and lose the request: it is dead-lettered
            # without its headers instead (the foreign part of the record: a replay count past
            # 64 bits once was one), saying why, as ``encode`` replaces an unencodable result.
            log.exception("could not build the DLQ record; keeping the request without headers")
            return _without_headers(message, final, exc, at)

    async def _send_dead(self, record: DeadLetter) -> None:
        try:
            dlq_key = record.record.dlq_id.encode()
            await self._send_acked(self.topics.dlq, dlq_key, record.value, record.headers)
        except PublishRefusedError as exc:
            log.error("the DLQ topic refused a %d-byte record: %s", len(record.value), exc)

    async def _artifacts(self, result: ExecutionResult) -> ExecutionResult:
        """Publish the result's artifacts; the result listing those that landed (with their
        partition and offset), the others moved to ``artifacts_skipped`` with why."""
        data = pending(result)
        landed: list[Artifact] = []
        skipped = list(result.artifacts_skipped)
        execution_id, corr = result.execution_id, result.correlation_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.artifacts_timeout
        for artifact in result.artifacts:
            body = data.get(artifact.name)
            size = artifacts.message_size(artifact, execution_id, corr)
            reason: str | None = None
            where: tuple[int, int] | None = None
            if body is None:
                reason = "its bytes were lost on the way (a bug): not published"
            elif size > self.max_message_bytes:
                reason = (
                    f"its {size}-byte message exceeds the largest message "
                    f"(TAKO_KAFKA_MAX_MESSAGE_BYTES={self.max_message_bytes})"
                )
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        where = await self._send_acked(
                            self.topics.artifacts,
                            artifacts.artifact_key(execution_id, artifact.name),
                            body,
                            artifacts.headers(artifact, execution_id, corr),
                        )
                except PublishRefusedError as exc:
                    reason = f"refused by the artifacts topic: {exc}"
                except TimeoutError:
                    reason = f"not acknowledged within {self.artifacts_timeout:g}s"
            if reason is not None:
                log.warning("artifact %r not published: %s", artifact.name, reason)
                skipped.append(SkippedArtifact(name=artifact.name, reason=reason))
                continue
            partition, offset = where if where is not None else (None, None)
            landed.append(artifact.model_copy(update={"partition": partition, "offset": offset}))
        published = result.model_copy(update={"artifacts": landed, "artifacts_skipped": skipped})
        published.hold_artifact_bytes({})  # sent: the bytes need not be held any longer
        return published

    async def _copy(
        self, topic: str, result: ExecutionResult, value: bytes, source: str
    ) -> str | None:
        """Send the copy to ``reply_to`` within the bound; why it failed, or None."""
        try:
            async with asyncio.timeout(self.reply_to_timeout):
                await self._until_acked(topic, result, value, source)
        except TimeoutError:
            reason = f"not acknowledged within {self.reply_to_timeout:g}s"
        except PublishRefusedError as exc:
            reason = f"refused: {exc}"
        else:
            return None
        log.warning("the copy to reply_to %s failed: %s", topic, reason)
        return f"delivery to {topic} failed: {reason}"

    async def _reduced(
        self, result: ExecutionResult, value: bytes, refusal: PublishRefusedError, source: str
    ) -> ExecutionResult | None:
        """The results topic refused the answer (too large for it, say): publish one that says
        so, without the output; None when even that is refused."""
        log.error("the results topic refused a %d-byte result: %s", len(value), refusal)
        verdict = Verdict.failure(
            ErrorType.INTERNAL_ERROR,
            message=f"The results topic refused this job's {len(value)}-byte result ({refusal})",
        )
        reduced = answer(
            Job.of(result, keep_metadata=False),
            verdict,
            attempts=result.attempts,
            started_at=result.started_at,
        )
        try:
            async with asyncio.timeout(self.publish_timeout):
                await self._until_acked(self.topics.results, reduced, dumps(reduced), source)
        except (PublishRefusedError, TimeoutError) as exc:
            log.error("the results topic did not take even the reduced answer: %r", exc)
            return None
        return reduced

    @staticmethod
    def _result_message(topic: str, result: ExecutionResult, value: bytes, source: str) -> Outgoing:
        headers = [
            (CORRELATION_HEADER, result.correlation_id.encode()),
            ("x-tako-status", result.status.value.encode()),
            (SOURCE_HEADER, source.encode()),
        ]
        return topic, result.execution_id.encode(), value, headers

    async def _until_acked(
        self, topic: str, result: ExecutionResult, value: bytes, source: str
    ) -> None:
        await self._send_acked(*self._result_message(topic, result, value, source))

    async def _send_acked(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> tuple[int, int] | None:
        """One message, re-sent (alone) until the broker acknowledges it; a refusal for good
        (``PublishRefusedError``) is raised at once.  Where it landed, if the sink says."""
        delay = RETRY_FIRST
        failures = 0
        while True:
            try:
                where = await self._send(topic, key, value, headers)
                if failures:
                    log.info("published to %s after %d failed attempt(s)", topic, failures)
                return where
            except PublishRefusedError:
                raise
            except BrokerError as exc:
                failures += 1
                if failures == 1:  # said once per message, not at every retry
                    log.warning("publishing to %s failed (%s); retrying until it works", topic, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP)
