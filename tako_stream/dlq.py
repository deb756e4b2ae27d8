"""Dead letters: requests the system could not run, kept with everything needed to replay them.

A DLQ record keeps the original key, value and headers byte for byte (base64 in the JSON body),
where it was read from, why it failed and how often it was already replayed; the main fields are
mirrored into headers so tools can filter without decoding the body.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime

from tako_stream.codec import dumps, header
from tako_stream.errors import ErrorType
from tako_stream.models import CORRELATION_HEADER, DLQRecord, ErrorInfo, SourcePosition

#: Error types whose requests go to the DLQ as well as getting a result: the system, not the
#: user's code, is why they did not run.
DEAD_LETTER_TYPES = frozenset(
    {ErrorType.INVALID_REQUEST, ErrorType.INTERNAL_ERROR, ErrorType.SERVICE_UNAVAILABLE}
)

REPLAY_COUNT_HEADER = "x-tako-replay-count"
H_ERROR_TYPE = "x-tako-error-type"
H_ERROR_MESSAGE = "x-tako-error-message"
H_EXECUTION_ID = "x-tako-execution-id"
H_DLQ_ID = "x-tako-dlq-id"
H_ORIGINAL_TOPIC = "x-tako-original-topic"
H_ORIGINAL_PARTITION = "x-tako-original-partition"
H_ORIGINAL_OFFSET = "x-tako-original-offset"
H_ATTEMPTS = "x-tako-attempts"
H_WORKER = "x-tako-worker-id"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def replay_count(headers: Sequence[tuple[str, bytes]] | None) -> int:
    raw = header(headers, REPLAY_COUNT_HEADER)
    try:
        return max(0, int(raw or b"0"))
    except ValueError:
        return 0


def dlq_id(source: SourcePosition) -> str:
    """Stable per source message, so a message dead-lettered twice (a worker killed after
    writing it, before committing) is one entry, not two."""
    return f"{source.topic}:{source.partition}:{source.offset}"


def build_record(
    *,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] | None,
    source: SourcePosition,
    execution_id: str,
    correlation_id: str,
    error: ErrorInfo,
    attempts: int,
    first_failure_at: datetime,
    last_failure_at: datetime,
    worker_id: str,
) -> tuple[DLQRecord, bytes, list[tuple[str, bytes]]]:
    """The record, its encoded value, and the headers mirroring its main fields."""
    record = DLQRecord(
        dlq_id=dlq_id(source),
        execution_id=execution_id,
        correlation_id=correlation_id,
        error=error,
        attempts=attempts,
        first_failure_at=first_failure_at,
        last_failure_at=last_failure_at,
        worker_id=worker_id,
        source=source,
        replay_count=replay_count(headers),
        original_key=_b64(key) if key is not None else None,
        original_value=_b64(value or b""),
        original_headers=[(k, _b64(v or b"")) for k, v in headers or ()],
    )
    mirrored = [
        (CORRELATION_HEADER, correlation_id.encode()),
        (H_DLQ_ID, record.dlq_id.encode()),
        (H_EXECUTION_ID, execution_id.encode()),
        (H_ERROR_TYPE, error.type.value.encode()),
        (H_ERROR_MESSAGE, error.message[:1000].encode("utf-8", "replace")),
        (H_ORIGINAL_TOPIC, source.topic.encode()),
        (H_ORIGINAL_PARTITION, str(source.partition).encode()),
        (H_ORIGINAL_OFFSET, str(source.offset).encode()),
        (H_ATTEMPTS, str(attempts).encode()),
        (H_WORKER, worker_id.encode()),
        (REPLAY_COUNT_HEADER, str(record.replay_count).encode()),
    ]
    return record, dumps(record), mirrored
