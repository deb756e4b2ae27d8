"""The worker process: a faust app (web views, lifecycle) around the tako services.

faust runs the process: its ``Worker`` starts the app and our ``Runtime`` service together,
handles SIGTERM/SIGINT by stopping both in order, and serves the web views on
``TAKO_WEB_PORT``.  The request stream itself is consumed by ``Intake`` (see its docstring for
why that is plain aiokafka rather than a faust agent).
"""

from __future__ import annotations

import logging
from typing import Any

import aiodocker
import faust
from mode import Service

from tako_stream import logs
from tako_stream.errors import SandboxUnavailableError
from tako_stream.execute import Executor
from tako_stream.intake import Intake
from tako_stream.jobtypes import JobTypes
from tako_stream.sandbox.docker import DockerSandbox
from tako_stream.sandbox.pool import SandboxPool
from tako_stream.settings import Settings

log = logging.getLogger(__name__)


class Runtime(Service):
    """Owns the Docker client, the pool and the intake, so they start and stop as one."""

    def __init__(self, settings: Settings, job_types: JobTypes, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.job_types = job_types
        self.docker: aiodocker.Docker | None = None
        self.sandbox: DockerSandbox | None = None
        self.intake: Intake | None = None

    async def on_start(self) -> None:
        s = self.settings
        self.docker = aiodocker.Docker()
        self.sandbox = DockerSandbox(
            self.docker, worker_id=s.worker_id, timeout_grace=s.timeout_grace
        )
        try:
            await self.sandbox.ping()
            reaped = await self.sandbox.reap()
            if reaped:
                log.warning("removed %d container(s) left by a previous run", reaped)
        except SandboxUnavailableError as exc:
            log.error("%s; jobs will fail until it is back", exc)
        pool = SandboxPool(self.sandbox, s.pool_size)
        self.intake = Intake(s, Executor(pool, self.job_types, s), loop=self.loop)
        await self.intake.start()
        log.info("worker %s consuming %s", s.worker_id, s.requests_topic)

    async def on_stop(self) -> None:
        if self.intake is not None:
            await self.intake.stop()
        if self.docker is not None:
            await self.docker.close()

    async def health(self) -> dict[str, Any]:
        docker_ok = False
        if self.sandbox is not None:
            try:
                await self.sandbox.ping()
                docker_ok = True
            except SandboxUnavailableError:
                pass
        intake = self.intake
        ready = bool(intake and intake.assigned)
        return {
            "status": "healthy" if docker_ok else "degraded",
            "docker_available": docker_ok,
            "ready": ready,
            "worker_id": self.settings.worker_id,
            "in_flight": intake.in_flight if intake else 0,
            "answered": intake.answered if intake else 0,
        }


def create_app(settings: Settings, runtime: Runtime) -> faust.App:
    app = faust.App(
        f"{settings.consumer_group}-app",
        broker=f"kafka://{settings.kafka_bootstrap_servers}",
        web_port=settings.web_port,
        web_bind=settings.web_host,
        store="memory://",
        topic_partitions=1,
        topic_replication_factor=settings.topic_replication,
        datadir=f"/tmp/tako-stream-{settings.worker_id}",
    )

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        return web.json(await runtime.health())

    return app


class _Worker(faust.Worker):
    """faust's worker with our logging (job ids on every line, optional JSON)."""

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        self._tako_settings = settings
        super().__init__(*args, **kwargs)

    def _setup_logging(self) -> None:
        logs.configure(self._tako_settings.log_level, self._tako_settings.log_format)


def run_worker(settings: Settings) -> int:
    """Run a worker until SIGTERM/SIGINT; returns the process exit code."""
    job_types = JobTypes.load(settings.job_types_file)
    runtime = Runtime(settings, job_types)
    app = create_app(settings, runtime)
    worker = _Worker(
        app,
        runtime,
        settings=settings,
        quiet=True,
        redirect_stdouts=False,
        loglevel=settings.log_level,
    )
    worker.execute_from_commandline()
    return 0
