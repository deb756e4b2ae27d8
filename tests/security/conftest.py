"""The security tier's ``stack``: the same worker as tests/conftest.py's, in three modes.

``warm`` and ``cold`` run every job type under Docker's default runtime (runc), with and without
the warm pool; ``gvisor`` runs them under gVisor's ``runsc`` (registered by
``scripts/setup-docker --with-gvisor``), through a job types file that names that runtime for
every job type.  When runsc is not registered the ``gvisor`` runs fail, naming the command that
installs it; ``TAKO_TEST_NO_GVISOR=1`` turns them into skips, for machines that cannot run it.

Every worker also carries canary environment variables, so the tests can check that nothing of
the worker's environment reaches a job.
"""

from __future__ import annotations

import secrets
import tomllib
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import aiodocker
import pytest

from tests.integration.stack import Stack
from tests.runtimes import GVISOR_RUNTIME, require_gvisor

#: Set on every worker of this tier: a value no job may ever see.
CANARY_VAR = "TAKO_SECURITY_CANARY"
PLAIN_CANARY_VAR = "SECURITY_CANARY_PLAIN"


def canary_env() -> dict[str, str]:
    value = "canary-" + secrets.token_hex(12)
    return {CANARY_VAR: value, PLAIN_CANARY_VAR: value}


def job_types_with_runtime(path: Path, runtime: str) -> Path:
    """The packaged job types, every one of them run by ``runtime``."""
    text = resources.files("tako_stream.core").joinpath("job_types.toml").read_text()
    types = tomllib.loads(text)
    lines: list[str] = []
    for name, fields in types.items():
        lines.append(f"[{name}]")
        for key, value in {**fields, "runtime": runtime}.items():
            lines.append(f"{key} = {_toml(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):  # a job type's requirements
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    raise TypeError(f"unsupported TOML value {value!r}")


@pytest.fixture(scope="module", params=["warm", "cold", "gvisor"])
async def stack(
    request: pytest.FixtureRequest,
    bootstrap: str,
    docker: aiodocker.Docker,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    """One worker on fresh topics, shared by the tests of a module: warm pool, all cold, or
    every job under gVisor (with the warm pool)."""
    mode = request.param
    workdir = tmp_path_factory.mktemp(f"stack-{mode}")
    env = {"TAKO_WARM_POOL_SIZE": "0" if mode == "cold" else "2"}
    if mode == "gvisor":
        await require_gvisor(docker)
        types_file = job_types_with_runtime(workdir / "job_types.toml", GVISOR_RUNTIME)
        env["TAKO_JOB_TYPES_FILE"] = str(types_file)
    s = Stack(bootstrap=bootstrap, workdir=workdir, mode=mode, extra_env=canary_env())
    worker = s.start_worker(**env)
    try:
        await worker.wait_ready()
        yield s
    finally:
        s.stop_all()
