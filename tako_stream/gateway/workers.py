"""The workers as their reports on the workers topic say (``worker.reports``): what the
gateway, which never talks to Docker, answers about engines, runtimes, images and capacity."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from tako_stream.core.models import WorkerReport

log = logging.getLogger(__name__)

#: A report older than this many of its intervals is a dead worker's.
STALE_AFTER = 3


class WorkerReports:
    """The latest report of each worker, folded from the compacted workers topic."""

    def __init__(self) -> None:
        self._by_worker: dict[str, WorkerReport] = {}

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        worker_id = key.decode("utf-8", "replace")
        if value is None:  # it stopped
            self._by_worker.pop(worker_id, None)
            return
        try:
            self._by_worker[worker_id] = WorkerReport.model_validate_json(value)
        except ValidationError:
            log.debug("skipped a record on the workers topic that is no report: %r", key)

    def live(self, now: datetime | None = None) -> list[WorkerReport]:
        """The reports of workers alive now: each younger than ``STALE_AFTER`` intervals."""
        now = now or datetime.now(UTC)
        return [
            report
            for report in self._by_worker.values()
            if now - report.at <= timedelta(seconds=report.interval * STALE_AFTER)
        ]

    def slots(self, now: datetime | None = None) -> int:
        """Jobs the live workers run at once (Tako VM's ``max_workers``)."""
        return sum(report.pool_size for report in self.live(now))

    def docker_available(self, now: datetime | None = None) -> bool | None:
        """Whether a live worker's engine answers; None when no worker reports."""
        live = self.live(now)
        return any(r.docker_available for r in live) if live else None

    def has_runtime(self, runtime: str, now: datetime | None = None) -> bool:
        """Whether a live worker's engine has the OCI runtime (``runsc``: gVisor)."""
        return any(runtime in r.runtimes for r in self.live(now))

    def image_exists(self, image: str, now: datetime | None = None) -> bool | None:
        """Whether a live worker's engine holds the image; None when no worker reports."""
        live = self.live(now)
        return any(r.images.get(image, False) for r in live) if live else None
