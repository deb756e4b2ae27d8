"""The circuit breaker's state machine, as a pure fold over events.

States follow Tako VM: ``closed`` (normal) → ``open`` after ``failure_threshold`` consecutive
Docker failures (jobs answered at once with ``service_unavailable``) → ``half_open`` once
``reset_timeout`` has passed (limited trial traffic) → ``closed`` after ``success_threshold``
successes, or back to ``open`` on any failure.

Why a fold over events: the state is shared by every worker of a host, and several workers
updating one record concurrently would lose updates.  So workers only publish outcomes, and one
writer applies ``fold`` to them in order (see ``shared``).  ``half_open`` is not stored when it
is reached by time alone: readers derive it from ``opened_at`` with ``effective``, so no timer
has to fire for it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

from tako_stream.core.models import UtcDatetime, WorkerId
from tako_stream.settings import BreakerConfig

#: The longest detail an event carries (``Breaker.record`` cuts it to this).
MAX_DETAIL = 500
#: Far more consecutive outcomes than a breaker ever counts, and what orjson (64-bit integers:
#: the table's writer, /health) and float gauges (/metrics) all carry: a record past it is not
#: ours, and is skipped like any other unreadable record.
MAX_COUNT = 2**53


#: What reported an outcome: a job's use of Docker, or the worker's ping.  Nothing else is ever
#: sent, and the events topic is anyone's: free text here was copied into the state, whose size
#: then had no bound.
Source = Literal["job", "ping"]


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


class BreakerEvent(BaseModel):
    """One outcome of talking to Docker, published by any worker."""

    endpoint: str
    outcome: Outcome
    at: UtcDatetime
    worker_id: WorkerId
    source: Source = "job"
    detail: str | None = Field(default=None, max_length=MAX_DETAIL)


class BreakerState(BaseModel):
    """The shared record for one Docker endpoint (the shared table's value)."""

    endpoint: str
    state: State = State.CLOSED
    failure_count: int = Field(default=0, ge=0, le=MAX_COUNT)
    success_count: int = Field(default=0, ge=0, le=MAX_COUNT)
    last_failure: UtcDatetime | None = None
    last_error: str | None = Field(default=None, max_length=MAX_DETAIL)
    #: What reported the last failure.
    failure_source: Source | None = None
    opened_at: UtcDatetime | None = None
    updated_at: UtcDatetime | None = None

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
        update.update(last_failure=event.at, last_error=event.detail, failure_source=event.source)
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
            if event.source == "ping" and current.failure_source == "job":
                # The daemon answering /info says nothing of create and start failing: only a
                # job that ran ends a run of job failures (a ping ends a run of ping failures).
                return current.model_copy(update={"updated_at": event.at})
            update.update(failure_count=0, success_count=current.success_count + 1)
        else:
            # A success reported while open comes from a job that started before the breaker
            # opened: it says nothing about Docker now, so the breaker waits for its timeout.
            return current.model_copy(update={"updated_at": event.at})
    return current.model_copy(update=update)


def endpoint_key(docker_host: str | None, hostname: str) -> str:
    """One breaker per Docker engine: a local socket is per host, a TCP endpoint is global."""
    host = docker_host or "unix:///var/run/docker.sock"
    if host.startswith(("unix://", "npipe://")) or "://" not in host:
        return f"{hostname}|{host}"
    return host
