"""What a worker runs besides faust: the sandbox, the pools, the executor and the intake, built
once from the settings and stopped in reverse order; its health and gauges read from them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

import aiodocker
import aiohttp
import faust
from mode import Service

from tako_stream import dlq
from tako_stream.core.errors import SandboxError, SandboxUnavailableError
from tako_stream.core.jobtypes import JobTypes, default_limits
from tako_stream.dlq import DLQView
from tako_stream.kafka.reader import tail
from tako_stream.kafka.topics import TopicDirectory, ensure_topics, partitions
from tako_stream.logs import Condition
from tako_stream.metrics import BREAKER_VALUES, Metric, Metrics, gauge
from tako_stream.sandbox.docker import DockerSandbox
from tako_stream.sandbox.pool import SandboxPool, WarmPool
from tako_stream.settings import Settings
from tako_stream.worker.answered import AnsweredIndex
from tako_stream.worker.breaker.handle import Breaker, Outcome
from tako_stream.worker.breaker.shared import BreakerStates
from tako_stream.worker.breaker.state import State
from tako_stream.worker.cancel import Cancellations
from tako_stream.worker.execute import Executor
from tako_stream.worker.intake import STOP_STEP, Intake
from tako_stream.worker.reports import Reporter
from tako_stream.worker.stream import KafkaSink, KafkaSource

log = logging.getLogger(__name__)

#: Seconds between two checks that the broker answers (and longest one may take).
BROKER_CHECK = 5.0

#: Exit code of a worker that stopped without committing every answer it sent (EX_TEMPFAIL).
EXIT_UNCOMMITTED = 75

#: Seconds a starting worker waits to know the cancels on the control topic and the answers
#: published lately: a broker slow to answer must not keep it from starting.
CATCH_UP = 15.0

#: Seconds between two looks for containers this worker lost track of (one filtered listing),
#: besides the look each time the engine answers again after it was away.
SWEEP_EVERY = 60.0


class Runtime(Service):
    """Owns the Docker client, the pools, the breaker handle and the intake."""

    def __init__(
        self,
        settings: Settings,
        job_types: JobTypes,
        breaker: Breaker,
        breaker_states: BreakerStates,
        app: faust.App,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.job_types = job_types
        self.breaker = breaker
        self.breaker_states = breaker_states
        self.app = app
        self.docker: aiodocker.Docker | None = None
        self.sandbox: DockerSandbox | None = None
        self.intake: Intake | None = None
        self.warm: WarmPool | None = None
        self.reporter: Reporter | None = None
        self.docker_available = False
        self.dlq = DLQView()
        self.cancellations = Cancellations()
        self.metrics = Metrics(job_types=job_types)
        self.metrics.add_gauges(self._gauges)
        #: Set once faust has joined its group and recovered the breaker table.
        self.app_started = False
        #: The process's exit code: EXIT_UNCOMMITTED when answers sent could not be committed
        #: (they will be delivered again to the partitions' next owner).
        self.exit_code = 0
        self.stopped = False
        self.broker = Condition("the Kafka broker is unreachable", log)
        self.engine = Condition("the Docker engine does not answer", log)

    async def on_start(self) -> None:
        s = self.settings
        self.docker = aiodocker.Docker(timeout=aiohttp.ClientTimeout(total=s.docker_timeout))
        self.sandbox = DockerSandbox(
            self.docker,
            worker_id=s.worker_id,
            timeout_grace=s.timeout_grace,
            api_timeout=s.docker_timeout,
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
            busy=lambda: pool.busy,
            capacity=s.pool_size,
        )
        pool = SandboxPool(self.sandbox, s.pool_size, self.warm)
        self.warm.start()
        executor = Executor(
            pool,
            self.job_types,
            worker_id=s.worker_id,
            caps=s.output_caps,
            retry=s.retry,
            cancel_grace=s.cancel_grace,
            breaker=self.breaker,
        )
        await ensure_topics(s)
        # Know the cancels already on the control topic, the answers published lately ...
        control, states = self.cancellations, self.breaker_states
        answers = AnsweredIndex(s)
        self.add_future(tail(s, s.control_topic, control.apply, control.caught_up))
        self.add_future(tail(s, s.breaker_changelog_topic, states.apply, states.caught_up))
        self.add_future(answers.run())
        # ... and the breaker's state: a worker taking jobs before it knows the breaker is open
        # would try a failing engine, and its failures would not open it sooner.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CATCH_UP):
                await control.caught_up.wait()
                await states.caught_up.wait()
                await answers.caught_up.wait()
        sink = KafkaSink(s)
        self.intake = Intake(
            KafkaSource(s),
            sink,
            executor,
            topics=s.topics,
            reply_to=s.reply_to,
            topic_exists=TopicDirectory(s).exists,
            answers=answers,
            cancellations=control,
            capacity=s.pool_size * 2,
            rejection_budget=s.rejection_budget,
            publish_timeout=s.publish_timeout,
            artifacts_timeout=s.artifacts_timeout,
            max_message_bytes=s.kafka_max_message_bytes,
            shutdown_grace=s.shutdown_grace,
            revoke_wait=s.revoke_wait,
            commit_interval=s.commit_interval,
        )
        self.intake.on_answered = self.metrics.observe
        await self.intake.start()
        intake = self.intake

        async def send_report(key: bytes, value: bytes | None) -> None:
            await sink.send(s.workers_topic, key, value, [])

        self.reporter = Reporter(
            worker_id=s.worker_id,
            images=[t.image for t in self.job_types.values()],
            pool_size=s.pool_size,
            interval=s.worker_report_interval,
            facts=self.sandbox.engine_facts,
            send=send_report,
            in_flight=lambda: intake.in_flight,
        )
        self.add_future(self.reporter.run())
        self.add_future(self._ping_docker())
        self.add_future(self._watch_broker())
        self.add_future(dlq.follow(s, self.dlq))
        log.info("worker %s consuming %s", s.worker_id, s.requests_topic)

    async def on_stop(self) -> None:
        # The report's tombstone goes out alongside the stop, not before it: with the broker
        # away it could only wait, and a stop's every second is budgeted (the producer it needs
        # is stopped last, after the jobs' grace).
        retiring = (
            asyncio.ensure_future(self.reporter.retire(STOP_STEP))
            if self.reporter is not None
            else None
        )
        if self.intake is not None and not await self.intake.stop():
            self.exit_code = EXIT_UNCOMMITTED
        if retiring is not None:
            retiring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retiring
        await self.remove_containers()
        if self.docker is not None:
            await self.docker.close()
        self.stopped = True

    @property
    def final_exit_code(self) -> int:
        """The process's exit code once faust is done: ``EXIT_UNCOMMITTED`` also when the stop
        was cut short (faust's own stop gave up on it) while jobs had been taken, since what
        they answered may not be committed."""
        if self.intake is not None and not self.stopped:
            return EXIT_UNCOMMITTED
        return self.exit_code

    def watch_shutdown(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """Exit the process ``seconds`` from now if it has not exited by then, whatever it is
        waiting for (faust's own stop waits for a broker that may never answer): its containers
        removed first (at most ``STOP_STEP``), exit code ``EXIT_UNCOMMITTED`` unless this
        runtime had stopped having committed everything."""

        def fire() -> None:
            code = self.exit_code if self.stopped else EXIT_UNCOMMITTED
            log.error("still stopping after %gs: exiting now (code %d)", seconds, code)
            if not self.stopped:
                cleanup = asyncio.run_coroutine_threadsafe(self._abandon(), loop)
                with contextlib.suppress(Exception):
                    cleanup.result(STOP_STEP + 1)
            logging.shutdown()
            os._exit(code)

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()

    async def _abandon(self) -> None:
        if self.intake is not None:
            await self.intake.abandon()
        await self.remove_containers()

    async def remove_containers(self) -> None:
        """Remove every container this worker started (bounded: with the daemon away, the next
        worker starting on this host reaps them)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_STEP):
                if self.warm is not None:
                    await self.warm.drain()
        if self.sandbox is not None:
            await self.sandbox.drain(STOP_STEP)  # removals run in the background

    async def _watch_broker(self) -> None:
        """Ask the broker for metadata every few seconds: its clients retry quietly (or loudly,
        a line per attempt) and say nothing a health check could use."""
        while True:
            try:
                async with asyncio.timeout(BROKER_CHECK):
                    await partitions(self.settings, self.settings.requests_topic)
            except Exception as exc:
                self.broker.wrong(f"no answer to a metadata request ({exc!r})")
            else:
                self.broker.right()
            await asyncio.sleep(BROKER_CHECK)

    async def _ping_docker(self) -> None:
        """Feed the breaker without traffic: a dead daemon is noticed, a live one closes it."""
        if self.sandbox is None:
            return
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + SWEEP_EVERY
        while True:
            await asyncio.sleep(self.settings.breaker_ping_interval)
            try:
                await self.sandbox.ping()
            except SandboxUnavailableError as exc:
                self.docker_available = False
                self.engine.wrong(exc)
                await self.breaker.record(Outcome.FAILURE, source="ping", detail=str(exc))
                continue
            recovered = not self.engine.ok
            self.docker_available = True
            self.engine.right()
            await self.breaker.record(Outcome.SUCCESS, source="ping")
            # After the engine was away, and now and then besides (it can restart between
            # two pings): containers made while their create's answer was lost, or whose
            # removal gave up, would otherwise stay until this worker's next start.
            if recovered or loop.time() >= next_sweep:
                next_sweep = loop.time() + SWEEP_EVERY
                await self._sweep()

    async def _sweep(self) -> None:
        assert self.sandbox is not None
        try:
            swept = await self.sandbox.sweep()
        except SandboxError as exc:  # the engine went away again: the next sweep will do
            log.info("could not look for stray containers: %s", exc)
        else:
            if swept:
                log.warning("removing %d container(s) this worker had lost track of", swept)

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
        yield gauge("tako_dlq_size", "Entries in the DLQ topic now.", {(): len(self.dlq)}, [])

    def health(self) -> dict[str, Any]:
        """Tako VM's health shape, plus readiness and this worker's identity."""
        state = self.breaker.view()
        intake = self.intake
        rebalancing = bool(getattr(self.app, "rebalancing", False))
        recovering = not self.app_started
        healthy = self.docker_available and self.broker.ok and state.state is State.CLOSED
        since = self.broker.since
        return {
            "status": "healthy" if healthy else "degraded",
            "docker_available": self.docker_available,
            "broker_available": self.broker.ok,
            "broker_unavailable_since": since.isoformat() if since else None,
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
