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

if __name__ == "__main__":  # run as a script: the project's modules from this checkout
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


#: What each variant adds to the ceiling's container (``variants``): one piece of a job's own
#: container at a time, so its cost shows as the rate it loses.
VARIANTS = {
    "ceiling": "create, start, wait, delete of python3 -I -S -c pass",
    "autoremove": "the same, removed by the engine on exit (AutoRemove) instead of a delete call",
    "attach": "the same, with stdout and stderr attached and read to the end",
    "two-interpreters": "the same, exec'ing a second python3 -I (site on), as the supervisor does",
}


def _config(limits: Any, variant: str) -> dict[str, Any]:
    config = container_config(limits, {"tako.bench": "ceiling"})
    config.update(
        Cmd=[JOB_PYTHON, "-I", "-S", "-c", "pass"],
        OpenStdin=False,
        AttachStdin=False,
        AttachStdout=variant == "attach",
        AttachStderr=variant == "attach",
    )
    if variant == "autoremove":
        config["HostConfig"]["AutoRemove"] = True
    if variant == "two-interpreters":
        second = f"[{JOB_PYTHON!r}, '-I', '-c', 'pass']"
        config["Cmd"] = [
            JOB_PYTHON,
            "-I",
            "-S",
            "-c",
            f"import os; os.execv({JOB_PYTHON!r}, {second})",
        ]
    return config


async def _churn(
    docker: aiodocker.Docker, config: dict[str, Any], count: int, concurrency: int, variant: str
) -> float:
    """Containers a second: ``count`` of ``config``, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def one() -> None:
        nonlocal failures
        async with gate:
            container = await docker.containers.create(config)
            try:
                if variant == "attach":
                    stream = container.attach(stdout=True, stderr=True, logs=False)
                    async with stream:
                        await container.start()
                        while await stream.read_out() is not None:
                            pass
                else:
                    await container.start()
                state = await container.wait()
                if state.get("StatusCode") != 0:
                    failures += 1
            finally:
                if variant != "autoremove":
                    await container.delete(force=True)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{failures} of {count} {variant} containers failed")
    return count / elapsed


def _limits(runtime: str | None) -> Any:
    limits = default_limits(JobTypes.load()["default"])
    return limits if runtime is None else dataclasses.replace(limits, runtime=runtime)


async def churn_ceiling(count: int, concurrency: int, runtime: str | None = None) -> dict[str, Any]:
    """Hardened one-shot containers per second, ``concurrency`` at a time."""
    config = _config(_limits(runtime), "ceiling")
    async with aiodocker.Docker() as docker:
        await _churn(docker, config, 1, 1, "ceiling")  # the image's first use out of the way
        started = time.perf_counter()
        rate = await _churn(docker, config, count, concurrency, "ceiling")
        elapsed = time.perf_counter() - started
    return {"jobs": count, "seconds": elapsed, "jobs_per_s": rate, "runtime": runtime}


async def variants(
    count: int, concurrency: int, rounds: int, runtime: str | None = None
) -> dict[str, list[float]]:
    """Each variant's rate, interleaved round by round (this VM's speed drifts by tens of
    per cent within minutes: only variants measured side by side compare)."""
    limits = _limits(runtime)
    configs = {name: _config(limits, name) for name in VARIANTS}
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    async with aiodocker.Docker() as docker:
        for name, config in configs.items():
            await _churn(docker, config, 2, 2, name)  # first uses out of the way
        for _ in range(rounds):
            for name, config in configs.items():
                rates[name].append(await _churn(docker, config, count, concurrency, name))
    return rates


def main() -> None:
    import argparse
    import statistics

    parser = argparse.ArgumentParser(description="What each piece of a job's container costs.")
    parser.add_argument("--count", type=int, default=80)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", default=None, help="an OCI runtime, e.g. runsc")
    args = parser.parse_args()
    rates = asyncio.run(variants(args.count, args.concurrency, args.rounds, args.runtime))
    base = statistics.fmean(rates["ceiling"])
    for name, values in rates.items():
        mean = statistics.fmean(values)
        runs = " ".join(f"{v:.2f}" for v in values)
        print(f"{name:17s} {mean:6.2f}/s ({mean / base:4.2f})  [{runs}]  {VARIANTS[name]}")


if __name__ == "__main__":
    main()
