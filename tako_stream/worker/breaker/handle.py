"""A worker's handle on the shared breaker: asks it before using Docker, tells it outcomes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from tako_stream.settings import BreakerConfig
from tako_stream.worker.breaker.state import (
    MAX_DETAIL,
    BreakerEvent,
    BreakerState,
    Outcome,
    Source,
    State,
)

log = logging.getLogger(__name__)

__all__ = ["Breaker", "Outcome", "Ticket"]


class Ticket:
    """Leave to use Docker for one job; a half-open breaker hands out one at a time per worker."""

    def __init__(self, on_release: Callable[[], None] | None = None) -> None:
        self._on_release = on_release

    def release(self) -> None:
        if self._on_release is not None:
            self._on_release()
            self._on_release = None


class Breaker:
    """Reads the shared state (``read``: endpoint → state) and publishes outcomes."""

    def __init__(
        self,
        *,
        endpoint: str,
        config: BreakerConfig,
        worker_id: str,
        read: Callable[[str], BreakerState | None],
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
        state = self._read(self.endpoint) or BreakerState(endpoint=self.endpoint)
        return state.effective(self._clock(), self.config)

    def acquire(self) -> Ticket | None:
        """A ticket to run a container, or None while the breaker is open."""
        state = self.view().state
        if state is State.CLOSED:
            return Ticket()
        if state is State.HALF_OPEN and not self._trial_busy:
            self._trial_busy = True
            return Ticket(self._end_trial)
        return None

    def _end_trial(self) -> None:
        self._trial_busy = False

    async def record(self, outcome: Outcome, *, source: Source, detail: str | None = None) -> None:
        """Publish an outcome; plain successes while all is well are not worth an event."""
        try:  # the breaker must never take a job (or the ping task, and the worker) down with it
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
                detail=detail[:MAX_DETAIL] if detail else None,
            )
            await self._publish(event)
        except Exception:
            log.exception("could not publish a breaker event")
