"""What the engine does with a job's container, read from its own event log.

A container whose supervisor has sent its report exits on its own (exit code 0) and is deleted
only then: deleting it while it still ran made the engine kill it first (one more call through
containerd and the runtime, and one more state written to disk, in every job).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import time
import uuid

import aiodocker
import pytest

from tako_stream.core.jobtypes import JobTypes, default_limits
from tako_stream.sandbox import docker as docker_module
from tako_stream.sandbox.docker import LABEL_WORKER, DockerSandbox
from tako_stream.sandbox.protocol import encode_job
from tako_stream.settings import OutputCaps
from tests.runtimes import GVISOR_RUNTIME, require_gvisor

pytestmark = [pytest.mark.integration]

CAPS = OutputCaps()
JOBS = 4


def engine_events(worker_id: str, since: float, until: float) -> list[dict[str, object]]:
    """The engine's container events, between two times, of one sandbox's containers."""
    done = subprocess.run(
        [
            "docker",
            "events",
            "--since",
            f"{since:.3f}",
            "--until",
            f"{until:.3f}",
            "--filter",
            "type=container",
            "--filter",
            f"label={LABEL_WORKER}={worker_id}",
            "--format",
            "{{json .}}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("runtime", [None, GVISOR_RUNTIME], ids=["runc", "runsc"])
async def test_a_reported_container_exits_on_its_own_and_is_not_killed(
    docker: aiodocker.Docker, runtime: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if runtime is not None:
        await require_gvisor(docker)
    # What is tested is that the removal waits for the exit rather than kill; the bound on that
    # wait (2 s) is a unit test's, not this loaded machine's.
    monkeypatch.setattr(docker_module, "EXIT_WAIT", 60.0)
    limits = dataclasses.replace(default_limits(JobTypes.load()["default"]), runtime=runtime)
    worker_id = f"life-{uuid.uuid4().hex[:8]}"
    sandbox = DockerSandbox(docker, worker_id=worker_id, timeout_grace=10)
    job = encode_job(code="print('hello')", input_json=b"{}", timeout=20, caps=CAPS)
    since = time.time() - 1
    try:
        warm = await sandbox.prepare(limits)
        runs = await asyncio.gather(
            sandbox.run(job, limits, execution_id="warm", caps=CAPS, prepared=warm),
            *(sandbox.run(job, limits, execution_id=f"cold-{i}", caps=CAPS) for i in range(JOBS)),
        )
        # The removals run in the background; a drain would hurry them (a stopping worker's
        # removals must fit its budget), so they are left to end on their own.
        async with asyncio.timeout(120):
            mine = {"label": [f"{LABEL_WORKER}={worker_id}"]}
            while await docker.containers.list(all=True, filters=mine):  # noqa: ASYNC110 - the engine's list
                await asyncio.sleep(0.2)
    finally:
        await sandbox.drain(timeout=30)
    for run in runs:
        assert run.collected.report is not None and run.collected.report.exit_code == 0
    events = engine_events(worker_id, since, time.time() + 1)
    by_container: dict[str, list[dict[str, object]]] = {}
    for event in events:
        by_container.setdefault(str(event["id"]), []).append(event)
    assert len(by_container) == JOBS + 1, events
    for container, seen in by_container.items():
        actions = [str(event["Action"]) for event in seen]
        assert "kill" not in actions, (container, actions)
        died = [event for event in seen if event["Action"] == "die"]
        assert len(died) == 1, (container, actions)
        attributes = died[0]["Actor"]
        assert isinstance(attributes, dict)
        assert attributes["Attributes"]["exitCode"] == "0", (container, attributes)
        assert actions.index("die") < actions.index("destroy"), (container, actions)
