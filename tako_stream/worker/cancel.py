"""Cancellation: requests on the control topic, seen by every worker.

A cancel is a ``CancelRequest`` on the control topic, keyed by ``execution_id``.  Every worker
reads that topic whole (no consumer group), so whichever worker holds the job — now, or after a
rebalance or a restart — knows of it: a job that has not started is answered ``cancelled``
without a container; a running one gets SIGTERM and, ``cancel_grace`` seconds later, SIGKILL
(exit code 143 or 137, status ``cancelled``).  Whoever asks (gateway, CLI, client) refuses to
cancel a job whose result is already on the results topic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from tako_stream.core.models import CancelRequest
from tako_stream.kafka.view import KeyedView

log = logging.getLogger(__name__)


class Cancellations:
    """Cancel requests seen so far (the most recent ``keep``), and the jobs running here."""

    def __init__(self, keep: int = 100_000) -> None:
        self._requested: KeyedView[CancelRequest] = KeyedView(
            CancelRequest.model_validate_json,
            keep=keep,
            name="control topic",
            key_of=lambda request: request.execution_id,
        )
        self._running: dict[str, asyncio.Event] = {}
        #: Set once the control topic has been read up to where it ended at start-up.
        self.caught_up = asyncio.Event()

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Fold one control-topic record in (``kafka.reader.tail`` calls this)."""
        request = self._requested.apply(key, value)
        if request is None:
            return
        event = self._running.get(request.execution_id)
        if event is not None:
            log.info("cancel requested for running job %s", request.execution_id)
            event.set()

    def requested(self, execution_id: str) -> CancelRequest | None:
        return self._requested.get(execution_id)

    @contextmanager
    def watch(self, execution_id: str) -> Iterator[asyncio.Event]:
        """An event set when ``execution_id`` is cancelled, for as long as it runs here."""
        event = asyncio.Event()
        if execution_id in self._requested:
            event.set()
        self._running[execution_id] = event
        try:
            yield event
        finally:
            if self._running.get(execution_id) is event:
                del self._running[execution_id]
