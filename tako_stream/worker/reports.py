"""A worker's reports of its engine on the workers topic: what the gateway says of engines.

The gateway never talks to Docker (it may run where no engine is), so each worker says, every
``TAKO_WORKER_REPORT_INTERVAL`` seconds, whether its engine answers, which OCI runtimes it has
and which job types' images it holds, with how many jobs it runs at once.  The topic is keyed
by worker id and compacted; a worker that stops says so with a tombstone, and one that dies is
counted out once its report is three intervals old.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from tako_stream import __version__
from tako_stream.core.errors import BrokerError, SandboxError
from tako_stream.core.models import WorkerReport
from tako_stream.kafka.codec import dumps
from tako_stream.logs import Condition

log = logging.getLogger(__name__)

#: (runtimes, image → present) from the engine; ``SandboxUnavailableError`` when it is away.
Facts = Callable[[list[str]], Awaitable[tuple[list[str], dict[str, bool]]]]
#: Sends (key, value) to the workers topic; a None value is a tombstone.
Send = Callable[[bytes, bytes | None], Awaitable[object]]


class Reporter:
    """Reports one worker's engine every ``interval`` seconds (each report bounded by it)."""

    def __init__(
        self,
        *,
        worker_id: str,
        images: list[str],
        pool_size: int,
        interval: float,
        facts: Facts,
        send: Send,
        in_flight: Callable[[], int],
    ) -> None:
        self.worker_id = worker_id
        self.images = sorted(set(images))
        self.pool_size = pool_size
        self.interval = interval
        self._facts = facts
        self._send = send
        self._in_flight = in_flight
        self._failing = Condition("reporting this worker on the workers topic", log)

    async def report(self) -> WorkerReport:
        """Ask the engine, then publish what it said (an engine away is reported so)."""
        try:
            runtimes, images = await self._facts(self.images)
            available = True
        except SandboxError:  # away, or refusing (a socket proxy's 403): not usable
            runtimes, images, available = [], {}, False
        report = WorkerReport(
            worker_id=self.worker_id,
            at=datetime.now(UTC),
            interval=self.interval,
            version=__version__,
            pool_size=self.pool_size,
            in_flight=self._in_flight(),
            docker_available=available,
            runtimes=runtimes,
            images=images,
        )
        await self._send(self.worker_id.encode(), dumps(report))
        return report

    async def run(self) -> None:
        """Report forever; a report that fails or takes longer than an interval is logged
        once (until one succeeds again) and the next one is tried on time."""
        while True:
            try:
                async with asyncio.timeout(self.interval):
                    await self.report()
            except (TimeoutError, BrokerError) as exc:
                self._failing.wrong(exc)
            except Exception as exc:  # a report is never worth the worker: say so, go on
                log.exception("reporting this worker failed")
                self._failing.wrong(exc)
            else:
                self._failing.right()
            await asyncio.sleep(self.interval)

    async def retire(self, timeout: float) -> None:
        """Say this worker is gone (a tombstone), best effort within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._send(self.worker_id.encode(), None)
        except Exception as exc:  # best effort: a stale report is counted out in 3 intervals
            log.warning("could not retire this worker's report: %r", exc)
