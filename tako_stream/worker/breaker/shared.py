"""The breaker's state, shared by every worker and gateway through a faust table.

Workers publish outcomes to a single-partition events topic; the one worker that owns that
partition (faust's group gives it to exactly one) folds them, in order, into a one-partition
``Table``.  One partition on both sides keeps the agent's writes legal (a table written from an
agent must have as many changelog partitions as the agent's source topic has partitions) and
gives a single writer, so concurrent read-modify-writes cannot lose updates; when that worker
dies, faust hands the partition to another, which recovers the table from its changelog and goes
on folding.

Everyone reads the state from the table's changelog, tailed into ``BreakerStates``.  A
``GlobalTable`` would be the textbook reader, but faust treats a GlobalTable's partitions as
active on every worker and never applies changelog records to an active partition after
recovery, so readers other than the writer never see a transition (faust-streaming #283).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import faust
from aiokafka.admin import NewTopic
from pydantic import ValidationError

from tako_stream.kafka.codec import dumps
from tako_stream.kafka.view import KeyedView
from tako_stream.settings import BreakerConfig, Settings
from tako_stream.worker.breaker.state import BreakerEvent, BreakerState, State, fold

log = logging.getLogger(__name__)

_RANK = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}

#: Endpoints the table's writer and every view keep (one per Docker engine: a host's socket, or
#: a TCP engine), the least recently written forgotten beyond: anyone may write the events topic
#: and the changelog, and each forged endpoint was kept for good.  An engine in trouble is
#: written at every ping, so it is never the one forgotten; a quiet one reads as closed, which
#: it is.
MAX_ENDPOINTS = 1000
#: A record of ours is an endpoint key (a host name and a socket path or URL) and a state under
#: 5 KB (its detail of 500 characters is 3 KB escaped at worst); larger ones are not ours, and
#: each would be kept whole: the bound above would no longer bound bytes.  The same bounds hold
#: for an event the writer folds and the state it writes.
MAX_KEY, MAX_VALUE = 1024, 8192
#: Changelog records the writer's table buffers before applying them while it recovers (faust's
#: default is 1,000): each is held decoded until then, and a forged one may be a megabyte.
RECOVERY_BUFFER = 32


class Skips:
    """Records skipped, by reason, logged at the 1st, 2nd, 4th, 8th... of each reason: anyone
    may write the breaker's topics, and a line per forged record would flood the logs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter[str] = Counter()

    def skip(self, reason: str, sample: bytes | None) -> None:
        """Count one record skipped; ``sample`` (its key, or its value's start) is logged cut."""
        self.counts[reason] += 1
        count = self.counts[reason]
        if count & (count - 1) == 0:
            log.warning(
                "%s: skipping %s (%d so far): %r", self.name, reason, count, (sample or b"")[:200]
            )


def topics(settings: Settings) -> list[NewTopic]:
    """The breaker's topics, created before faust starts: when two workers start together,
    faust creating them lazily races, and its producer then crashes on a partition its metadata
    does not know yet."""
    return [
        NewTopic(settings.breaker_topic, 1, settings.topic_replication),
        NewTopic(
            settings.breaker_changelog_topic,
            1,
            settings.topic_replication,
            topic_configs={"cleanup.policy": "compact"},
        ),
    ]


class BreakerStates:
    """Every Docker engine's breaker, as the changelog says (one entry per endpoint)."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.view: KeyedView[BreakerState] = KeyedView(
            BreakerState.model_validate_json, keep=MAX_ENDPOINTS, name="breaker states"
        )
        #: Set once the changelog has been read up to where it ended when reading started.
        self.caught_up = asyncio.Event()
        self.skips = Skips("breaker states")

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Fold one changelog record in.  A key too long to be ours is skipped (it was never
        kept); a value that is no state of ours, too large or unreadable, ends what the view
        held for its key, as it does for a reader that starts after compaction (which keeps
        only that value): kept, one forged record froze every view's copy of an engine."""
        if key is None:
            return  # the writer's records all have one
        if len(key) > MAX_KEY:
            self.skips.skip("a key too long to be ours", key)
            return
        name = key.decode("utf-8", "replace")
        if value is None:
            self.view.remove(name)
            return
        if len(value) > MAX_VALUE:
            self.skips.skip("a value too large to be ours", key)
            self.view.remove(name)
            return
        try:
            state = BreakerState.model_validate_json(value)
        except ValueError:
            self.skips.skip("an unreadable value", key)
            self.view.remove(name)
            return
        self.view.put(name, state)

    def get(self, endpoint: str) -> BreakerState | None:
        return self.view.get(endpoint)

    def worst(self, now: datetime | None = None) -> BreakerState:
        """The worst breaker of the engines the workers use (closed when none failed)."""
        at = now or datetime.now(UTC)
        states = [s.effective(at, self.config) for s in self.view.values()]
        worst = max(states, key=lambda s: _RANK[s.state], default=None)
        return worst or BreakerState(endpoint="-")


def stored_state(previous: Any) -> BreakerState | None:
    """The folding agent's previous state, from its table: recovered from the changelog, which
    anyone may write, so a value that is no state starts the endpoint afresh (closed) rather
    than ending the agent."""
    if not previous:
        return None
    try:
        return BreakerState.model_validate(previous)
    except ValidationError:
        log.warning("breaker: the table's state is unreadable, starting afresh: %.200r", previous)
        return None


class TableWriter:
    """The folding agent's work: each event folded into the table (``MutableMapping``: faust's
    ``Table`` in the worker, a dict in the unit tests), at most ``keep`` endpoints kept.

    Beyond ``keep`` the least recently written endpoint is deleted, which writes a tombstone to
    the changelog, so the readers' views drop it too.  Endpoints recovered from the changelog
    and not written since were written before any this writer wrote: they go first."""

    def __init__(
        self, table: MutableMapping[bytes, Any], config: BreakerConfig, keep: int = MAX_ENDPOINTS
    ) -> None:
        self.table = table
        self.config = config
        self.keep = keep
        #: Keys this writer wrote, least recently written first (at most ``keep``).
        self._written: OrderedDict[bytes, None] = OrderedDict()
        self.forgotten = 0
        self.skips = Skips("breaker events")

    def apply(self, raw: bytes) -> None:
        """Fold one event (its raw value) in; an event or a state that cannot be ours (unreadable,
        or larger than ``MAX_KEY`` and ``MAX_VALUE`` allow) is skipped: kept, each of the
        ``keep`` entries could be any size."""
        if len(raw) > MAX_VALUE:
            self.skips.skip("an event too large to be ours", raw[:200])
            return
        try:
            event = BreakerEvent.model_validate_json(raw)
        except ValidationError:
            self.skips.skip("an unreadable event", raw[:200])
            return
        key = event.endpoint.encode()
        if len(key) > MAX_KEY:
            self.skips.skip("an event for an endpoint too long to be ours", key)
            return
        state = stored_state(self.table.get(key))
        new = fold(state, event, self.config)
        value = new.model_dump(mode="json")
        if len(dumps(value)) > MAX_VALUE:  # an endpoint of escaped characters, say
            self.skips.skip("a state too large to be ours", key)
            return
        before = state.effective(event.at, self.config).state if state else State.CLOSED
        if new.state != before:
            log.warning(
                "circuit breaker %s: %s -> %s (%s from %s)",
                event.endpoint,
                before.value,
                new.state.value,
                event.outcome.value,
                event.worker_id,
            )
        self.table[key] = value
        self._written.pop(key, None)
        self._written[key] = None
        if len(self._written) > self.keep or len(self.table) > self.keep:
            self._forget()

    def _forget(self) -> None:
        """Delete endpoints beyond ``keep``: recovered ones not written since first, then the
        least recently written."""
        while len(self._written) > self.keep:
            self._delete(self._written.popitem(last=False)[0])
        if len(self.table) > self.keep:
            recovered = [key for key in self.table if key not in self._written]
            for key in recovered[: len(self.table) - self.keep]:
                self._delete(key)

    def _delete(self, key: bytes) -> None:
        if key in self.table:
            del self.table[key]  # a tombstone on the changelog: the views forget it too
            self.forgotten += 1
            if self.forgotten == 1:
                log.warning(
                    "breaker: more than %d endpoints named; the least recently written are "
                    "forgotten (an engine in trouble is written at every ping)",
                    self.keep,
                )


class BreakerTable(faust.Table):  # type: ignore[type-arg]
    """The writer's table, whose recovery keeps what the writer would: faust's memory store
    loads every key of the changelog, which anyone may write, each value whatever its size.

    A record with a key over ``MAX_KEY`` is skipped; one with a value over ``MAX_VALUE`` deletes
    its key, as a tombstone would (that value is the key's newest, the only one a compacted
    changelog keeps); beyond ``MAX_ENDPOINTS`` the least recently written keys are dropped
    after each batch, a batch being at most ``RECOVERY_BUFFER`` records, so the work is bounded
    between two of recovery's waits for the next record.  Dropped keys are not deleted from the
    changelog (no writes while recovering): the writer deletes what is over the bound once it
    writes, and every reader's view bounds itself."""

    def __init__(self, app: faust.App, name: str, **kwargs: Any) -> None:
        super().__init__(
            app,
            name=name,
            beacon=app.tables.beacon,
            recovery_buffer_size=RECOVERY_BUFFER,
            **kwargs,
        )
        self.keep = MAX_ENDPOINTS
        self.skips = Skips("breaker table recovery")

    def apply_changelog_batch(self, batch: Iterable[Any]) -> None:
        store = self.data
        items, partitions = getattr(store, "data", None), getattr(store, "_key_partition", None)
        if not isinstance(items, dict) or not isinstance(partitions, dict):
            raise TypeError(f"the breaker table needs faust's memory store, not {store!r}")
        for event in batch:
            raw_key, raw_value = event.message.key, event.message.value
            if raw_key is None or len(raw_key) > MAX_KEY:
                self.skips.skip("a key too long to be ours", raw_key)
                continue
            key = self._to_key(event.key)
            items.pop(key, None)  # written again: the newest now
            partitions.pop(key, None)
            if raw_value is not None and len(raw_value) > MAX_VALUE:
                self.skips.skip("a value too large to be ours", raw_key)
            elif raw_value is not None and event.value:  # else a tombstone: the key is gone
                items[key] = self._to_value(event.value)
                partitions[key] = event.message.partition
        for key in list(islice(items, max(len(items) - self.keep, 0))):
            del items[key]
            partitions.pop(key, None)


def attach(app: faust.App, settings: Settings) -> Callable[[BreakerEvent], Awaitable[None]]:
    """Add the events topic, the table and its folding agent to ``app``; the publisher."""
    events = app.topic(
        settings.breaker_topic, partitions=1, key_serializer="raw", value_serializer="raw"
    )
    table = BreakerTable(
        app,
        settings.breaker_table,
        partitions=1,
        schema=faust.Schema(key_serializer="raw", value_serializer="json"),
        # The changelog topic decodes keys with the serializer of ``key_type``, not the
        # schema's (json without it): every key of ours failed to decode, and recovery waited
        # for good for the record it lost, so a writer taking over a changelog never got ready.
        key_type=bytes,
    )
    app.tables.add(table)
    named = table.changelog_topic.get_topic_name()
    if named != settings.breaker_changelog_topic:  # the name is derived here once; faust must agree
        raise RuntimeError(f"faust names the breaker changelog {named!r}")
    writer = TableWriter(table, settings.breaker)

    @app.agent(events)
    async def fold_breaker_events(stream: Any) -> None:
        async for raw in stream:
            writer.apply(raw)

    async def publish(event: BreakerEvent) -> None:
        await events.send(key=event.endpoint.encode(), value=dumps(event))

    return publish
