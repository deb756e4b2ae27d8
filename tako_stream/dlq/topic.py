"""The DLQ topic: reading it, looking an entry up, deleting and replaying entries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from tako_stream.core.models import DLQRecord
from tako_stream.dlq.records import refusal, replay_message, tombstone_headers
from tako_stream.dlq.views import DLQStore, DLQView
from tako_stream.kafka.clients import producer_options
from tako_stream.kafka.reader import latest, read_to_end, tail_records
from tako_stream.settings import Settings

log = logging.getLogger(__name__)

# --- Reading, deleting and replaying ------------------------------------------------------------
#
# The DLQ topic is the only store: records are keyed by dlq_id, and deleting one writes a
# tombstone (the same key, no value), so a deletion holds for every reader and survives restarts
# of every component (and on a compacted topic the record is eventually gone for good).  A
# replayed entry is tombstoned too: if it fails again it comes back as a new entry, its replay
# count one higher, until the replay limit refuses it.


async def read_store(settings: Settings, *, keep_originals: bool = True) -> DLQStore:
    """Read the whole DLQ topic, up to its current end, into a store (no consumer group)."""
    store = DLQStore(keep_originals=keep_originals)
    await read_to_end(settings, settings.dlq_topic, store.apply)
    return store


async def find(settings: Settings, dlq_id_: str) -> DLQRecord | None:
    """One entry, read from the DLQ topic (the partition its id is keyed to)."""
    record = await latest(settings, settings.dlq_topic, dlq_id_)
    if record is None or record.value is None:
        return None
    try:
        return DLQRecord.model_validate_json(record.value)
    except ValueError:
        return None


async def lookup(settings: Settings, view: DLQView, dlq_id_: str) -> DLQRecord | None:
    """An entry from the view's window, else from the topic."""
    return view.get(dlq_id_) or await find(settings, dlq_id_)


async def remove(settings: Settings, view: DLQView, dlq_id_: str) -> bool:
    """Delete an entry for every reader; False when there is no such entry."""
    record = await lookup(settings, view, dlq_id_)
    if record is None:
        return False
    await delete(settings, [record])
    view.forget(dlq_id_)
    return True


async def delete(settings: Settings, records: Iterable[DLQRecord]) -> None:
    """Tombstone entries, for every reader and for good."""
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        for record in records:
            await producer.send_and_wait(
                settings.dlq_topic,
                key=record.dlq_id.encode(),
                value=None,
                headers=tombstone_headers(record),
            )
    finally:
        await producer.stop()


@dataclass
class ReplayOutcome:
    replayed: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


async def replay(
    settings: Settings,
    records: list[DLQRecord],
    *,
    max_replays: int,
    rate: float | None = None,
    dry_run: bool = False,
    progress: Callable[[str, DLQRecord, int, int], None] | None = None,
) -> ReplayOutcome:
    """Re-produce each original request to the requests topic it came from, then tombstone
    its entry.

    An entry already replayed ``max_replays`` times is refused, so a request that keeps failing
    cannot loop.  ``rate`` caps replays per second; ``dry_run`` only reports what would happen.
    """
    outcome = ReplayOutcome()
    producer = None if dry_run else AIOKafkaProducer(**producer_options(settings))
    if producer is not None:
        await producer.start()
    try:
        for n, record in enumerate(records, 1):
            reason = refusal(record, max_replays, requests_topic=settings.requests_topic)
            if reason is not None:
                outcome.refused.append((record.dlq_id, reason))
                if progress:
                    progress("refused", record, n, len(records))
                continue
            if producer is not None:
                key, value, headers = replay_message(record)
                await producer.send_and_wait(
                    settings.requests_topic, key=key, value=value, headers=headers
                )
                await producer.send_and_wait(
                    settings.dlq_topic,
                    key=record.dlq_id.encode(),
                    value=None,
                    headers=tombstone_headers(record),
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


async def follow(settings: Settings, view: DLQView) -> None:
    """Keep ``view`` up to date with the DLQ topic, forever (workers and gateways use it)."""
    await tail_records(settings, settings.dlq_topic, view.apply)
