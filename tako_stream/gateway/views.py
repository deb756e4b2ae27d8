"""What the gateway knows of the cluster, all of it read from topics.

Results come from the results topic (read from the beginning into a bounded local view, through
a ``Client``), a running job is one a worker announced on the status topic, a queued one has
its request on the requests topic and neither, the breakers come from their table's changelog
and the DLQ from its topic.  Nothing is kept that Kafka does not hold, so any number of gateways
can run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Literal

from tako_stream import dlq
from tako_stream.client import Client
from tako_stream.core.errors import BrokerError
from tako_stream.core.models import ExecutionResult, JobStatus
from tako_stream.kafka.reader import latest, tail
from tako_stream.kafka.topics import TopicDirectory, ensure_topics, partitions
from tako_stream.kafka.view import KeyedView
from tako_stream.logs import Condition
from tako_stream.settings import Settings
from tako_stream.worker.breaker.shared import BreakerStates

log = logging.getLogger(__name__)

State = Literal["done", "running", "queued", "unknown"]

#: Seconds the broker has to answer a health check.
BROKER_CHECK = 5.0


class ClusterView:
    """Results, running jobs, breakers and dead letters, kept up to date from their topics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = Client(settings, keep=settings.gateway_keep, history=True)
        self.dlq = dlq.DLQView()
        #: Jobs a worker said it is running (the status topic), the newest ``gateway_keep``.
        self.running: KeyedView[JobStatus] = KeyedView(
            JobStatus.model_validate_json,
            keep=settings.gateway_keep,
            name="status topic",
            key_of=lambda status: status.execution_id,
        )
        self.breakers = BreakerStates(settings.breaker)
        self.topics = TopicDirectory(settings)
        self.broker = Condition("the Kafka broker is unreachable", log)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        s = self.settings
        await ensure_topics(s)
        await self.client.start()
        self._tasks = [
            asyncio.create_task(dlq.follow(s, self.dlq)),
            asyncio.create_task(tail(s, s.breaker_changelog_topic, self.breakers.apply)),
            asyncio.create_task(tail(s, s.status_topic, self.running.apply)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.client.close()

    def status(self, execution_id: str) -> str:
        """The job's status as far as this gateway has read: its result's, or running/queued."""
        result = self.client.known(execution_id)
        if result is not None:
            return result.status.value
        return "running" if execution_id in self.running else "queued"

    async def find(self, execution_id: str) -> tuple[State, ExecutionResult | None]:
        """("done", result), ("running" | "queued", None) or ("unknown", None)."""
        result = self.client.known(execution_id)
        if result is not None:
            return "done", result
        with contextlib.suppress(TimeoutError):
            return "done", await self.client.result(execution_id, timeout=0.05)
        if execution_id in self.running:
            return "running", None
        request = await latest(self.settings, self.settings.requests_topic, execution_id)
        return ("queued", None) if request is not None else ("unknown", None)

    def pending(self, execution_id: str, state: State) -> dict[str, Any]:
        """A job without a result, in the shape of ``GET /jobs/{id}``."""
        record: dict[str, Any] = {"job_id": execution_id, "execution_id": execution_id}
        record["status"] = state
        status = self.running.get(execution_id) if state == "running" else None
        if status is not None:
            record |= {"worker_id": status.worker_id, "started_at": status.at.isoformat()}
        return record

    async def reply_to_problem(self, topic: str | None) -> str | None:
        """Why a request's ``reply_to`` would be refused by the workers, or None (also when the
        broker cannot tell now: the workers check again)."""
        if topic is None or topic == self.settings.results_topic:
            return None
        problem = self.settings.reply_to.problem(topic)
        if problem is not None:
            return problem
        try:
            exists = await self.topics.exists(topic)
        except BrokerError:
            return None
        return None if exists else f"reply_to: topic {topic!r} does not exist"

    async def broker_available(self) -> bool:
        """Whether the broker answers a metadata request within ``BROKER_CHECK`` seconds
        (``broker.since`` says since when it has not)."""
        try:
            async with asyncio.timeout(BROKER_CHECK):
                await partitions(self.settings, self.settings.results_topic)
        except Exception as exc:
            self.broker.wrong(f"no answer to a metadata request ({exc!r})")
            return False
        self.broker.right()
        return True
