"""Dead letters: requests the system could not run, kept with everything needed to replay them.

A DLQ record keeps the original key, value and headers byte for byte (base64 in the JSON body),
where it was read from, why it failed and how often it was already replayed; the main fields are
mirrored into headers so tools can filter without decoding the body.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer

from tako_stream.core.errors import ErrorType
from tako_stream.core.models import CORRELATION_HEADER, DLQRecord, ExecutionResult, SourcePosition
from tako_stream.kafka.clients import producer_options
from tako_stream.kafka.codec import dumps, header
from tako_stream.kafka.message import Incoming
from tako_stream.kafka.reader import read_to_end, tail
from tako_stream.kafka.view import KeyedView
from tako_stream.settings import Settings

log = logging.getLogger(__name__)

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
    raw = header(headers, REPLAY_COUNT_HEADER)
    try:
        return max(0, int(raw or b"0"))
    except ValueError:
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


# --- Reading, deleting and replaying ------------------------------------------------------------
#
# The DLQ topic is the only store: records are keyed by dlq_id, and deleting one writes a
# tombstone (the same key, no value), so a deletion holds for every reader and survives restarts
# of every component (and on a compacted topic the record is eventually gone for good).  A
# replayed entry is tombstoned too: if it fails again it comes back as a new entry, its replay
# count one higher, until the replay limit refuses it.


#: What a view keeps per entry: its error type (for counts and filters) and the record, or,
#: for the long-lived views, its summary encoded (see ``DLQStore.keep_originals``).
_Entry = tuple[ErrorType, "DLQRecord | bytes"]


class DLQStore:
    """The current DLQ: records folded in topic order, tombstones removing them."""

    def __init__(self, *, keep_originals: bool = True) -> None:
        """``keep_originals=False`` is for the long-lived views of workers and gateways: they
        keep each entry as a summary without the original bytes, encoded (under 1 KB), so their
        memory grows by that per entry rather than by the size of every bad message; the CLI
        reads the topic whole to replay."""
        self.keep_originals = keep_originals
        self._view: KeyedView[_Entry] = KeyedView(self._parse, name="DLQ")

    def _parse(self, value: bytes) -> _Entry:
        record = DLQRecord.model_validate_json(value)
        if self.keep_originals:
            return record.error.type, record
        summary = record.model_copy(
            update={
                "original_key": None,
                "original_value": None,
                "original_headers": [],
                "original_omitted": True,
            }
        )
        # a copy: orjson's output keeps its larger working buffer (8 KB here) allocated
        return record.error.type, bytes(memoryview(dumps(summary)))

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        self._view.apply(key, value)

    def get(self, dlq_id_: str) -> DLQRecord | None:
        entry = self._view.get(dlq_id_)
        if entry is None:
            return None
        item = entry[1]
        return item if isinstance(item, DLQRecord) else DLQRecord.model_validate_json(item)

    def records(self) -> list[DLQRecord]:
        """Every entry, oldest write first."""
        return [record for dlq_id_ in self._view if (record := self.get(dlq_id_)) is not None]

    def __contains__(self, dlq_id_: object) -> bool:
        return dlq_id_ in self._view

    def __len__(self) -> int:
        return len(self._view)

    def stats(self) -> dict[str, Any]:
        """The seed's shape: ``{"total": N, "by_error_type": {type: n}}``."""
        by_type: dict[str, int] = {}
        for type_, _ in self._view.values():
            by_type[type_.value] = by_type.get(type_.value, 0) + 1
        return {"total": len(self._view), "by_error_type": dict(sorted(by_type.items()))}

    def select(
        self,
        *,
        ids: Iterable[str] | None = None,
        error_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[DLQRecord]:
        wanted = set(ids) if ids else None
        chosen = []
        for dlq_id_ in self._view:
            if wanted is not None and dlq_id_ not in wanted:
                continue
            entry = self._view.get(dlq_id_)
            if entry is None or (error_type and entry[0].value != error_type):
                continue
            record = self.get(dlq_id_)
            if record is None:
                continue
            if since and record.last_failure_at < since:
                continue
            if until and record.last_failure_at > until:
                continue
            chosen.append(record)
        return sorted(chosen, key=lambda r: r.last_failure_at)


async def read_store(settings: Settings) -> DLQStore:
    """Read the whole DLQ topic, up to its current end, into a store (no consumer group)."""
    store = DLQStore()
    await read_to_end(settings, settings.dlq_topic, store.apply)
    return store


async def delete(settings: Settings, ids: Iterable[str]) -> None:
    """Tombstone entries, for every reader and for good."""
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        for dlq_id_ in ids:
            await producer.send_and_wait(settings.dlq_topic, key=dlq_id_.encode(), value=None)
    finally:
        await producer.stop()


@dataclass
class ReplayOutcome:
    replayed: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def refusal(record: DLQRecord, max_replays: int) -> str | None:
    """Why an entry must not be replayed, if it must not."""
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
        (k, base64.b64decode(v))
        for k, v in record.original_headers
        if k.lower() != REPLAY_COUNT_HEADER
    ]
    headers.append((REPLAY_COUNT_HEADER, str(record.replay_count + 1).encode()))
    key = base64.b64decode(record.original_key) if record.original_key is not None else None
    if key is None:
        key = record.execution_id.encode()
    value = base64.b64decode(record.original_value) if record.original_value is not None else None
    return key, value, headers


async def replay(
    settings: Settings,
    records: list[DLQRecord],
    *,
    max_replays: int,
    rate: float | None = None,
    dry_run: bool = False,
    progress: Callable[[str, DLQRecord, int, int], None] | None = None,
) -> ReplayOutcome:
    """Re-produce each original request to its source topic, then tombstone its entry.

    An entry already replayed ``max_replays`` times is refused, so a request that keeps failing
    cannot loop.  ``rate`` caps replays per second; ``dry_run`` only reports what would happen.
    """
    outcome = ReplayOutcome()
    producer = None if dry_run else AIOKafkaProducer(**producer_options(settings))
    if producer is not None:
        await producer.start()
    try:
        for n, record in enumerate(records, 1):
            reason = refusal(record, max_replays)
            if reason is not None:
                outcome.refused.append((record.dlq_id, reason))
                if progress:
                    progress("refused", record, n, len(records))
                continue
            if producer is not None:
                key, value, headers = replay_message(record)
                await producer.send_and_wait(
                    record.source.topic, key=key, value=value, headers=headers
                )
                await producer.send_and_wait(
                    settings.dlq_topic, key=record.dlq_id.encode(), value=None
                )
            outcome.replayed.append(record.dlq_id)
            if progress:
                progress("would replay" if dry_run else "replayed", record, n, len(records))
            if rate and not dry_run and n < len(records):
                await asyncio.sleep(1.0 / rate)
    finally:
        if producer is not None:
            await producer.stop()
    return outcome


async def follow(settings: Settings, store: DLQStore) -> None:
    """Keep ``store`` up to date with the DLQ topic, forever (the worker's HTTP views use it)."""
    await tail(settings, settings.dlq_topic, store.apply)
