"""From what happened to a request to the one result it gets.

``classify`` turns a sandbox run into a ``Verdict``; the other ``Verdict`` constructors cover the
requests that never ran (rejected, cancelled while queued, the engine unavailable, a bug of ours).
``answer`` is the only place an ``ExecutionResult`` is built, so every answer, whatever path it
took, has the same fields filled the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from tako_stream.core.classify import (
    classify_exit,
    classify_failure,
    exception_message,
    parse_traceback,
)
from tako_stream.core.errors import ErrorType, Status, default_message
from tako_stream.core.jobtypes import JobTypes, Limits
from tako_stream.core.models import (
    MAX_JSON_DEPTH,
    ErrorInfo,
    ExecutionRequest,
    ExecutionResult,
    Relationship,
    ResourceUsage,
    Timing,
    too_deep,
)
from tako_stream.kafka.codec import loads
from tako_stream.sandbox.base import SandboxRun
from tako_stream.sandbox.protocol import Report, decode_text
from tako_stream.worker.artifacts import attach

#: Statuses an error type ends in, where it is not plain ``failed``.
_STATUS_OF = {
    ErrorType.TIMEOUT: Status.TIMEOUT,
    ErrorType.STARTUP_TIMEOUT: Status.TIMEOUT,
    ErrorType.OOM: Status.OOM,
    ErrorType.CANCELLED: Status.CANCELLED,
    ErrorType.INVALID_REQUEST: Status.REJECTED,
    ErrorType.SERVICE_UNAVAILABLE: Status.REJECTED,
}


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Verdict:
    """How a request ended: a status, an error, an exit code and the job's output."""

    status: Status
    error: ErrorInfo | None
    exit_code: int | None
    output: object = None

    @classmethod
    def success(cls, output: object = None) -> Verdict:
        return cls(status=Status.SUCCEEDED, error=None, exit_code=0, output=output)

    @classmethod
    def failure(
        cls,
        error_type: ErrorType,
        exit_code: int | None = None,
        *,
        message: str | None = None,
        timeout: float | None = None,
    ) -> Verdict:
        return cls(
            status=_STATUS_OF.get(error_type, Status.FAILED),
            error=ErrorInfo(
                type=error_type, message=message or default_message(error_type, timeout=timeout)
            ),
            exit_code=exit_code,
        )

    @classmethod
    def rejected(cls, problems: list[str]) -> Verdict:
        """A request that cannot be run as sent, naming each bad field."""
        return cls.failure(ErrorType.INVALID_REQUEST, message="; ".join(problems))

    @classmethod
    def cancelled_before_start(cls) -> Verdict:
        return cls.failure(ErrorType.CANCELLED, message="Execution cancelled before it ran")

    @classmethod
    def internal(cls, exc: BaseException) -> Verdict:
        return cls.failure(ErrorType.INTERNAL_ERROR, message=f"Internal error: {exc!r}")


@dataclass(frozen=True)
class Provenance:
    """What every answer to a request says of it, whether it ran or not: the job type version
    it is for, hashes of its code and input, its idempotency key and lineage."""

    job_ref: str | None = None
    code_hash: str | None = None
    input_hash: str | None = None
    idempotency_key: str | None = None
    parent_execution_id: str | None = None
    relationship: Relationship | None = None

    @classmethod
    def of_request(cls, request: ExecutionRequest, job_types: JobTypes | None) -> Provenance:
        return cls(
            job_ref=job_types.ref(request) if job_types is not None else None,
            code_hash=code_hash(request.code),
            input_hash=input_hash(request.input_data),
            idempotency_key=request.idempotency_key,
            parent_execution_id=request.parent_execution_id,
            relationship=request.relationship,
        )

    @classmethod
    def of_result(cls, result: ExecutionResult) -> Provenance:
        return cls(
            job_ref=result.job_ref,
            code_hash=result.code_hash,
            input_hash=result.input_hash,
            idempotency_key=result.idempotency_key,
            parent_execution_id=result.parent_execution_id,
            relationship=result.relationship,
        )


def code_hash(code: str) -> str:
    """SHA-256 (hex) of the code as written to /code/main.py (lone surrogates kept, as there)."""
    return hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()


def input_hash(input_data: object) -> str | None:
    """SHA-256 (hex) of the input as canonical JSON: sorted keys, no spaces, so the same input
    hashes the same whatever order its keys came in; None if it has no JSON form (a request
    that validated always has one)."""
    try:
        canonical = orjson.dumps(input_data, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        return None
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class Job:
    """Whom an answer is for: the request's ids and what it passes through to its result."""

    execution_id: str
    correlation_id: str
    worker_id: str
    job_type: str | None = None
    metadata: dict[str, object] | None = None
    #: Seconds from the request's produce time to its pick-up, when known.
    queued: float | None = None
    provenance: Provenance = field(default_factory=Provenance)
    #: What a run already measured, for an answer rebuilt from its result (``Job.of``); an
    #: answer given a run takes it from the run.
    usage: ResourceUsage | None = None

    @classmethod
    def for_request(
        cls,
        request: ExecutionRequest,
        *,
        execution_id: str,
        correlation_id: str,
        worker_id: str,
        job_types: JobTypes | None,
        queued: float | None = None,
    ) -> Job:
        """Whom an answer to ``request`` is for, with everything it carries to its result
        (``job_types`` resolves its ``job_ref``)."""
        return cls(
            execution_id=execution_id,
            correlation_id=correlation_id,
            worker_id=worker_id,
            job_type=request.job_type,
            metadata=request.metadata,
            queued=queued,
            provenance=Provenance.of_request(request, job_types),
        )

    @classmethod
    def of(cls, result: ExecutionResult, *, keep_metadata: bool = True) -> Job:
        """Whom ``result`` answers (to build another answer for the same request)."""
        return cls(
            execution_id=result.execution_id,
            correlation_id=result.correlation_id,
            worker_id=result.worker_id,
            job_type=result.job_type,
            metadata=result.metadata if keep_metadata else None,
            queued=result.timing.queued,
            provenance=Provenance.of_result(result),
            usage=result.resource_usage,
        )


def resource_usage(report: Report | None, elapsed: float) -> ResourceUsage:
    """What a run's job used: the supervisor's figures (None where it had none), and the same
    wall time as the result's ``execution_time``."""
    rss_kb = report.max_rss_kb if report is not None else None
    return ResourceUsage(
        max_rss_mb=round(rss_kb / 1024, 1) if rss_kb is not None else None,
        cpu_time_ms=report.cpu_ms if report is not None else None,
        wall_time_ms=round(elapsed * 1000),
    )


def answer(
    job: Job,
    verdict: Verdict,
    *,
    run: SandboxRun | None = None,
    attempts: int = 0,
    started_at: datetime | None = None,
) -> ExecutionResult:
    """The result of ``job``; with ``run``, what the sandbox captured fills in its output."""
    captured: dict[str, Any] = {}
    usage = job.usage
    if run is not None:
        collected, report = run.collected, run.collected.report
        elapsed = report.elapsed if report and report.elapsed is not None else run.seconds
        captured = {
            "stdout": decode_text(collected.stdout),
            "stderr": decode_text(collected.stderr),
            "stdout_truncated": collected.stdout_truncated
            or bool(report and report.stdout_truncated),
            "stderr_truncated": collected.stderr_truncated
            or bool(report and report.stderr_truncated),
            "execution_time": round(elapsed, 6),
        }
        usage = resource_usage(report, elapsed)
    timing = (
        Timing(queued=job.queued, sandbox=round(run.seconds, 6), warm=run.warm)
        if run is not None
        else Timing(queued=job.queued)
    )
    result = ExecutionResult(
        execution_id=job.execution_id,
        correlation_id=job.correlation_id,
        status=verdict.status,
        success=verdict.status is Status.SUCCEEDED,
        output=verdict.output,
        exit_code=verdict.exit_code,
        error=verdict.error,
        job_type=job.job_type,
        attempts=attempts,
        worker_id=job.worker_id,
        started_at=started_at,
        finished_at=now(),
        metadata=job.metadata,
        timing=timing,
        resource_usage=usage,
        job_ref=job.provenance.job_ref,
        code_hash=job.provenance.code_hash,
        input_hash=job.provenance.input_hash,
        idempotency_key=job.provenance.idempotency_key,
        parent_execution_id=job.provenance.parent_execution_id,
        relationship=job.provenance.relationship,
        **captured,
    )
    if run is not None:
        attach(result, run.collected)
    return result


def classify(run: SandboxRun, limits: Limits) -> Verdict:
    """Turn what the sandbox reported into a status, an error and an output."""
    report = run.collected.report
    if report is None:
        if run.outer_timeout:
            return Verdict.failure(ErrorType.TIMEOUT, timeout=limits.timeout)
        if run.oom_killed:
            return Verdict.failure(ErrorType.OOM, 137)
        detail = decode_text(run.collected.diagnostics).strip()[-500:]
        return Verdict.failure(
            ErrorType.INTERNAL_ERROR,
            run.container_exit,
            message=f"Sandbox ended without a report (exit {run.container_exit}). {detail}".strip(),
        )
    if report.timed_out:
        return Verdict.failure(ErrorType.TIMEOUT, timeout=limits.timeout)
    code = report.exit_code
    if report.cancelled and run.cancel_sent and code != 0:
        # SIGTERM ends most jobs (143, as in Tako VM); one that ignores it is SIGKILLed (137)
        message = "Execution cancelled" + (
            "" if code == 143 else " (it did not stop on SIGTERM and was killed)"
        )
        return Verdict.failure(ErrorType.CANCELLED, code, message=message)
    if code == 0:
        return _output(run, report.result_error)
    if code is None:
        return Verdict.failure(
            ErrorType.INTERNAL_ERROR, message="Sandbox lost the job's exit status"
        )
    signal_type = classify_exit(code, oom_killed=run.oom_killed)
    if signal_type is not None:
        return Verdict.failure(signal_type, code)
    names = report.exception or [n for n in [parse_traceback(report.stderr_tail)] if n]
    if names:
        message = exception_message(report.stderr_tail) or names[0]
        return Verdict.failure(classify_failure(names, message), code, message=message)
    return Verdict.failure(ErrorType.NONZERO_EXIT, code, message=f"Process exited with code {code}")


def _output(run: SandboxRun, result_error: str | None) -> Verdict:
    raw = run.collected.result
    if result_error is not None:
        return Verdict.failure(ErrorType.INVALID_OUTPUT, 0, message=result_error)
    if raw is None:
        return Verdict.success()
    try:
        output = loads(raw)
    except orjson.JSONDecodeError as exc:
        return Verdict.failure(
            ErrorType.INVALID_OUTPUT, 0, message=f"result.json is not valid JSON: {exc}"
        )
    if not isinstance(output, dict):
        return Verdict.failure(
            ErrorType.INVALID_OUTPUT,
            0,
            message=f"result.json must hold a JSON object, not {type(output).__name__}",
        )
    if too_deep(output):
        return Verdict.failure(
            ErrorType.INVALID_OUTPUT,
            0,
            message=f"result.json is nested deeper than {MAX_JSON_DEPTH} levels",
        )
    return Verdict.success(output)
