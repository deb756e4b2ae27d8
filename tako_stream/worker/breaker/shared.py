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
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
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
#: each would be kept whole: the bound above would no longer bound bytes.
MAX_KEY, MAX_VALUE = 1024, 8192


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

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        if (key is not None and len(key) > MAX_KEY) or (
            value is not None and len(value) > MAX_VALUE
        ):
            log.warning(
                "breaker states: skipping a record too large to be ours (key %r)",
                (key or b"")[:200],
            )
            return
        self.view.apply(key, value)

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

    def apply(self, raw: bytes) -> None:
        """Fold one event (its raw value) in; an unreadable one is skipped."""
        try:
            event = BreakerEvent.model_validate_json(raw)
        except ValidationError:
            log.warning("ignoring an unreadable breaker event: %r", raw[:200])
            return
        key = event.endpoint.encode()
        if len(key) > MAX_KEY:  # not an engine of ours; kept, it would unbound the bytes held
            log.warning("ignoring a breaker event for an endpoint too long to be ours")
            return
        state = stored_state(self.table.get(key))
        new = fold(state, event, self.config)
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
        self.table[key] = new.model_dump(mode="json")
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


def attach(app: faust.App, settings: Settings) -> Callable[[BreakerEvent], Awaitable[None]]:
    """Add the events topic, the table and its folding agent to ``app``; the publisher."""
    events = app.topic(
        settings.breaker_topic, partitions=1, key_serializer="raw", value_serializer="raw"
    )
    table = app.Table(
        settings.breaker_table,
        partitions=1,
        schema=faust.Schema(key_serializer="raw", value_serializer="json"),
    )
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
