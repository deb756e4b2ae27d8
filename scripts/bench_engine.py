"""What the Docker engine itself can churn, for scripts/bench to measure ours against.

The ceiling is the rate of hardened one-shot containers the engine creates, starts, waits for
and deletes through its API, ``concurrency`` at a time, running ``python3 -I -S -c pass`` in
the job type's image with the same lock-down as a job's container (``container_config``: no
network, read-only root, capabilities dropped, init, no log driver, memory and pids limits,
the tmpfs mounts), but no stdin, no attach and no supervisor.  A sandbox service can at best
approach it: everything a job adds (the attach stream, the supervisor, Kafka) is ours.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import aiodocker

from tako_stream.core.jobtypes import JobTypes, default_limits
from tako_stream.sandbox.docker import container_config
from tako_stream.sandbox.protocol import JOB_PYTHON

GVISOR = "runsc"


def runtime_available(name: str) -> bool:
    """Whether the Docker engine has the OCI runtime ``name`` registered."""
    out = subprocess.run(
        ["docker", "info", "--format", "{{json .Runtimes}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return name in json.loads(out.stdout or "{}")
    except ValueError:
        return False


def gvisor_job_types(job_types_file: Path | None = None) -> Path:
    """A job types file whose ``default`` type runs under gVisor (everything else as is)."""
    source = (
        job_types_file or Path(__file__).resolve().parents[1] / "tako_stream/core/job_types.toml"
    )
    text = source.read_text()
    data = tomllib.loads(text)
    if "runtime" in data.get("default", {}):
        return source
    out = Path(tempfile.mkdtemp(prefix="tako-bench-gvisor-")) / "job_types.toml"
    # The default table gets the runtime key right after its header.
    out.write_text(text.replace("[default]\n", f'[default]\nruntime = "{GVISOR}"\n', 1))
    return out


async def churn_ceiling(count: int, concurrency: int, runtime: str | None = None) -> dict[str, Any]:
    """Hardened one-shot containers per second, ``concurrency`` at a time."""
    limits = default_limits(JobTypes.load()["default"])
    if runtime is not None:
        limits = dataclasses.replace(limits, runtime=runtime)
    config = container_config(limits, {"tako.bench": "ceiling"})
    config.update(
        Cmd=[JOB_PYTHON, "-I", "-S", "-c", "pass"],
        OpenStdin=False,
        AttachStdin=False,
        AttachStdout=False,
        AttachStderr=False,
    )
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(docker: aiodocker.Docker) -> None:
        nonlocal failures
        async with gate:
            container = await docker.containers.create(config)
            try:
                await container.start()
                state = await container.wait()
                if state.get("StatusCode") != 0:
                    failures += 1
            finally:
                await container.delete(force=True)

    async with aiodocker.Docker() as docker:
        await one(docker)  # the image's first use out of the way
        started = time.perf_counter()
        await asyncio.gather(*(one(docker) for _ in range(count)))
        elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{failures} of {count} ceiling containers failed")
    return {"jobs": count, "seconds": elapsed, "jobs_per_s": count / elapsed, "runtime": runtime}
