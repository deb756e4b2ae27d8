"""One job in a fresh container straight through ``DockerSandbox`` (no worker, no Kafka): for
tests of what the sandbox and its supervisor make of a job, under runc or gVisor."""

from __future__ import annotations

import dataclasses
import uuid

import aiodocker

from tako_stream.core.jobtypes import JobTypes, Limits, default_limits
from tako_stream.sandbox.base import SandboxRun
from tako_stream.sandbox.docker import DockerSandbox
from tako_stream.sandbox.protocol import JOB_PYTHON, encode_job
from tako_stream.settings import OutputCaps


async def run_in_sandbox(
    docker: aiodocker.Docker,
    code: str,
    *,
    caps: OutputCaps,
    runtime: str | None = None,
    input_json: bytes = b"{}",
    timeout: float = 20,
    python: str = JOB_PYTHON,
) -> tuple[SandboxRun, Limits]:
    """The run of ``code`` in the default job type's container (``runtime`` for its OCI
    runtime), and the limits it ran under (what ``classify`` needs); the container is removed
    before this returns."""
    limits = dataclasses.replace(default_limits(JobTypes.load()["default"]), runtime=runtime)
    sandbox = DockerSandbox(docker, worker_id=f"run-{uuid.uuid4().hex[:8]}", timeout_grace=10)
    job = encode_job(code=code, input_json=input_json, timeout=timeout, caps=caps, python=python)
    try:
        run = await sandbox.run(job, limits, execution_id="run", caps=caps)
    finally:
        await sandbox.drain()
    return run, limits
