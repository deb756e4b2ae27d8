"""The async pool: how many containers one worker runs at once.

A semaphore rather than a thread pool: every Docker call is awaited on the worker's event loop,
so one worker keeps many containers running while it goes on reading Kafka and serving HTTP.
"""

from __future__ import annotations

import asyncio

from tako_stream.sandbox.docker import DockerSandbox, Limits, SandboxRun


class SandboxPool:
    """Runs jobs through a sandbox, at most ``size`` at a time."""

    def __init__(self, sandbox: DockerSandbox, size: int) -> None:
        self.sandbox = sandbox
        self.size = size
        self._slots = asyncio.Semaphore(size)
        self.in_flight = 0

    @property
    def full(self) -> bool:
        return self.in_flight >= self.size

    async def run(
        self,
        job: bytes,
        limits: Limits,
        *,
        execution_id: str,
        stdout_cap: int,
        stderr_cap: int,
        result_cap: int,
    ) -> SandboxRun:
        async with self._slots:
            self.in_flight += 1
            try:
                return await self.sandbox.run(
                    job,
                    limits,
                    execution_id=execution_id,
                    stdout_cap=stdout_cap,
                    stderr_cap=stderr_cap,
                    result_cap=result_cap,
                )
            finally:
                self.in_flight -= 1
