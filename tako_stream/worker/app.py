"""The worker process: a faust app (breaker table, web views, lifecycle) around the tako services.

faust runs the process: its ``Worker`` starts the app and our ``Runtime`` service together,
handles SIGTERM/SIGINT by stopping both in order, and serves the web views on
``TAKO_WEB_PORT``.  The request stream itself is consumed by ``Intake`` (see its docstring for
why that is plain aiokafka rather than a faust agent).

The circuit breaker's state is shared through a faust table: workers publish outcomes to a
single-partition events topic; the one worker that owns that partition (faust's group gives it
to exactly one) folds them, in order, into a one-partition ``Table``.  One partition on both
sides keeps the agent's writes legal (a table written from an agent must have as many changelog
partitions as the agent's source topic has partitions) and gives a single writer, so concurrent
read-modify-writes cannot lose updates; when that worker dies, faust hands the partition to
another, which recovers the table from its changelog and goes on folding.

Every worker reads the table's state from its changelog, tailed into a local dict.  A
``GlobalTable`` would be the textbook reader, but faust treats a GlobalTable's partitions as
active on every worker and never applies changelog records to an active partition after
recovery, so readers other than the writer never see a transition (faust-streaming #283; seen
here with and without ``synchronize_all_active_partitions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import aiodocker
import faust
from aiokafka.admin import NewTopic
from mode import Service
from pydantic import ValidationError

from tako_stream import dlq, logs
from tako_stream.core.errors import SandboxUnavailableError
from tako_stream.core.jobtypes import JobTypes
from tako_stream.dlq import DLQStore
from tako_stream.kafka.codec import dumps, loads
from tako_stream.kafka.topics import ensure_topics, tail
from tako_stream.metrics import BREAKER_VALUES, CONTENT_TYPE, Metric, Metrics, gauge
from tako_stream.sandbox.docker import DockerSandbox
from tako_stream.sandbox.pool import SandboxPool, WarmPool
from tako_stream.settings import Settings
from tako_stream.worker.breaker.state import (
    Breaker,
    BreakerConfig,
    BreakerEvent,
    BreakerState,
    Outcome,
    State,
    endpoint_key,
    fold,
)
from tako_stream.worker.cancel import Cancellations
from tako_stream.worker.execute import Executor, default_limits
from tako_stream.worker.intake import Intake

log = logging.getLogger(__name__)


class Runtime(Service):
    """Owns the Docker client, the pool, the breaker handle and the intake."""

    def __init__(
        self,
        settings: Settings,
        job_types: JobTypes,
        breaker: Breaker,
        app: faust.App,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.job_types = job_types
        self.breaker = breaker
        self.app = app
        self.docker: aiodocker.Docker | None = None
        self.sandbox: DockerSandbox | None = None
        self.intake: Intake | None = None
        self.warm: WarmPool | None = None
        self.docker_available = False
        self.dlq = DLQStore(keep_originals=False)
        self.cancellations: Cancellations | None = None
        self.metrics = Metrics()
        self.metrics.add_gauges(self._gauges)
        #: Set once faust has joined its group and recovered the breaker table.
        self.app_started = False
        self._followed: list[tuple[str, Callable[[bytes | None, bytes | None], None]]] = []

    def follow(self, topic: str, apply: Callable[[bytes | None, bytes | None], None]) -> None:
        """Tail ``topic`` into a local view once started."""
        self._followed.append((topic, apply))

    async def on_start(self) -> None:
        s = self.settings
        self.docker = aiodocker.Docker()
        self.sandbox = DockerSandbox(
            self.docker, worker_id=s.worker_id, timeout_grace=s.timeout_grace
        )
        try:
            await self.sandbox.ping()
            self.docker_available = True
            reaped = await self.sandbox.reap()
            if reaped:
                log.warning("removed %d container(s) left by dead workers", reaped)
        except SandboxUnavailableError as exc:
            log.error("%s; jobs will fail until it is back", exc)
        shapes = [  # each job type's default container, and how many to keep ready
            (default_limits(t), s.warm_pool_size if t.warm_pool_size is None else t.warm_pool_size)
            for t in self.job_types.values()
        ]
        self.warm = WarmPool(
            self.sandbox,
            shapes,
            max_idle=s.warm_max_idle,
            busy=lambda: pool.in_flight,
        )
        pool = SandboxPool(self.sandbox, s.pool_size, self.warm)
        self.warm.start()
        executor = Executor(pool, self.job_types, s, breaker=self.breaker)
        # Know the cancels already on the control topic before taking jobs (bounded: a broker
        # that is slow to answer must not keep the worker from starting).
        self.cancellations = Cancellations()
        await ensure_topics(s)
        self.add_future(
            tail(s, s.control_topic, self.cancellations.apply, self.cancellations.caught_up)
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.cancellations.caught_up.wait(), 15)
        self.intake = Intake(s, executor, cancellations=self.cancellations, loop=self.loop)
        self.intake.on_answered = self.metrics.observe
        await self.intake.start()
        self.add_future(self._ping_docker())
        self.add_future(dlq.follow(s, self.dlq))
        for topic, apply in self._followed:
            self.add_future(tail(s, topic, apply))
        log.info("worker %s consuming %s", s.worker_id, s.requests_topic)

    async def on_stop(self) -> None:
        if self.intake is not None:
            await self.intake.stop()
        if self.warm is not None:
            await self.warm.drain()
        if self.sandbox is not None:
            await self.sandbox.drain()  # removals run in the background: wait for all of them
        if self.docker is not None:
            await self.docker.close()

    async def _ping_docker(self) -> None:
        """Feed the breaker without traffic: a dead daemon is noticed, a live one closes it."""
        assert self.sandbox is not None
        while True:
            await asyncio.sleep(self.settings.breaker_ping_interval)
            try:
                await self.sandbox.ping()
            except SandboxUnavailableError as exc:
                self.docker_available = False
                await self.breaker.record(Outcome.FAILURE, source="ping", detail=str(exc))
            else:
                self.docker_available = True
                await self.breaker.record(Outcome.SUCCESS, source="ping")

    def _gauges(self) -> Iterable[Metric]:
        state = self.breaker.view()
        yield gauge(
            "tako_in_flight",
            "Jobs accepted and not yet answered.",
            {(): self.intake.in_flight if self.intake else 0},
            [],
        )
        sizes = self.warm.sizes() if self.warm else {}
        yield gauge(
            "tako_warm_pool_ready",
            "Started containers waiting for a job, by image.",
            {(image,): n for image, n in sizes.items()},
            ["image"],
        )
        yield gauge(
            "tako_breaker_state",
            "The shared Docker circuit breaker: 0 closed, 1 half-open, 2 open.",
            {(state.endpoint,): BREAKER_VALUES[state.state]},
            ["endpoint"],
        )
        yield gauge(
            "tako_breaker_failures",
            "Consecutive Docker failures the breaker has counted.",
            {(state.endpoint,): state.failure_count},
            ["endpoint"],
        )
        yield gauge(
            "tako_docker_available",
            "1 when the Docker engine answers.",
            {(): int(self.docker_available)},
            [],
        )
        yield gauge(
            "tako_dlq_size", "Entries in the DLQ topic now.", {(): len(self.dlq.entries)}, []
        )

    def health(self) -> dict[str, Any]:
        """Tako VM's health shape, plus readiness and this worker's identity."""
        state = self.breaker.view()
        intake = self.intake
        rebalancing = bool(getattr(self.app, "rebalancing", False))
        recovering = not self.app_started
        healthy = self.docker_available and state.state is State.CLOSED
        return {
            "status": "healthy" if healthy else "degraded",
            "docker_available": self.docker_available,
            "circuit_breaker": {
                "state": state.state.value,
                "failure_count": state.failure_count,
                "success_count": state.success_count,
                "last_failure": state.last_failure.isoformat() if state.last_failure else None,
            },
            "ready": bool(intake and intake.assigned) and not (rebalancing or recovering),
            "recovering": recovering,
            "rebalancing": rebalancing,
            "worker_id": self.settings.worker_id,
            "in_flight": intake.in_flight if intake else 0,
            "warm_pool": self.warm.sizes() if self.warm else {},
            "answered": intake.answered if intake else 0,
        }


def build(settings: Settings) -> tuple[faust.App, Runtime]:
    """The faust app with the breaker topic, table and agent, and the runtime wired to them."""
    app = faust.App(
        f"{settings.consumer_group}-app",
        broker=f"kafka://{settings.kafka_bootstrap_servers}",
        web_port=settings.web_port,
        web_bind=settings.web_host,
        store="memory://",
        topic_partitions=1,
        topic_replication_factor=settings.topic_replication,
        datadir=f"/tmp/tako-stream-{settings.worker_id}",
        producer_acks=-1,
        # A dead worker's faust membership (and so the breaker writer's partition) is handed
        # on after 10 s rather than faust's default 60 s.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        broker_rebalance_timeout=20.0,
    )
    config = BreakerConfig(
        failure_threshold=settings.breaker_failure_threshold,
        reset_timeout=settings.breaker_reset_timeout,
        success_threshold=settings.breaker_success_threshold,
    )
    events = app.topic(
        settings.breaker_topic, partitions=1, key_serializer="raw", value_serializer="raw"
    )
    table = app.Table(
        f"{settings.consumer_group}-breaker",
        partitions=1,
        schema=faust.Schema(key_serializer="raw", value_serializer="json"),
    )
    shared: dict[str, Any] = {}  # endpoint -> state, as of the changelog tailed by this worker

    @app.agent(events)
    async def fold_breaker_events(stream: Any) -> None:
        async for raw in stream:
            try:
                event = BreakerEvent.model_validate_json(raw)
            except ValidationError:
                log.warning("ignoring an unreadable breaker event: %r", raw[:200])
                continue
            key = event.endpoint.encode()
            previous = table.get(key)
            state = BreakerState.model_validate(previous) if previous else None
            new = fold(state, event, config)
            before = state.effective(event.at, config).state if state else State.CLOSED
            if new.state != before:
                log.warning(
                    "circuit breaker %s: %s -> %s (%s from %s)",
                    event.endpoint,
                    before.value,
                    new.state.value,
                    event.outcome.value,
                    event.worker_id,
                )
            table[key] = new.model_dump(mode="json")

    async def publish(event: BreakerEvent) -> None:
        await events.send(key=event.endpoint.encode(), value=dumps(event))

    def read(endpoint: str) -> Any:
        return shared.get(endpoint)

    def apply_changelog(key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        endpoint = key.decode("utf-8", "replace")
        if value is None:
            shared.pop(endpoint, None)
            return
        try:
            shared[endpoint] = loads(value)
        except ValueError:
            log.warning("unreadable breaker state for %s", endpoint)

    breaker = Breaker(
        endpoint=endpoint_key(os.environ.get("DOCKER_HOST"), socket.gethostname()),
        config=config,
        worker_id=settings.worker_id,
        read=read,
        publish=publish,
        clock=lambda: datetime.now(UTC),
    )
    runtime = Runtime(settings, JobTypes.load(settings.job_types_file), breaker, app)
    runtime.follow(table.changelog_topic.get_topic_name(), apply_changelog)

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        return web.json(runtime.health())

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        return web.bytes(runtime.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    @app.page("/dlq/stats")
    async def dlq_stats(web: Any, request: Any) -> Any:
        return web.json(runtime.dlq.stats())

    @app.page("/dlq")
    async def dlq_list(web: Any, request: Any) -> Any:
        query = request.query
        try:
            since = dlq.parse_time(query.get("since"))
            until = dlq.parse_time(query.get("until"))
        except ValueError as exc:
            return web.json({"detail": str(exc)}, status=400)
        entries = runtime.dlq.select(error_type=query.get("error_type"), since=since, until=until)
        return web.json(
            {"total": len(entries), "entries": [e.model_dump(mode="json") for e in entries]}
        )

    @app.page("/dlq/{dlq_id}")
    class DLQEntry(faust.web.View):
        async def get(self, request: Any, dlq_id: str) -> Any:
            entry = runtime.dlq.entries.get(dlq_id)
            if entry is None:
                return self.json({"detail": f"no DLQ entry {dlq_id}"}, status=404)
            return self.json(entry.model_dump(mode="json"))

        async def delete(self, request: Any, dlq_id: str) -> Any:
            if dlq_id not in runtime.dlq.entries:
                return self.json({"detail": f"no DLQ entry {dlq_id}"}, status=404)
            await dlq.delete(settings, [dlq_id])
            runtime.dlq.apply(dlq_id.encode(), None)
            return self.json({"deleted": dlq_id})

    return app, runtime


class _Worker(faust.Worker):
    """faust's worker with our logging (job ids on every line, optional JSON)."""

    def __init__(
        self, app: faust.App, runtime: Runtime, *, settings: Settings, **kwargs: Any
    ) -> None:
        self._tako_settings = settings
        self._runtime = runtime
        super().__init__(app, runtime, **kwargs)

    def _setup_logging(self) -> None:
        logs.configure(self._tako_settings.log_level, self._tako_settings.log_format)

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        self._runtime.app_started = True
        log.info("faust app ready: breaker table recovered")


def _faust_topics(app: faust.App, settings: Settings) -> list[NewTopic]:
    """The breaker's topics, created before faust starts: when two workers start together,
    faust creating them lazily races, and its producer then crashes on a partition its metadata
    does not know yet."""
    specs = [NewTopic(settings.breaker_topic, 1, settings.topic_replication)]
    for table in app.tables.values():
        specs.append(
            NewTopic(
                table.changelog_topic.get_topic_name(),
                1,
                settings.topic_replication,
                topic_configs={"cleanup.policy": "compact"},
            )
        )
    return specs


def run_worker(settings: Settings) -> int:
    """Run a worker until SIGTERM/SIGINT; returns the process exit code."""
    app, runtime = build(settings)
    asyncio.run(ensure_topics(settings, extra=_faust_topics(app, settings)))
    worker = _Worker(
        app,
        runtime,
        settings=settings,
        quiet=True,
        redirect_stdouts=False,
        loglevel=settings.log_level,
    )
    _tune_gc()
    worker.execute_from_commandline()
    return 0


def _tune_gc() -> None:
    """Collect cycles less often: each request allocates many short-lived objects (records,
    models, futures) that reference counting frees, yet they trip CPython's default gen-0
    threshold (700) every few requests; the objects made while starting up are frozen out of
    collection.  Not much higher than 5,000: garbage cycles holding ~1 MB messages then live
    long enough to raise RSS under floods of them (20,000 failed the flood test by ~57 MiB)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(5_000, 20, 50)
