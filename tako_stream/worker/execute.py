"""From a validated request to its one terminal result: limits → pool → sandbox → verdict.

Kafka is not known here: the intake hands a request in and publishes what comes back, so the
same code serves every way a job may arrive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tako_stream.core.errors import (
    CancelledBeforeStart,
    ErrorType,
    InvalidRequestError,
    SandboxError,
    SandboxUnavailableError,
)
from tako_stream.core.jobtypes import JobTypes, Limits, default_limits
from tako_stream.core.models import ExecutionRequest, ExecutionResult
from tako_stream.core.requirements import unsatisfied
from tako_stream.kafka.codec import dumps
from tako_stream.sandbox.base import SandboxRun
from tako_stream.sandbox.pool import SandboxPool
from tako_stream.sandbox.protocol import encode_job
from tako_stream.settings import OutputCaps, RetryPolicy
from tako_stream.worker.breaker.handle import Breaker, Outcome
from tako_stream.worker.verdict import Job, Verdict, answer, classify, now

log = logging.getLogger(__name__)


class Executor:
    """Runs requests in the pool and answers each with exactly one result."""

    def __init__(
        self,
        pool: SandboxPool,
        job_types: JobTypes,
        *,
        worker_id: str,
        caps: OutputCaps,
        retry: RetryPolicy,
        cancel_grace: float,
        breaker: Breaker | None = None,
    ) -> None:
        self.pool = pool
        self.job_types = job_types
        self.worker_id = worker_id
        self.caps = caps
        self.retry = retry
        self.cancel_grace = cancel_grace
        self.breaker = breaker

    async def execute(
        self,
        request: ExecutionRequest,
        correlation_id: str,
        *,
        queued: float | None = None,
        cancel: asyncio.Event | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> ExecutionResult:
        """Run one request; ``cancel`` set (before or while it runs) cancels it; ``on_start``
        is told when it gets a container slot."""
        job = Job.for_request(
            request,
            execution_id=request.execution_id or "",
            correlation_id=correlation_id,
            worker_id=self.worker_id,
            job_types=self.job_types,
            queued=queued,
        )
        started_at = now()
        try:
            limits = self.job_types.limits(request)
        except InvalidRequestError as exc:
            return answer(job, Verdict.rejected(exc.errors))
        if request.requirements:
            refused = await self._check_requirements(request, limits)
            if refused is not None:
                return answer(job, refused, started_at=started_at)
        payload = encode_job(
            code=request.code,
            input_json=dumps(request.input_data),
            timeout=limits.timeout,
            caps=self.caps,
            cancel_grace=self.cancel_grace,
        )
        try:
            run, attempts, failure = await self._run_with_retries(
                payload, limits, job.execution_id, cancel, on_start
            )
        except CancelledBeforeStart:
            return answer(job, Verdict.cancelled_before_start(), started_at=started_at)
        if run is None:
            error_type = failure.error_type if failure else ErrorType.SERVICE_UNAVAILABLE
            verdict = Verdict.failure(error_type, message=str(failure) if failure else None)
            return answer(job, verdict, attempts=attempts, started_at=started_at)
        verdict = classify(run, limits)
        return answer(job, verdict, run=run, attempts=attempts, started_at=started_at)

    async def _check_requirements(
        self, request: ExecutionRequest, limits: Limits
    ) -> Verdict | None:
        """None when the job type's image satisfies every requirement of ``request``, else the
        verdict: a ``dependency_error`` naming each one it does not, or why the image's
        distributions could not be learnt (the job is never run unchecked).

        Nothing is installed: the code is untrusted and has no network.  An engine that does
        not answer is retried as a job's run is, and reported to the breaker."""
        requirements = request.requirements or []
        # Listed in the job type's own container, not this request's: one listing serves every
        # job on the image, and a request's small limits must not fail it for the others.
        listing = default_limits(self.job_types[request.job_type.partition("@")[0]])
        failure: SandboxError | None = None
        for attempt in range(1, self.retry.max_attempts + 1):
            ticket = self.breaker.acquire() if self.breaker else None
            if self.breaker is not None and ticket is None:
                log.info("circuit breaker open: not listing %s", listing.image)
                break
            try:
                installed = await self.pool.sandbox.distributions(listing)
            except SandboxUnavailableError as exc:
                failure = exc
                log.warning("listing %s, attempt %d: %s", listing.image, attempt, exc)
                await self._report(Outcome.FAILURE, str(exc))
                if attempt < self.retry.max_attempts:
                    await asyncio.sleep(self.retry.delay(attempt))
                continue
            except SandboxError as exc:  # the image is missing, or its listing makes no sense
                return Verdict.failure(exc.error_type, message=str(exc))
            finally:
                if ticket is not None:
                    ticket.release()
            await self._report(Outcome.SUCCESS, None)
            try:
                missing = unsatisfied(requirements, installed)
            except ValueError as exc:  # validated with the request already; kept fail-closed
                return Verdict.rejected([f"requirements: {exc}"])
            if not missing:
                return None
            return Verdict.failure(
                ErrorType.DEPENDENCY_ERROR,
                message=f"Requirements not satisfied by job type {request.job_type!r} "
                f"(nothing is installed at run time): " + "; ".join(missing),
            )
        why = failure if failure is not None else "the circuit breaker is open"
        return Verdict.failure(
            ErrorType.SERVICE_UNAVAILABLE,
            message=f"Could not list the distributions of {listing.image}: {why}",
        )

    async def _run_with_retries(
        self,
        payload: bytes,
        limits: Limits,
        execution_id: str,
        cancel: asyncio.Event | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> tuple[SandboxRun | None, int, SandboxError | None]:
        """Run the job, retrying transient sandbox failures; (run, attempts, last error).

        The breaker is asked before each attempt: while it is open no sandbox is tried and the
        job is answered at once; every failure of the engine (unreachable, erring, not
        answering) and, while it matters, every success is reported to it.
        """
        attempts = 0
        failure: SandboxError | None = None
        for attempt in range(1, self.retry.max_attempts + 1):
            ticket = self.breaker.acquire() if self.breaker else None
            if self.breaker is not None and ticket is None:
                log.info("circuit breaker open: not trying Docker")
                return None, attempts, failure
            attempts += 1
            try:
                run = await self.pool.run(
                    payload,
                    limits,
                    execution_id=execution_id,
                    caps=self.caps,
                    cancel=cancel,
                    on_start=on_start if attempt == 1 else None,
                )
            except SandboxError as exc:
                failure = exc
                log.warning("attempt %d: %s", attempt, exc)
                if not isinstance(exc, SandboxUnavailableError):
                    # A container the engine refused (a job type's missing image, a runtime it
                    # does not know): a configuration error, not the engine's health, so the
                    # breaker is not told; fail closed, never retried.
                    return None, attempts, failure
                await self._report(Outcome.FAILURE, str(exc))
                if attempt < self.retry.max_attempts:
                    await asyncio.sleep(self.retry.delay(attempt))
                if cancel is not None and cancel.is_set():
                    raise CancelledBeforeStart() from exc
                continue
            finally:
                if ticket is not None:
                    ticket.release()
            await self._report(Outcome.SUCCESS, None)
            return run, attempts, None
        return None, attempts, failure

    async def _report(self, outcome: Outcome, detail: str | None) -> None:
        if self.breaker is not None:
            await self.breaker.record(outcome, source="job", detail=detail)
