"""The DLQ in memory: a whole store (for the CLI and listings) and a bounded view (for workers
and gateways, whose memory must not grow with the topic)."""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from tako_stream.core.errors import ErrorType
from tako_stream.core.models import DLQRecord
from tako_stream.dlq.records import H_ERROR_TYPE, summarise
from tako_stream.kafka.codec import header
from tako_stream.kafka.reader import Record
from tako_stream.kafka.view import KeyedView

log = logging.getLogger(__name__)

#: What a store keeps per entry: its error type (for counts and filters) and the record, or
#: its summary encoded (see ``DLQStore.keep_originals``).
_Entry = tuple[ErrorType, "DLQRecord | bytes"]


#: The largest record a view keeps as read (summarising it is what costs); larger ones are
#: summarised on arrival, so a view holds at most ``keep`` times this.
_RAW_MAX = 4096
#: Entries whose ids a view remembers as counted (as 64-bit hashes: ~140 bytes each, 14 MB at
#: most, whatever the keys' length), so that only a tombstone for an entry it counted takes it
#: off the counts.
TRACK = 100_000


class DLQView:
    """What a long-lived process (a worker, a gateway) keeps of the DLQ: counts by error type
    and the newest ``keep`` entries as summaries.  Its memory does not grow with the topic;
    listings and entries beyond the window are read from the topic (``read_store``, ``find``).

    Counts go down by tombstones (and by an unreadable value, which ends its key's entry as a
    tombstone does), and only for an entry the view counted: it remembers the
    (hashed) ids of the last ``track`` entries it counted.  A tombstone for anything else (its
    entry compacted away before this view read the topic, deleted twice, or made up) changes
    nothing, or the counts would drift low.  Past ``track`` the oldest ids are let go, their
    entries still counted by type: a tombstone for an id not remembered then takes one off the
    type its header names while that type has such entries left, so counts can be off by at
    most the entries let go.  An entry written twice (a worker that died after dead-lettering
    it, before committing, or a read started over) is counted once while its id is remembered.
    """

    def __init__(self, keep: int = 1000, track: int = TRACK) -> None:
        self.counts: Counter[ErrorType] = Counter()
        #: Per entry: its error type, its value, and whether that value is summarised.
        self._recent: KeyedView[tuple[ErrorType, bytes, bool]] = KeyedView(self._summary, keep=keep)
        #: hash(key) of each counted entry (oldest counted first) -> the type it is counted as.
        self._counted: OrderedDict[int, ErrorType] = OrderedDict()
        #: Entries counted whose ids were let go (past ``track``), by type.
        self._let_go: Counter[ErrorType] = Counter()
        self._track = track

    @staticmethod
    def _summary(value: bytes) -> tuple[ErrorType, bytes, bool]:
        error_type, summary = summarise(value)
        return error_type, summary, True

    def apply(self, record: Record) -> None:
        """Fold one DLQ topic record in (``tako_stream.kafka.reader.tail_records`` calls this).

        A worker reads back every record it dead-letters, so this is on the path of a burst
        of refused requests: a small record carrying its error type in a header (as ours do)
        is kept as read and summarised only when asked for; others are summarised now."""
        if record.key is None:
            return
        dlq_id_ = record.key.decode("utf-8", "replace")
        named = _error_type(header(record.headers, H_ERROR_TYPE))
        if record.value is None:
            self._recent.remove(dlq_id_)
            self._uncount(hash(record.key), named)
            return
        new: tuple[ErrorType, bytes, bool] | None
        if named is not None and len(record.value) <= _RAW_MAX:
            new = (named, bytes(record.value), False)
            self._recent.put(dlq_id_, new)
        else:
            new = self._recent.apply(record.key, record.value)
        if new is None:
            # Unreadable (logged by the view): no entry of the DLQ now, as a view started after
            # compaction (which keeps only this value) finds; one counted before is uncounted.
            self._recent.remove(dlq_id_)
            self._uncount(hash(record.key), named)
            return
        self._count(hash(record.key), new[0])

    def _count(self, key: int, error_type: ErrorType) -> None:
        old = self._counted.pop(key, None)
        if old is not None:  # written again: counted once, as its newest type
            self.counts[old] -= 1
        self._counted[key] = error_type
        self.counts[error_type] += 1
        if len(self._counted) > self._track:
            _, let_go = self._counted.popitem(last=False)
            self._let_go[let_go] += 1

    def _uncount(self, key: int, named: ErrorType | None) -> None:
        counted = self._counted.pop(key, None)
        if counted is None and named is not None and self._let_go[named] > 0:
            counted = named  # perhaps one whose id was let go: the header says which type
            self._let_go[named] -= 1
        if counted is not None:
            self.counts[counted] -= 1

    def get(self, dlq_id_: str) -> DLQRecord | None:
        """An entry, if it is among the newest ``keep`` (a summary, without original bytes)."""
        entry = self._recent.get(dlq_id_)
        if entry is None:
            return None
        _, value, summarised = entry
        try:
            return DLQRecord.model_validate_json(value if summarised else summarise(value)[1])
        except ValueError:
            log.warning("DLQ: entry %r is unreadable", dlq_id_[:200])
            return None

    def forget(self, dlq_id_: str) -> None:
        """Drop an entry this process just deleted, before its tombstone is read back (which
        is what updates the counts)."""
        self._recent.remove(dlq_id_)

    def __len__(self) -> int:
        return sum(self.counts.values())

    @property
    def tracked(self) -> int:
        """Ids remembered as counted (at most ``track``)."""
        return len(self._counted)

    def stats(self) -> dict[str, Any]:
        """The seed's shape: ``{"total": N, "by_error_type": {type: n}}``."""
        by_type = {t.value: n for t, n in sorted(self.counts.items()) if n > 0}
        return {"total": sum(by_type.values()), "by_error_type": by_type}


def _error_type(raw: bytes | None) -> ErrorType | None:
    try:
        return ErrorType((raw or b"").decode())
    except ValueError:
        return None


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
        return summarise(value)

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
