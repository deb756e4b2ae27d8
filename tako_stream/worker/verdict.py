"""From what happened to a request to the one result it gets.

``classify`` turns a sandbox run into a ``Verdict``; the other ``Verdict`` constructors cover the
requests that never ran (rejected, cancelled while queued, the engine unavailable, a bug of ours).
``answer`` is the only place an ``ExecutionResult`` is built, so every answer, whatever path it
took, has the same fields filled the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from tako_stream.core.classify import (
    classify_exception,
    classify_exit,
    exception_message,
    parse_traceback,
)
from tako_stream.core.errors import ErrorType, Status, default_message
from tako_stream.core.jobtypes import Limits
from tako_stream.core.models import MAX_JSON_DEPTH, ErrorInfo, ExecutionResult, Timing, json_depth
from tako_stream.sandbox.base import SandboxRun
from tako_stream.sandbox.protocol import decode_text
from tako_stream.worker.artifacts import attach

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
class Job:
    """Whom an answer is for: the request's ids and what it passes through to its result."""

    execution_id: str
    correlation_id: str
    worker_id: str
    job_type: str | None = None
    metadata: dict[str, object] | None = None
    #: Seconds from the request's produce time to its pick-up, when known.
    queued: float | None = None

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
        return Verdict.failure(classify_exception(names), code, message=message)
    return Verdict.failure(ErrorType.NONZERO_EXIT, code, message=f"Process exited with code {code}")


def _output(run: SandboxRun, result_error: str | None) -> Verdict:
    raw = run.collected.result
    if result_error is not None:
        return Verdict.failure(ErrorType.INVALID_OUTPUT, 0, message=result_error)
    if raw is None:
        return Verdict.success()
    try:
        output = orjson.loads(raw)
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
    if json_depth(output) > MAX_JSON_DEPTH:
        return Verdict.failure(
            ErrorType.INVALID_OUTPUT,
            0,
            message=f"result.json is nested deeper than {MAX_JSON_DEPTH} levels",
        )
    return Verdict.success(output)
