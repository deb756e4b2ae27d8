"""DockerSandbox's drain over a scripted engine: nothing a stopping worker created stays behind.

The engine here is a stand-in whose create answers only when the test says so: the race a real
engine makes rare (a create still under way when its prepare is cancelled, as a warm pool's
refills are at shutdown) happens every time.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

import aiodocker

from tako_stream.core.jobtypes import JobTypes, default_limits
from tako_stream.sandbox.docker import DockerSandbox
from tests.fakes import bounded, eventually


class ScriptedContainer:
    def __init__(self, container_id: str, deleted: list[str]) -> None:
        self.id = container_id
        self._deleted = deleted

    async def delete(self, **_: Any) -> None:
        self._deleted.append(self.id)


class ScriptedContainers:
    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.asked = 0
        self.deleted: list[str] = []

    async def create(self, config: dict[str, Any], name: str) -> ScriptedContainer:
        self.asked += 1
        await self.answer.wait()
        return ScriptedContainer(name, self.deleted)


class ScriptedDocker:
    def __init__(self) -> None:
        self.containers = ScriptedContainers()


async def cancelled_prepare() -> tuple[ScriptedDocker, DockerSandbox]:
    """A sandbox over the scripted engine whose one prepare was cancelled while the engine
    still creates its container (the create goes on there: that container must not stay)."""
    engine = ScriptedDocker()
    sandbox = DockerSandbox(cast(aiodocker.Docker, engine), worker_id="w", timeout_grace=1)
    preparing = asyncio.ensure_future(sandbox.prepare(default_limits(JobTypes.load()["default"])))
    await eventually(lambda: engine.containers.asked == 1, "the create to be asked")
    preparing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await preparing
    return engine, sandbox


async def test_a_container_created_after_its_prepare_was_cancelled_is_removed_by_drain() -> None:
    engine, sandbox = await cancelled_prepare()
    draining = asyncio.ensure_future(sandbox.drain(5))
    await asyncio.sleep(0.01)
    assert not draining.done(), "drain returned while a container was still being created"
    engine.containers.answer.set()
    await bounded(draining, "the drain")
    assert len(engine.containers.deleted) == 1


async def test_drain_gives_up_at_its_bound() -> None:
    engine, sandbox = await cancelled_prepare()
    await bounded(sandbox.drain(0.05), "a drain bounded at 50 ms", timeout=5)
    assert engine.containers.deleted == []  # the engine never answered: left to the next reap
