"""The circuit breaker around Docker: its state machine, as a pure fold over events.

States follow Tako VM: ``closed`` (normal) → ``open`` after ``failure_threshold`` consecutive
Docker failures (jobs answered at once with ``service_unavailable``) → ``half_open`` once
``reset_timeout`` has passed (limited trial traffic) → ``closed`` after ``success_threshold``
successes, or back to ``open`` on any failure.

Why a fold over events: the state is shared by every worker of a host, and several workers
updating one record concurrently would lose updates.  So workers only *publish* outcomes (job
runs and periodic pings) to a single-partition events topic; exactly one faust agent (the owner
of that partition) applies ``fold`` in order and writes the result to a GlobalTable that every
worker reads.  ``half_open`` is not stored when it is reached by time alone: readers derive it
from ``opened_at`` with ``effective``, so no timer has to fire for it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

log = logging.getLogger(__name__)


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5
    reset_timeout: float = 30.0
    success_threshold: int = 2


class BreakerEvent(BaseModel):
    """One outcome of talking to Docker, published by any worker."""

    endpoint: str
    outcome: Outcome
    at: datetime
    worker_id: str
    source: str = "job"  # "job" or "ping"
    detail: str | None = None


class BreakerState(BaseModel):
    """The shared record for one Docker endpoint (the GlobalTable's value)."""

    endpoint: str
    state: State = State.CLOSED
    failure_count: int = 0
    success_count: int = 0
    last_failure: datetime | None = None
    last_error: str | None = None
    opened_at: datetime | None = None
    updated_at: datetime | None = None

    def effective(self, now: datetime, config: BreakerConfig) -> BreakerState:
        """The state as of ``now``: an ``open`` breaker past its reset timeout is half open."""
        if (
            self.state is State.OPEN
            and self.opened_at is not None
            and now - self.opened_at >= timedelta(seconds=config.reset_timeout)
        ):
            return self.model_copy(update={"state": State.HALF_OPEN, "success_count": 0})
        return self


def fold(state: BreakerState | None, event: BreakerEvent, config: BreakerConfig) -> BreakerState:
    """Apply one event; the only place the breaker changes state."""
    current = (state or BreakerState(endpoint=event.endpoint)).effective(event.at, config)
    update: dict[str, object] = {"updated_at": event.at}
    if event.outcome is Outcome.FAILURE:
        update.update(last_failure=event.at, last_error=event.detail)
        if current.state is State.HALF_OPEN:
            update.update(state=State.OPEN, opened_at=event.at, success_count=0)
            update["failure_count"] = current.failure_count + 1
        elif current.state is State.CLOSED:
            failures = current.failure_count + 1
            update["failure_count"] = failures
            if failures >= config.failure_threshold:
                update.update(state=State.OPEN, opened_at=event.at, success_count=0)
        else:  # already open: count it, but the reset timeout runs from the opening
            update["failure_count"] = current.failure_count + 1
    else:
        if current.state is State.HALF_OPEN:
            successes = current.success_count + 1
            if successes >= config.success_threshold:
                update.update(state=State.CLOSED, failure_count=0, success_count=successes)
            else:
                update.update(state=State.HALF_OPEN, success_count=successes)
        elif current.state is State.CLOSED:
            update.update(failure_count=0, success_count=current.success_count + 1)
        else:
            # A success reported while open comes from a job that started before the breaker
            # opened: it says nothing about Docker now, so the breaker waits for its timeout.
            return current.model_copy(update={"updated_at": event.at})
    return current.model_copy(update=update)


def changelog_topic(consumer_group: str) -> str:
    """The shared breaker table's changelog, named as faust names it (app id, table name)."""
    return f"{consumer_group}-app-{consumer_group}-breaker-changelog"


def endpoint_key(docker_host: str | None, hostname: str) -> str:
    """One breaker per Docker engine: a local socket is per host, a TCP endpoint is global."""
    host = docker_host or "unix:///var/run/docker.sock"
    if host.startswith(("unix://", "npipe://")) or "://" not in host:
        return f"{hostname}|{host}"
    return host


class Ticket:
    """Leave to use Docker for one job; a half-open breaker hands out one at a time per worker."""

    def __init__(self, breaker: Breaker | None, trial: bool) -> None:
        self._breaker = breaker
        self.trial = trial

    def release(self) -> None:
        if self._breaker is not None and self.trial:
            self._breaker._trial_busy = False
            self._breaker = None


class Breaker:
    """A worker's handle on the shared breaker: reads the GlobalTable, publishes outcomes."""

    def __init__(
        self,
        *,
        endpoint: str,
        config: BreakerConfig,
        worker_id: str,
        read: Callable[[str], Any],
        publish: Callable[[BreakerEvent], Awaitable[None]],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.endpoint = endpoint
        self.config = config
        self._worker_id = worker_id
        self._read = read
        self._publish = publish
        self._clock = clock
        self._trial_busy = False

    def view(self) -> BreakerState:
        """The shared state as this worker sees it now."""
        raw = self._read(self.endpoint)
        state = BreakerState(endpoint=self.endpoint)
        if raw:
            try:
                state = BreakerState.model_validate(raw)
            except ValueError:
                log.warning("unreadable breaker state for %s: %r", self.endpoint, raw)
        return state.effective(self._clock(), self.config)

    def acquire(self) -> Ticket | None:
        """A ticket to run a container, or None while the breaker is open."""
        state = self.view().state
        if state is State.CLOSED:
            return Ticket(None, trial=False)
        if state is State.HALF_OPEN and not self._trial_busy:
            self._trial_busy = True
            return Ticket(self, trial=True)
        return None

    async def record(self, outcome: Outcome, *, source: str, detail: str | None = None) -> None:
        """Publish an outcome; plain successes while all is well are not worth an event."""
        if outcome is Outcome.SUCCESS:
            current = self.view()
            if current.state is State.CLOSED and current.failure_count == 0:
                return
        event = BreakerEvent(
            endpoint=self.endpoint,
            outcome=outcome,
            at=self._clock(),
            worker_id=self._worker_id,
            source=source,
            detail=detail[:500] if detail else None,
        )
        try:
            await self._publish(event)
        except Exception:  # the breaker must never take a job down with it
            log.exception("could not publish a breaker event")
