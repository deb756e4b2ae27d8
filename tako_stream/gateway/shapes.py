"""The gateway's HTTP bodies where they differ from the messages: Tako VM's shapes."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from tako_stream.core.errors import ErrorType, Status
from tako_stream.core.models import DLQRecord, ExecutionResult, Relationship


class SyncResponse(BaseModel):
    """Tako VM's synchronous answer (``error`` is a message string, as in its guide)."""

    success: bool
    output: Any = None
    execution_time: float
    stdout: str
    stderr: str
    exit_code: int | None
    error: str | None
    job_type: str | None
    execution_id: str
    error_type: str | None = Field(description="The classified error type, when it failed.")
    timing: dict[str, Any] = Field(
        description="Tako VM's phases (startup_ms, execution_ms, total_ms, ...), as in the record."
    )


class JobAccepted(BaseModel):
    """Tako VM's answer to a submit, a rerun and a fork."""

    job_id: str
    status: str


class ExistingJob(JobAccepted):
    """A submit whose idempotency key names a job already: that job, as Tako VM answers."""

    message: str = "Existing job returned (idempotent)"


class DerivedJob(JobAccepted):
    """A rerun's or a fork's new job, with its lineage (Tako VM's REST reference)."""

    parent_execution_id: str
    relationship: Relationship


class JobStatusBody(BaseModel):
    """``GET /jobs/{id}``: Tako VM's job status."""

    job_id: str
    status: str = Field(description="pending, running, or the finished job's status.")
    created_at: str | None = Field(description="When the request was produced (ISO 8601).")
    duration_ms: int | None = Field(description="How long the code ran, once finished.")
    queue_position: int | None = Field(
        description="While pending: 1 + the jobs ahead of it in its partition of the "
        "requests topic (the order workers take them in)."
    )
    started_at: str | None = Field(default=None, description="Once a worker runs it.")


class InProgress(BaseModel):
    """``GET /jobs/{id}/result`` before the job has finished (Tako VM answers 200)."""

    job_id: str
    status: Literal["pending", "running"]
    message: str = "Job still in progress"
    queue_position: int | None = None


class Cancelled(BaseModel):
    """``POST /jobs/{id}/cancel``: Tako VM's answer, once the cancel is on its way."""

    status: Literal["cancelled"] = "cancelled"
    job_id: str
    result: dict[str, Any] | None = Field(
        default=None,
        description="Ours (with wait=true): the job's record once its result came in time.",
    )


class RerunBody(BaseModel):
    """``POST /jobs/{id}/rerun``: the same code and input, optionally another job type or
    timeout (Tako VM's ``RerunRequest``)."""

    model_config = ConfigDict(extra="forbid")

    job_type: str | None = Field(default=None, min_length=1, max_length=128)
    timeout: int | None = Field(default=None, ge=1, le=300)


class ForkBody(RerunBody):
    """``POST /jobs/{id}/fork``: new code on the same input (Tako VM's ``ForkRequest``)."""

    code: str = Field(min_length=1, max_length=100_000)


class Page(BaseModel):
    """Tako VM's paginated list; ``total`` is ours."""

    items: list[Any]
    limit: int
    offset: int
    has_more: bool
    count: int
    total: int


def tako_status(result: ExecutionResult) -> str:
    """The status as Tako VM names it: ``rejected`` (never run: refused, or no engine to run
    it) is one of its ``failed`` jobs, the error type says why."""
    return Status.FAILED.value if result.status is Status.REJECTED else result.status.value


def _ms(seconds: float | None) -> int | None:
    """Whole milliseconds; None for none, or for a figure no integer holds (anyone's result
    may say 1e308 or Infinity)."""
    if seconds is None or not math.isfinite(seconds * 1000):
        return None
    return round(seconds * 1000)


def iso_ms(produced_ms: int | None) -> str | None:
    """A record's timestamp as ISO 8601; None for none, or for one no date can hold (any
    producer sets its records' CreateTime)."""
    if produced_ms is None:
        return None
    try:
        return datetime.fromtimestamp(produced_ms / 1000, UTC).isoformat()
    except (ValueError, OverflowError, OSError):
        return None


def iso_utc(moment: datetime) -> str:
    """A time as ISO 8601 in UTC, or with its own offset when UTC cannot hold it (anyone's
    result may say 9999-12-31T23:59:59-01:00): the same instant either way."""
    try:
        return moment.astimezone(UTC).isoformat()
    except (ValueError, OverflowError):  # ValueError: a naive time read as local, near year 1
        return moment.isoformat()


def tako_dlq_item(summary: bytes) -> dict[str, Any]:
    """A DLQ entry as Tako VM lists one (``id``, ``job_id``, ``error_type``, ``error_message``,
    ``retry_count``, ``created_at``, ``correlation_id``; ``job_data`` and ``client_ip`` are
    not kept: the original bytes are on the DLQ topic), then the summary as stored."""
    entry = DLQRecord.model_validate_json(summary)
    return {
        "id": entry.dlq_id,
        "job_id": entry.execution_id,
        "job_data": None,
        "error_type": entry.error.type.value,
        "error_message": entry.error.message,
        "retry_count": entry.replay_count,
        "created_at": entry.first_failure_at.isoformat(),
        "client_ip": None,
        **entry.model_dump(mode="json"),
    }


def tako_error(result: ExecutionResult) -> dict[str, Any] | None:
    """The error as Tako VM's records carry it: type, message and the phase it happened in."""
    if result.error is None:
        return None
    phase = "startup" if result.error.type is ErrorType.STARTUP_TIMEOUT else None
    if phase is None and result.timing.sandbox is not None:
        phase = "execution"
    return {**result.error.model_dump(mode="json"), "phase": phase}


def tako_timing(result: ExecutionResult) -> dict[str, Any]:
    """Tako VM's timing phases; ``queued_ms`` and ``warm`` are ours."""
    ran = result.timing.sandbox is not None
    execution_ms = _ms(result.execution_time) if ran else None
    total_ms = _ms(result.timing.sandbox)
    return {
        "startup_ms": None
        if total_ms is None or execution_ms is None
        else max(total_ms - execution_ms, 0),
        "dep_install_ms": None if total_ms is None else 0,  # nothing is installed at run time
        "execution_ms": execution_ms,
        "total_ms": total_ms,
        "phase_at_exit": "execution" if ran else None,
        "queued_ms": _ms(result.timing.queued),
        "warm": result.timing.warm,
    }


def execution_record(
    result: ExecutionResult, *, created_at: str | None, full: bool = False
) -> dict[str, Any]:
    """Tako VM's execution record (``view=full``: its full record), then what we add."""
    timing = tako_timing(result)
    name = (result.job_type or "default").partition("@")[0]
    record: dict[str, Any] = {
        "execution_id": result.execution_id,
        "status": tako_status(result),
        "job_type": name,
        "job_version": result.job_ref or result.job_type or name,
        "created_at": created_at or iso_utc(result.started_at or result.finished_at),
        "started_at": result.started_at.isoformat() if result.started_at else None,
        "ended_at": result.finished_at.isoformat(),
        "duration_ms": timing["execution_ms"],
        "exit_code": result.exit_code,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "output": result.output,
        "error": tako_error(result),
        "timing": timing,
    }
    if full:
        record |= {
            "job_ref": result.job_ref or result.job_type or name,
            "artifacts": [
                a.model_dump(mode="json", include={"name", "size_bytes", "sha256", "content_type"})
                for a in result.artifacts
            ],
            "input_artifacts": [],
            "resource_usage": result.resource_usage.model_dump(mode="json")
            if result.resource_usage
            else None,
            "code_hash": result.code_hash,
            "input_hash": result.input_hash,
            "parent_execution_id": result.parent_execution_id,
            "relationship": result.relationship,
            "stdout_truncated": result.stdout_truncated,
            "stderr_truncated": result.stderr_truncated,
            "idempotency_key": result.idempotency_key,
        }
    # Ours, after Tako VM's fields: the rest of the result as the results topic carries it.
    record |= {
        "job_id": result.execution_id,
        "success": result.success,
        "correlation_id": result.correlation_id,
        "execution_time": result.execution_time,
        "worker_id": result.worker_id,
        "attempts": result.attempts,
        "metadata": result.metadata,
        "outcome": result.status.value,
    }
    return record


class ErrorBody(BaseModel):
    """Every error answer: what went wrong, and the request's correlation id."""

    detail: Any
    correlation_id: str


def sync_response(result: ExecutionResult) -> SyncResponse:
    return SyncResponse(
        success=result.success,
        output=result.output,
        execution_time=result.execution_time,
        stdout=result.stdout,
        stderr=result.stderr,
        exit_code=result.exit_code,
        error=result.error.message if result.error else None,
        job_type=result.job_type,
        execution_id=result.execution_id,
        error_type=result.error.type.value if result.error else None,
        timing=tako_timing(result),
    )


def payload_digest(body: dict[str, Any]) -> str:
    """The request as submitted, minus its idempotency key, hashed in canonical JSON."""
    content = {k: v for k, v in body.items() if k != "idempotency_key"}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()
