"""A DLQ record: the original message byte for byte, where it was read from and why it failed.

A DLQ record keeps the original key, value and headers byte for byte (base64 in the JSON body),
where it was read from, why it failed and how often it was already replayed; the main fields are
mirrored into headers so tools can filter without decoding the body.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from tako_stream.core.errors import ErrorType
from tako_stream.core.models import CORRELATION_HEADER, DLQRecord, ExecutionResult, SourcePosition
from tako_stream.kafka.codec import dumps, header
from tako_stream.kafka.message import Incoming

#: Error types whose requests go to the DLQ as well as getting a result: the system, not the
#: user's code, is why they did not run (docker_error: the job type's image is missing).
DEAD_LETTER_TYPES = frozenset(
    {
        ErrorType.INVALID_REQUEST,
        ErrorType.INTERNAL_ERROR,
        ErrorType.SERVICE_UNAVAILABLE,
        ErrorType.DOCKER_ERROR,
    }
)

REPLAY_COUNT_HEADER = "x-tako-replay-count"
#: Ten digits: more replays than any entry gets, and far inside what a record's JSON carries.
MAX_REPLAY_DIGITS = 10
H_ERROR_TYPE = "x-tako-error-type"
H_ERROR_MESSAGE = "x-tako-error-message"
H_EXECUTION_ID = "x-tako-execution-id"
H_DLQ_ID = "x-tako-dlq-id"
H_ORIGINAL_TOPIC = "x-tako-original-topic"
H_ORIGINAL_PARTITION = "x-tako-original-partition"
H_ORIGINAL_OFFSET = "x-tako-original-offset"
H_ATTEMPTS = "x-tako-attempts"
H_WORKER = "x-tako-worker-id"


#: What a DLQ record keeps of an original message: base64 makes it 4/3 larger, and the record
#: must stay under the topics' 8 MiB message limit (valid requests are under 1.2 MiB).
MAX_ORIGINAL_BYTES = 4 * 1024 * 1024
MAX_ORIGINAL_HEADERS = 512 * 1024
MAX_ORIGINAL_KEY = 64 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_time(text: str | None) -> datetime | None:
    """An ISO 8601 time for the DLQ's filters; a time without a zone is taken as UTC."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time such as 2026-11-28T10:00") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def replay_count(headers: Sequence[tuple[str, bytes]] | None) -> int:
    """The count a replay wrote (``replay_message``): ASCII digits, at most
    :data:`MAX_REPLAY_DIGITS` of them.  Anything else is a producer's, not a count of ours, and
    counts as 0, as an unreadable one always has: any int once passed, and one past 64 bits made
    the DLQ record unencodable.  Not the maximum: a header nobody replayed would make its request
    one that can never be replayed, and 0 still ends a replay loop after ``max_replays``."""
    raw = (header(headers, REPLAY_COUNT_HEADER) or b"").strip()
    if raw.isdigit() and len(raw) <= MAX_REPLAY_DIGITS:  # bytes: ASCII digits only
        return int(raw)
    return 0


def dlq_id(source: SourcePosition) -> str:
    """Stable per source message, so a message dead-lettered twice (a worker killed after
    writing it, before committing) is one entry, not two."""
    return f"{source.topic}:{source.partition}:{source.offset}"


@dataclass(frozen=True)
class DeadLetter:
    """A DLQ record ready to send: the record, its encoded value, and headers mirroring it."""

    record: DLQRecord
    value: bytes
    headers: list[tuple[str, bytes]]


def dead_letter(
    message: Incoming, result: ExecutionResult, *, first_failure_at: datetime
) -> DeadLetter:
    """The DLQ record of a consumed request and the failed result it got.

    The original is kept byte for byte when it fits; a larger one (only invalid requests can
    be) keeps its first :data:`MAX_ORIGINAL_BYTES`, so the record, in base64, always fits the
    topic's message limit: otherwise the broker would refuse it and the partition would stall.
    """
    if result.error is None:
        raise ValueError("a dead letter needs a failed result")
    key, value, headers = message.key, message.value, message.headers
    error, source = result.error, message.source
    header_bytes = sum(len(k) + len(v or b"") for k, v in headers)
    size = len(value or b"") + header_bytes + len(key or b"")
    truncated = (
        len(value or b"") > MAX_ORIGINAL_BYTES
        or header_bytes > MAX_ORIGINAL_HEADERS
        or len(key or b"") > MAX_ORIGINAL_KEY
    )
    record = DLQRecord(
        dlq_id=dlq_id(source),
        execution_id=result.execution_id,
        correlation_id=result.correlation_id,
        error=error,
        attempts=result.attempts,
        first_failure_at=first_failure_at,
        last_failure_at=result.finished_at,
        worker_id=result.worker_id,
        source=source,
        replay_count=replay_count(headers),
        original_key=_b64(key[:MAX_ORIGINAL_KEY]) if key is not None else None,
        original_value=_b64(value[:MAX_ORIGINAL_BYTES]) if value is not None else None,
        original_headers=[] if truncated else [(k, _b64(v or b"")) for k, v in headers],
        original_size=size,
        original_truncated=truncated,
    )
    mirrored = [
        (CORRELATION_HEADER, result.correlation_id.encode()),
        (H_DLQ_ID, record.dlq_id.encode()),
        (H_EXECUTION_ID, result.execution_id.encode()),
        (H_ERROR_TYPE, error.type.value.encode()),
        (H_ERROR_MESSAGE, error.message[:1000].encode("utf-8", "replace")),
        (H_ORIGINAL_TOPIC, source.topic.encode()),
        (H_ORIGINAL_PARTITION, str(source.partition).encode()),
        (H_ORIGINAL_OFFSET, str(source.offset).encode()),
        (H_ATTEMPTS, str(result.attempts).encode()),
        (H_WORKER, result.worker_id.encode()),
        (REPLAY_COUNT_HEADER, str(record.replay_count).encode()),
    ]
    return DeadLetter(record, dumps(record), mirrored)


def summarise(value: bytes) -> tuple[ErrorType, bytes]:
    """An encoded DLQ record without its original bytes (under 1 KB), and its error type."""
    record = DLQRecord.model_validate_json(value)
    summary = record.model_copy(
        update={
            "original_key": None,
            "original_value": None,
            "original_headers": [],
            "original_omitted": True,
        }
    )
    try:
        encoded = dumps(summary)
    except TypeError as exc:  # a number past 64 bits: not a record of ours, and unreadable
        # as such (ValueError is what views skip); a TypeError ended the worker's DLQ follower
        raise ValueError(f"a DLQ record that cannot be encoded again: {exc}") from exc
    # a copy: orjson's output keeps its larger working buffer (8 KB here) allocated
    return record.error.type, bytes(memoryview(encoded))


def tombstone_headers(record: DLQRecord) -> list[tuple[str, bytes]]:
    """A deletion names what it deletes, so views can count without keeping every entry."""
    return [(H_ERROR_TYPE, record.error.type.value.encode()), (H_DLQ_ID, record.dlq_id.encode())]


def refusal(record: DLQRecord, max_replays: int, *, requests_topic: str) -> str | None:
    """Why an entry must not be replayed, if it must not.

    Anyone who can write to the DLQ topic writes what a replay produces, and where: only an
    entry from ``requests_topic`` is replayed (to it), and only bytes that decode (else a
    replay of many would stop partway, some entries replayed and tombstoned, the rest not)."""
    if record.source.topic != requests_topic:
        return (
            f"its source topic {record.source.topic!r} is not this deployment's requests topic "
            f"({requests_topic!r}): a replay writes only there"
        )
    try:
        replay_message(record)
    except ValueError as exc:  # binascii.Error is a ValueError
        return f"its original bytes are not valid base64 ({exc})"
    if record.replay_count >= max_replays:
        return f"replayed {record.replay_count} times already (limit {max_replays})"
    if record.original_truncated:
        s = record.source
        return (
            f"the original ({record.original_size} bytes) was too large to keep; it is at "
            f"{s.topic}[{s.partition}]@{s.offset} while that topic retains it"
        )
    if record.original_omitted:
        return "a summary without the original bytes: read the entry from the DLQ topic"
    return None


def replay_message(
    record: DLQRecord,
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """The original key, value and headers, with the replay count one higher."""
    headers = [
        (k, base64.b64decode(v, validate=True))
        for k, v in record.original_headers
        if k.lower() != REPLAY_COUNT_HEADER
    ]
    headers.append((REPLAY_COUNT_HEADER, str(record.replay_count + 1).encode()))
    key = record.original_key
    key_bytes = base64.b64decode(key, validate=True) if key is not None else None
    if key_bytes is None:
        key_bytes = record.execution_id.encode()
    value = record.original_value
    value_bytes = base64.b64decode(value, validate=True) if value is not None else None
    return key_bytes, value_bytes, headers
