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


def _cancelled_id(raw: bytes) -> str:
    """The id a control-topic record cancels (validated as a whole ``CancelRequest``)."""
    return CancelRequest.model_validate_json(raw).execution_id


class Cancellations:
    """Cancel requests seen so far (the most recent ``keep``), and the jobs running here."""

    def __init__(self, keep: int = 100_000) -> None:
        # Only the ids (at most 128 characters): whether a job was cancelled is all anyone asks
        # here, and whole requests (reason, correlation id, time) cost 2.5-6 KB each when long,
        # several hundred megabytes at ``keep``.
        self._requested: KeyedView[str] = KeyedView(
            _cancelled_id,
            keep=keep,
            name="control topic",
            key_of=lambda execution_id: execution_id,
        )
        self._running: dict[str, asyncio.Event] = {}
        #: Set once the control topic has been read up to where it ended at start-up.
        self.caught_up = asyncio.Event()

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Fold one control-topic record in (``kafka.reader.tail`` calls this)."""
        execution_id = self._requested.apply(key, value)
        if execution_id is None:
            return
        event = self._running.get(execution_id)
        if event is not None:
            log.info("cancel requested for running job %s", execution_id)
            event.set()

    def requested(self, execution_id: str) -> bool:
        return execution_id in self._requested

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
