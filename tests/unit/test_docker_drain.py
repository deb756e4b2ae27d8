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
import pytest

from tako_stream.core.errors import SandboxUnavailableError
from tako_stream.core.jobtypes import JobTypes, default_limits
from tako_stream.sandbox import docker as docker_module
from tako_stream.sandbox.docker import DockerSandbox
from tests.fakes import bounded, eventually


class ScriptedContainer:
    def __init__(self, container_id: str, engine: ScriptedContainers) -> None:
        self.id = container_id
        self._engine = engine

    def __getitem__(self, key: str) -> Any:  # as aiodocker's, over the listing's fields
        return {"Id": self.id, "Names": [f"/{self.id}"]}[key]

    async def wait(self, **_: Any) -> dict[str, Any]:
        """Returns once the scripted container has exited (never, unless the test says)."""
        await self._engine.exited.wait()
        return {"StatusCode": 0}

    async def delete(self, **_: Any) -> None:
        if self.id not in self._engine.made:
            raise aiodocker.DockerError(404, f"No such container: {self.id}")
        self._engine.made.discard(self.id)
        self._engine.deleted.append(self.id)


class ScriptedContainers:
    """Containers named by their name (ids and names are one here)."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        #: Set when the containers have exited on their own.
        self.exited = asyncio.Event()
        self.asked = 0
        self.made: set[str] = set()
        self.deleted: list[str] = []
        #: The engine makes the container, and its answer is lost (a daemon dying mid-request).
        self.lose_answer = False

    async def create(self, config: dict[str, Any], name: str) -> ScriptedContainer:
        self.asked += 1
        self.made.add(name)  # made at once; its answer comes when the test says
        await self.answer.wait()
        if self.lose_answer:
            raise aiodocker.DockerError(
                900, "Cannot connect to Docker Engine [Server disconnected]"
            )
        return ScriptedContainer(name, self)

    def container(self, container_id: str) -> ScriptedContainer:
        return ScriptedContainer(container_id, self)

    async def list(self, **_: Any) -> list[ScriptedContainer]:
        return [ScriptedContainer(name, self) for name in sorted(self.made)]


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


async def test_a_container_made_by_a_create_whose_answer_was_lost_is_removed_by_name() -> None:
    # The engine made it, then the connection broke (a daemon killed or restarted mid-create):
    # the sandbox never learnt its id, only the name it chose.
    engine = ScriptedDocker()
    engine.containers.answer.set()
    engine.containers.lose_answer = True
    sandbox = DockerSandbox(cast(aiodocker.Docker, engine), worker_id="w", timeout_grace=1)
    with pytest.raises(SandboxUnavailableError):
        await sandbox.prepare(default_limits(JobTypes.load()["default"]))
    await bounded(sandbox.drain(5), "the drain")
    assert engine.containers.made == set()
    assert len(engine.containers.deleted) == 1


async def test_sweep_removes_the_workers_containers_it_does_not_know_of() -> None:
    engine = ScriptedDocker()
    sandbox = DockerSandbox(cast(aiodocker.Docker, engine), worker_id="w", timeout_grace=1)
    engine.containers.made.add("tako-orphan")  # a removal that gave up while the engine was away
    preparing = asyncio.ensure_future(sandbox.prepare(default_limits(JobTypes.load()["default"])))
    await eventually(lambda: engine.containers.asked == 1, "the create to be asked")
    # The container of the create under way is listed already; it is the sandbox's own.
    assert await bounded(sandbox.sweep(), "the sweep") == 1
    await bounded(sandbox.drain(5), "the drain")
    assert engine.containers.deleted == ["tako-orphan"]
    assert len(engine.containers.made) == 1
    preparing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await preparing


# -- a container whose supervisor has reported is left to exit before it is deleted -------------


def exiting_container() -> tuple[ScriptedDocker, DockerSandbox]:
    """A sandbox whose one container has reported and is exiting (never, unless told), its
    removal under way and waiting for that exit."""
    engine = ScriptedDocker()
    sandbox = DockerSandbox(cast(aiodocker.Docker, engine), worker_id="w", timeout_grace=1)
    engine.containers.made.add("tako-exiting")
    container = engine.containers.container("tako-exiting")
    removal = sandbox._remove(cast(aiodocker.containers.DockerContainer, container), exiting=True)
    sandbox._in_background(removal)
    return engine, sandbox


async def test_a_reported_container_is_deleted_once_it_has_exited() -> None:
    engine, _ = exiting_container()
    await asyncio.sleep(0.05)
    assert engine.containers.deleted == [], "deleted (so killed) before it had exited"
    engine.containers.exited.set()
    await eventually(lambda: engine.containers.deleted == ["tako-exiting"], "the delete")


async def test_a_container_that_does_not_exit_is_deleted_after_the_exit_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(docker_module, "EXIT_WAIT", 0.05)
    engine, _ = exiting_container()
    await eventually(lambda: engine.containers.deleted == ["tako-exiting"], "the delete")


async def test_a_drain_deletes_containers_still_given_time_to_exit() -> None:
    # The drain's budget is a stopping worker's (3 s): a removal waiting out its exit wait when
    # the drain ran out was cancelled before its delete, and the container stayed.
    engine, sandbox = exiting_container()
    await asyncio.sleep(0.01)
    await bounded(sandbox.drain(0.5), "the drain", timeout=5)
    assert engine.containers.deleted == ["tako-exiting"]


async def test_sweep_leaves_a_container_being_removed_to_its_removal() -> None:
    engine, sandbox = exiting_container()
    await asyncio.sleep(0.01)
    assert await bounded(sandbox.sweep(), "the sweep") == 0
    engine.containers.exited.set()
    await bounded(sandbox.drain(5), "the drain")
    assert engine.containers.deleted == ["tako-exiting"]
