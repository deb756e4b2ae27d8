"""Fixtures for the integration and security tiers: a real broker and the real Docker engine.

Nothing here skips: when the broker or Docker is missing, the tests fail and say so, because the
test command (scripts/test) is what starts them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import pytest

from tako_stream.kafka import broker as embedded
from tests.integration.stack import Stack, free_port

TIERS = ("unit", "integration", "faults", "security", "compose")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier, the folder it lives in (``-m unit`` selects one tier)."""
    root = Path(__file__).parent
    for item in items:
        parts = item.path.relative_to(root).parts
        if parts and parts[0] in TIERS:
            item.add_marker(parts[0])


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``TAKO_TEST_BOOTSTRAP`` when set (an existing cluster), else a fresh embedded broker."""
    existing = os.environ.get("TAKO_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    port = free_port()
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            embedded.command("127.0.0.1", port), stdout=out, stderr=subprocess.STDOUT
        )
    if not embedded.wait_until_listening("127.0.0.1", port, 30):
        proc.kill()
        raise RuntimeError(f"embedded broker did not start:\n{log.read_text()}")
    yield f"localhost:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
async def docker() -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    try:
        await asyncio.wait_for(client.system.info(), 10)
    except Exception as exc:
        await client.close()
        raise RuntimeError(
            f"Docker engine unreachable ({exc}): run scripts/setup-docker first"
        ) from exc
    yield client
    await client.close()


@pytest.fixture(scope="module", params=["warm", "cold"])
async def stack(
    request: pytest.FixtureRequest,
    bootstrap: str,
    docker: aiodocker.Docker,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    """One worker on fresh topics, shared by the tests of a module; every such test runs once
    with the warm pool (the default) and once with every job cold."""
    s = Stack(bootstrap=bootstrap, workdir=tmp_path_factory.mktemp("stack"), mode=request.param)
    worker = s.start_worker(TAKO_WARM_POOL_SIZE="2" if request.param == "warm" else "0")
    try:
        await worker.wait_ready()
        yield s
    finally:
        s.stop_all()


@pytest.fixture
async def new_stack(
    bootstrap: str, docker: aiodocker.Docker, tmp_path: Path
) -> AsyncIterator[Stack]:
    """Fresh topics and group with no worker started: the test starts and kills its own."""
    s = Stack(bootstrap=bootstrap, workdir=tmp_path)
    try:
        yield s
    finally:
        s.stop_all()
