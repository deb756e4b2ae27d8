"""The workers as their reports on the workers topic say (``worker.reports``): what the
gateway, which never talks to Docker, answers about engines, runtimes, images and capacity."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from tako_stream.core.models import WorkerReport
from tako_stream.logs import Condition

log = logging.getLogger(__name__)

#: A report older than this many of its intervals is a dead worker's; one dated as far ahead
#: is no live worker's either (a clock gone wrong, or anyone's record: it would never go stale).
STALE_AFTER = 3
#: Reports kept at most: more workers than a cluster runs.  Anyone may write to the workers
#: topic, and each key was kept until a tombstone for it came.
MAX_REPORTS = 1024
#: Reports gone stale are dropped at most this often (each sweep walks them all).
SWEEP_EVERY = timedelta(seconds=1)


def _live(report: WorkerReport, now: datetime) -> bool:
    return abs(now - report.at) <= timedelta(seconds=report.interval * STALE_AFTER)


class WorkerReports:
    """The latest report of each live worker, folded from the compacted workers topic."""

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._by_worker: dict[str, WorkerReport] = {}
        self._clock = clock
        self._swept = clock()
        self._full = Condition(
            f"more than {MAX_REPORTS} workers report: the others' reports are ignored", log
        )

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        worker_id = key.decode("utf-8", "replace")
        if value is None:  # it stopped
            self._by_worker.pop(worker_id, None)
            return
        try:
            report = WorkerReport.model_validate_json(value)
        except ValidationError:
            log.debug("skipped a record on the workers topic that is no report: %r", key[:64])
            return
        if report.worker_id != worker_id:  # workers key theirs by worker_id (at most 256 chars)
            log.debug("skipped a report keyed other than its worker: %r", key[:64])
            return
        now = self._clock()
        self._sweep(now)
        if not _live(report, now):  # a dead worker's last word (read again at start), or ahead
            self._by_worker.pop(worker_id, None)
            return
        if worker_id not in self._by_worker and len(self._by_worker) >= MAX_REPORTS:
            self._full.wrong(f"{worker_id!r} and others not counted")
            return
        self._by_worker[worker_id] = report
        if len(self._by_worker) < MAX_REPORTS:
            self._full.right()

    def _sweep(self, now: datetime) -> None:
        """Drop the reports gone stale since they came (a worker that died says nothing)."""
        if abs(now - self._swept) < SWEEP_EVERY:
            return
        self._by_worker = {k: r for k, r in self._by_worker.items() if _live(r, now)}
        self._swept = now

    def __len__(self) -> int:
        return len(self._by_worker)

    def live(self, now: datetime | None = None) -> list[WorkerReport]:
        """The reports of workers alive now: each within ``STALE_AFTER`` intervals of now
        (reports go stale between sweeps)."""
        now = now or self._clock()
        return [report for report in self._by_worker.values() if _live(report, now)]

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
