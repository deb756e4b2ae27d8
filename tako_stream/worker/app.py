"""The worker process: a faust app (the shared breaker, web views, lifecycle) around ``Runtime``.

faust runs the process: its ``Worker`` starts the app and our ``Runtime`` service together,
handles SIGTERM/SIGINT by stopping both in order, and serves the web views on
``TAKO_WEB_PORT``.  The request stream itself is consumed by the intake (see its docstring for
why that is plain aiokafka rather than a faust agent).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
from typing import Any

import faust

from tako_stream import dlq, logs
from tako_stream.core.jobtypes import JobTypes
from tako_stream.kafka.topics import ensure_topics
from tako_stream.metrics import CONTENT_TYPE
from tako_stream.settings import Settings
from tako_stream.worker.breaker import shared
from tako_stream.worker.breaker.handle import Breaker
from tako_stream.worker.breaker.state import endpoint_key
from tako_stream.worker.runtime import Runtime

log = logging.getLogger(__name__)

#: Seconds past the shutdown grace after which a stopping worker exits whatever it waits for
#: (the README promises TAKO_SHUTDOWN_GRACE + 15 s; the watchdog takes up to 4 more).
SHUTDOWN_MARGIN = 11.0


def build(settings: Settings) -> tuple[faust.App, Runtime]:
    """The faust app with the shared breaker, and the runtime wired to it."""
    app = faust.App(
        settings.breaker_app_id,
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
    states = shared.BreakerStates(settings.breaker)
    breaker = Breaker(
        endpoint=endpoint_key(os.environ.get("DOCKER_HOST"), socket.gethostname()),
        config=settings.breaker,
        worker_id=settings.worker_id,
        read=states.get,
        publish=shared.attach(app, settings),
    )
    runtime = Runtime(settings, JobTypes.load(settings.job_types_file), breaker, states, app)
    _add_views(app, runtime, settings)
    return app, runtime


def _add_views(app: faust.App, runtime: Runtime, settings: Settings) -> None:
    """Health, metrics and the DLQ, on faust's web server (it answers during recovery too)."""

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
        store = await dlq.read_store(settings, keep_originals=False)
        entries = store.select(error_type=query.get("error_type"), since=since, until=until)
        return web.json(
            {"total": len(entries), "entries": [e.model_dump(mode="json") for e in entries]}
        )

    @app.page("/dlq/{dlq_id}")
    class DLQEntry(faust.web.View):
        async def get(self, request: Any, dlq_id: str) -> Any:
            entry = await dlq.lookup(settings, runtime.dlq, dlq_id)
            if entry is None:
                return self.json({"detail": f"no DLQ entry {dlq_id}"}, status=404)
            return self.json(entry.model_dump(mode="json"))

        async def delete(self, request: Any, dlq_id: str) -> Any:
            if not await dlq.remove(settings, runtime.dlq, dlq_id):
                return self.json({"detail": f"no DLQ entry {dlq_id}"}, status=404)
            return self.json({"status": "removed", "entry_id": dlq_id})  # as the gateway


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

    def _schedule_shutdown(self, signal: Any) -> None:
        """On the first SIGTERM/SIGINT, also arm the watchdog that bounds the whole stop."""
        first = not self._signal_stop_time
        super()._schedule_shutdown(signal)
        if first:
            grace = self._tako_settings.shutdown_grace
            self._runtime.watch_shutdown(self.loop, grace + SHUTDOWN_MARGIN)


def run_worker(settings: Settings) -> int:
    """Run a worker until SIGTERM/SIGINT; returns the process exit code."""
    app, runtime = build(settings)
    asyncio.run(ensure_topics(settings, extra=shared.topics(settings)))
    worker = _Worker(
        app,
        runtime,
        settings=settings,
        quiet=True,
        redirect_stdouts=False,
        loglevel=settings.log_level,
    )
    _tune_gc()
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        return runtime.final_exit_code or code
    return runtime.final_exit_code


def _tune_gc() -> None:
    """Collect cycles less often: each request allocates many short-lived objects (records,
    models, futures) that reference counting frees, yet they trip CPython's default gen-0
    threshold (700) every few requests; the objects made while starting up are frozen out of
    collection.  Not much higher than 5,000: garbage cycles holding ~1 MB messages then live
    long enough to raise RSS under floods of them (20,000 failed the flood test by ~57 MiB)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(5_000, 20, 50)
