"""A real tako-stream stack for tests: the embedded broker, worker processes, a client.

Workers run as separate processes (``python -m tako_stream worker``) so tests can SIGKILL and
SIGTERM them like an operator would; each stack gets its own topics and consumer group, so
tests never see each other's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tako_stream.client import Producer, ResultReader
from tako_stream.core.models import ExecutionResult
from tako_stream.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WorkerProcess:
    worker_id: str
    web_port: int
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def health(self) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.web_port}/health"
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp,
            ):
                data: dict[str, Any] = await resp.json()
                return data
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the worker owns request partitions (its consumer group join is done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.worker_id} exited:\n{self.log_tail()}")
            health = await self.health()
            if health and health.get("ready"):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"worker {self.worker_id} not ready in {timeout}s:\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)


@dataclass
class Stack:
    """One isolated set of topics and group on the shared broker, and its workers."""

    bootstrap: str
    workdir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    workers: list[WorkerProcess] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    mode: str = "warm"

    @property
    def settings(self) -> Settings:
        return Settings(**self.env_settings())  # type: ignore[arg-type]

    def env_settings(self) -> dict[str, Any]:
        return {
            "kafka_bootstrap_servers": self.bootstrap,
            "requests_topic": f"t{self.tag}.requests",
            "results_topic": f"t{self.tag}.results",
            "dlq_topic": f"t{self.tag}.dlq",
            "control_topic": f"t{self.tag}.control",
            "status_topic": f"t{self.tag}.status",
            "artifacts_topic": f"t{self.tag}.artifacts",
            "workers_topic": f"t{self.tag}.workers",
            "consumer_group": f"g{self.tag}",
            "breaker_topic": f"t{self.tag}.breaker",
            "topic_partitions": 4,
            "worker_id": f"test-client-{self.tag}",
        }

    def start_worker(self, name: str | None = None, **env: str) -> WorkerProcess:
        worker_id = name or f"w{len(self.workers) + 1}-{self.tag}"
        port = free_port()
        values = {k: v for k, v in self.env_settings().items() if k != "worker_id"}
        child_env = {**os.environ, **{f"TAKO_{k.upper()}": str(v) for k, v in values.items()}}
        child_env.update(
            TAKO_WORKER_ID=worker_id,
            TAKO_WEB_PORT=str(port),
            TAKO_WEB_HOST="127.0.0.1",
            TAKO_SHUTDOWN_GRACE="20",
        )
        child_env.update(self.extra_env)  # a test's own settings win over the defaults above
        child_env.update(env)
        log_path = self.workdir / f"{worker_id}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tako_stream", "worker"],
                env=child_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(worker_id, port, log_path, proc)
        self.workers.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.kill(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.proc.wait(40)
            except subprocess.TimeoutExpired:
                worker.kill(signal.SIGKILL)
                worker.proc.wait(10)

    async def run_jobs(
        self,
        requests: list[dict[str, Any]],
        *,
        timeout: float = 120.0,
        correlation_id: str | None = None,
    ) -> dict[str, ExecutionResult]:
        """Produce requests and wait for one result each (keyed by execution id)."""
        settings = self.settings
        async with ResultReader(settings) as reader, Producer(settings) as producer:
            ids = {
                await producer.submit(request, correlation_id=correlation_id)
                for request in requests
            }
            found = await reader.wait_for(ids, timeout)
        missing = ids - set(found)
        if missing:
            logs = "\n\n".join(f"== {w.worker_id}\n{w.log_tail()}" for w in self.workers)
            raise AssertionError(f"{len(missing)} job(s) got no result:\n{logs}")
        return found

    async def cli(self, *args: str, **env: str) -> tuple[int, str, str]:
        """Run ``tako-stream ARGS`` against this stack; (exit code, stdout, stderr)."""
        settings_env = {f"TAKO_{k.upper()}": str(v) for k, v in self.env_settings().items()}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tako_stream",
            *args,
            env={**os.environ, **settings_env, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def run_job(self, request: dict[str, Any], **kwargs: Any) -> ExecutionResult:
        found = await self.run_jobs([request], **kwargs)
        return next(iter(found.values()))
