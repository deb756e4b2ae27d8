"""The gateway's HTTP bodies where they differ from the messages: Tako VM's shapes."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from pydantic import BaseModel, Field

from tako_stream.core.models import ExecutionResult


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


class JobAccepted(BaseModel):
    job_id: str
    status: str


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
    )


def job_record(result: ExecutionResult) -> dict[str, Any]:
    """An execution record: the full result, with ``job_id`` as Tako VM's clients expect."""
    return {"job_id": result.execution_id, **result.model_dump(mode="json")}


def payload_digest(body: dict[str, Any]) -> str:
    """The request as submitted, minus its idempotency key, hashed in canonical JSON."""
    content = {k: v for k, v in body.items() if k != "idempotency_key"}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()
