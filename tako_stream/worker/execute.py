"""From a validated request to its one terminal result: limits → pool → container → classify.

Kafka is not known here: the intake hands a request in and publishes what comes back, so the
same code serves every way a job may arrive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import orjson

from tako_stream.core.errors import (
    ErrorType,
    InvalidRequestError,
    SandboxError,
    SandboxUnavailableError,
    Status,
    classify_exception,
    classify_exit,
    default_message,
    exception_message,
    parse_traceback,
)
from tako_stream.core.jobtypes import JobTypes
from tako_stream.core.models import (
    ErrorInfo,
    ExecutionRequest,
    ExecutionResult,
    JobType,
    Timing,
    parse_size,
)
from tako_stream.kafka.codec import dumps
from tako_stream.sandbox.docker import Limits, SandboxRun
from tako_stream.sandbox.pool import CancelledBeforeStart, SandboxPool
from tako_stream.sandbox.protocol import decode_text, encode_job
from tako_stream.settings import Settings
from tako_stream.worker.breaker.state import Breaker, Outcome, Ticket
from tako_stream.worker.retry import RetryPolicy

log = logging.getLogger(__name__)

#: Statuses an error type ends in, where it is not plain ``failed``.
_STATUS_OF = {
    ErrorType.TIMEOUT: Status.TIMEOUT,
    ErrorType.OOM: Status.OOM,
    ErrorType.CANCELLED: Status.CANCELLED,
    ErrorType.INVALID_REQUEST: Status.REJECTED,
    ErrorType.SERVICE_UNAVAILABLE: Status.REJECTED,
}


def now() -> datetime:
    return datetime.now(UTC)


def resolve_limits(request: ExecutionRequest, job_types: JobTypes) -> Limits:
    """The container's limits, or ``InvalidRequestError`` naming what the job type forbids."""
    job_type = job_types.get(request.job_type)
    if job_type is None:
        known = ", ".join(sorted(job_types))
        raise InvalidRequestError(
            [f"job_type: unknown job type {request.job_type!r} (known: {known})"],
            request.execution_id,
        )
    problems = []
    timeout = request.timeout if request.timeout is not None else job_type.timeout
    if timeout > job_type.max_timeout:
        problems.append(
            f"timeout: {timeout:g}s exceeds the maximum of job type "
            f"{job_type.name!r} ({job_type.max_timeout:g}s)"
        )
    memory = parse_size(job_type.memory)
    if request.memory_limit is not None:
        memory = parse_size(request.memory_limit)
        if memory > parse_size(job_type.max_memory):
            problems.append(
                f"memory_limit: {request.memory_limit} exceeds the maximum of job type "
                f"{job_type.name!r} ({job_type.max_memory})"
            )
    if problems:
        raise InvalidRequestError(problems, request.execution_id)
    return replace(default_limits(job_type), memory=memory, timeout=timeout)


def default_limits(job_type: JobType) -> Limits:
    """A job type's container when a request asks for nothing special (the warm pool's shape)."""
    return Limits(
        image=job_type.image,
        memory=parse_size(job_type.memory),
        cpus=job_type.cpus,
        pids_limit=job_type.pids_limit,
        timeout=job_type.timeout,
        runtime=job_type.runtime,
    )


@dataclass(frozen=True)
class Verdict:
    """The classification of one container run."""

    status: Status
    error: ErrorInfo | None
    exit_code: int | None
    output: object = None


def classify(run: SandboxRun, limits: Limits) -> Verdict:
    """Turn what the container reported into a status, an error and an output."""
    report = run.collected.report
    if report is None:
        if run.outer_timeout:
            return _error(ErrorType.TIMEOUT, None, timeout=limits.timeout)
        if run.oom_killed:
            return _error(ErrorType.OOM, 137)
        detail = decode_text(run.collected.diagnostics).strip()[-500:]
        return _error(
            ErrorType.INTERNAL_ERROR,
            run.container_exit,
            message=f"Sandbox ended without a report (exit {run.container_exit}). {detail}".strip(),
        )
    if report.timed_out:
        return _error(ErrorType.TIMEOUT, None, timeout=limits.timeout)
    code = report.exit_code
    if report.cancelled and run.cancel_sent and code != 0:
        # SIGTERM ends most jobs (143, as in Tako VM); one that ignores it is SIGKILLed (137)
        message = "Execution cancelled" + (
            "" if code == 143 else " (it did not stop on SIGTERM and was killed)"
        )
        return _error(ErrorType.CANCELLED, code, message=message)
    if code == 0:
        return _output(run, report.result_error)
    if code is None:
        return _error(ErrorType.INTERNAL_ERROR, None, message="Sandbox lost the job's exit status")
    signal_type = classify_exit(code, oom_killed=run.oom_killed)
    if signal_type is not None:
        return _error(signal_type, code)
    names = report.exception or [n for n in [parse_traceback(report.stderr_tail)] if n]
    if names:
        message = exception_message(report.stderr_tail) or names[0]
        return _error(classify_exception(names), code, message=message)
    return _error(ErrorType.NONZERO_EXIT, code, message=f"Process exited with code {code}")


def _error(
    error_type: ErrorType,
    exit_code: int | None,
    *,
    message: str | None = None,
    timeout: float | None = None,
) -> Verdict:
    return Verdict(
        status=_STATUS_OF.get(error_type, Status.FAILED),
        error=ErrorInfo(
            type=error_type, message=message or default_message(error_type, timeout=timeout)
        ),
        exit_code=exit_code,
    )


def _output(run: SandboxRun, result_error: str | None) -> Verdict:
    raw = run.collected.result
    if result_error is not None:
        return _error(ErrorType.INVALID_OUTPUT, 0, message=result_error)
    if raw is None:
        return Verdict(status=Status.SUCCEEDED, error=None, exit_code=0)
    try:
        output = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _error(ErrorType.INVALID_OUTPUT, 0, message=f"result.json is not valid JSON: {exc}")
    if not isinstance(output, dict):
        return _error(
            ErrorType.INVALID_OUTPUT,
            0,
            message=f"result.json must hold a JSON object, not {type(output).__name__}",
        )
    return Verdict(status=Status.SUCCEEDED, error=None, exit_code=0, output=output)


class Executor:
    """Runs requests in the pool and answers each with exactly one result."""

    def __init__(
        self,
        pool: SandboxPool,
        job_types: JobTypes,
        settings: Settings,
        *,
        breaker: Breaker | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.pool = pool
        self.job_types = job_types
        self.settings = settings
        self.breaker = breaker
        self.retry = retry or RetryPolicy(
            max_attempts=settings.retry_max_attempts, base_delay=settings.retry_base_delay
        )

    async def _run_with_retries(
        self,
        job: bytes,
        limits: Limits,
        execution_id: str,
        cancel: asyncio.Event | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> tuple[SandboxRun | None, int, SandboxError | None]:
        """Run the container, retrying transient Docker failures; (run, attempts, last error).

        The breaker is asked before each attempt: while it is open no container is tried and
        the job is answered at once; every Docker failure and (while it matters) success is
        reported to it.
        """
        attempts = 0
        failure: SandboxError | None = None
        s = self.settings
        for attempt in range(1, self.retry.max_attempts + 1):
            ticket = self.breaker.acquire() if self.breaker else Ticket(None, trial=False)
            if ticket is None:
                log.info("circuit breaker open: not trying Docker")
                return None, attempts, failure
            attempts += 1
            try:
                run = await self.pool.run(
                    job,
                    limits,
                    execution_id=execution_id,
                    stdout_cap=s.stdout_limit,
                    stderr_cap=s.stderr_limit,
                    result_cap=s.output_limit,
                    cancel=cancel,
                    on_start=on_start if attempt == 1 else None,
                )
            except SandboxError as exc:
                failure = exc
                log.warning("attempt %d: %s", attempt, exc)
                await self._report(Outcome.FAILURE, str(exc))
                if not isinstance(exc, SandboxUnavailableError):
                    return None, attempts, failure  # fail closed: never retried
                if attempt < self.retry.max_attempts:
                    await asyncio.sleep(self.retry.delay(attempt))
                if cancel is not None and cancel.is_set():
                    raise CancelledBeforeStart() from exc
                continue
            finally:
                ticket.release()
            await self._report(Outcome.SUCCESS, None)
            return run, attempts, None
        return None, attempts, failure

    async def _report(self, outcome: Outcome, detail: str | None) -> None:
        if self.breaker is not None:
            await self.breaker.record(outcome, source="job", detail=detail)

    def rejected(
        self,
        exc: InvalidRequestError,
        *,
        execution_id: str,
        correlation_id: str,
        metadata: dict[str, object] | None = None,
    ) -> ExecutionResult:
        """The ``invalid_request`` answer, naming each bad field."""
        return ExecutionResult(
            execution_id=execution_id,
            correlation_id=correlation_id,
            status=Status.REJECTED,
            success=False,
            error=ErrorInfo(type=ErrorType.INVALID_REQUEST, message="; ".join(exc.errors)),
            worker_id=self.settings.worker_id,
            finished_at=now(),
            metadata=metadata,
        )

    def cancelled(
        self,
        request: ExecutionRequest,
        correlation_id: str,
        *,
        queued: float | None = None,
        started_at: datetime | None = None,
    ) -> ExecutionResult:
        """The answer to a job cancelled before it ran: no container, no exit code."""
        return ExecutionResult(
            execution_id=request.execution_id or "",
            correlation_id=correlation_id,
            job_type=request.job_type,
            worker_id=self.settings.worker_id,
            started_at=started_at,
            metadata=request.metadata,
            status=Status.CANCELLED,
            success=False,
            error=ErrorInfo(type=ErrorType.CANCELLED, message="Execution cancelled before it ran"),
            finished_at=now(),
            timing=Timing(queued=queued),
        )

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
        execution_id = request.execution_id or ""
        started_at = now()
        base = {
            "execution_id": execution_id,
            "correlation_id": correlation_id,
            "job_type": request.job_type,
            "worker_id": self.settings.worker_id,
            "started_at": started_at,
            "metadata": request.metadata,
        }
        try:
            limits = resolve_limits(request, self.job_types)
        except InvalidRequestError as exc:
            return self.rejected(
                exc,
                execution_id=execution_id,
                correlation_id=correlation_id,
                metadata=request.metadata,
            ).model_copy(update={"job_type": request.job_type})
        s = self.settings
        job = encode_job(
            code=request.code,
            input_json=dumps(request.input_data),
            timeout=limits.timeout,
            stdout_cap=s.stdout_limit,
            stderr_cap=s.stderr_limit,
            result_cap=s.output_limit,
            cancel_grace=s.cancel_grace,
        )
        try:
            run, attempts, failure = await self._run_with_retries(
                job, limits, execution_id, cancel, on_start
            )
        except CancelledBeforeStart:
            return self.cancelled(request, correlation_id, queued=queued, started_at=started_at)
        if run is None:
            error_type = failure.error_type if failure else ErrorType.SERVICE_UNAVAILABLE
            message = str(failure) if failure else default_message(error_type)
            return ExecutionResult(
                **base,
                status=_STATUS_OF.get(error_type, Status.FAILED),
                success=False,
                error=ErrorInfo(type=error_type, message=message),
                attempts=attempts,
                finished_at=now(),
                timing=Timing(queued=queued),
            )
        verdict = classify(run, limits)
        collected, report = run.collected, run.collected.report
        return ExecutionResult(
            **base,
            status=verdict.status,
            success=verdict.status is Status.SUCCEEDED,
            output=verdict.output,
            stdout=decode_text(collected.stdout),
            stderr=decode_text(collected.stderr),
            stdout_truncated=collected.stdout_truncated or bool(report and report.stdout_truncated),
            stderr_truncated=collected.stderr_truncated or bool(report and report.stderr_truncated),
            exit_code=verdict.exit_code,
            error=verdict.error,
            execution_time=round(
                report.elapsed if report and report.elapsed is not None else run.seconds, 6
            ),
            attempts=attempts,
            finished_at=now(),
            timing=Timing(queued=queued, sandbox=round(run.seconds, 6), warm=run.warm),
        )
