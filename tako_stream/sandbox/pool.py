"""The async pool: how many containers one worker runs at once, and the warm containers.

A semaphore rather than a thread pool: every Docker call is awaited on the worker's event loop,
so one worker keeps many containers running while it goes on reading Kafka and serving HTTP.

The warm pool keeps, per job type, a few containers created, locked down and started ahead of
time, each with its supervisor blocked on stdin waiting for exactly one job.  Handing a job to
one skips create and start (most of a cold job's cost) without giving up one container per
job: a warm container runs one job and is destroyed like any other.  Jobs whose limits differ
from the job type's defaults (a larger memory limit, say) take the cold path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from tako_stream.core.errors import CancelledBeforeStart, SandboxError
from tako_stream.core.jobtypes import Limits
from tako_stream.sandbox.base import Prepared, Sandbox, SandboxRun
from tako_stream.settings import OutputCaps

log = logging.getLogger(__name__)


def warm_key(limits: Limits) -> Limits:
    """What a warm container is made for: everything but the timeout (sent with the job) and
    the startup timeout (a warm container has started already)."""
    return replace(limits, timeout=0, startup_timeout=None)


class WarmPool:
    """Started containers waiting for a job, per container shape; refilled one at a time."""

    def __init__(
        self,
        sandbox: Sandbox,
        shapes: Iterable[tuple[Limits, int]],
        *,
        max_idle: float,
        busy: Callable[[], int] = lambda: 0,
    ) -> None:
        """``shapes``: each container shape with how many of it to keep ready (job types that
        share a shape share its containers: the largest count wins)."""
        self._sandbox = sandbox
        self._busy = busy
        self._max_idle = max_idle
        self._size: dict[Limits, int] = {}
        for shape, size in shapes:
            key = warm_key(shape)
            self._size[key] = max(size, self._size.get(key, 0))
        self._ready: dict[Limits, list[Prepared]] = {key: [] for key in self._size}
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None

    def sizes(self) -> dict[str, int]:
        """Ready containers by image (job types that share an image are summed)."""
        by_image: dict[str, int] = {}
        for shape, ready in self._ready.items():
            by_image[shape.image] = by_image.get(shape.image, 0) + len(ready)
        return by_image

    def start(self) -> None:
        if any(self._size.values()) and self._filler is None:
            self._filler = asyncio.ensure_future(self._fill())
            self._wanted.set()

    def take(self, limits: Limits) -> Prepared | None:
        ready = self._ready.get(warm_key(limits))
        if not ready:
            return None
        prepared = ready.pop(0)  # oldest first, so none idles long
        self._wanted.set()
        return prepared

    async def _idle(self, ready: list[Prepared]) -> None:
        """While a shape still has a container waiting, refill only when no job runs: creating
        and starting a container costs the engine ~0.2 s of CPU that a running job would lose.
        An empty shape is refilled at once (its next job would otherwise run cold)."""
        while ready and self._busy():  # noqa: ASYNC110 - polls a counter; no event to wait on
            await asyncio.sleep(0.02)

    async def _fill(self) -> None:
        """Top every shape up, one container at a time, never more than one create+start at
        once, and only while the worker is idle unless a shape ran dry."""
        failures = 0
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self._expire()
            for shape, ready in self._ready.items():
                while len(ready) < self._size[shape]:
                    await self._idle(ready)
                    try:
                        ready.append(await self._sandbox.prepare(shape))
                        failures = 0
                    except SandboxError as exc:
                        failures += 1
                        log.warning("warm pool: could not start a container: %s", exc)
                        # Docker is failing: back off, and let the breaker's pings judge it.
                        await asyncio.sleep(min(30.0, 0.5 * 2**failures))
                        self._wanted.set()
                        break
            if self._max_idle > 0:
                # wake up to recycle idle containers even when nobody takes one
                asyncio.get_running_loop().call_later(self._max_idle / 2, self._wanted.set)

    async def _expire(self) -> None:
        now = time.monotonic()
        for ready in self._ready.values():
            stale = [p for p in ready if now - p.created > self._max_idle]
            for prepared in stale:
                ready.remove(prepared)
                await self._sandbox.discard(prepared)

    async def drain(self) -> None:
        """Stop refilling and remove every waiting container."""
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
            self._filler = None
        for ready in self._ready.values():
            while ready:
                await self._sandbox.discard(ready.pop())


class SandboxPool:
    """Runs jobs through a sandbox, at most ``size`` at a time, warm when it can."""

    def __init__(self, sandbox: Sandbox, size: int, warm: WarmPool | None = None) -> None:
        self.sandbox = sandbox
        self.size = size
        self.warm = warm
        self._slots = asyncio.Semaphore(size)
        self.in_flight = 0

    async def run(
        self,
        job: bytes,
        limits: Limits,
        *,
        execution_id: str,
        caps: OutputCaps,
        cancel: asyncio.Event | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> SandboxRun:
        """Run in a slot; raises ``CancelledBeforeStart`` if cancelled while waiting for one.
        ``on_start`` is called once the job has its slot, as it starts."""
        await self._acquire(cancel)
        try:
            self.in_flight += 1
            if on_start is not None:
                on_start()
            try:
                prepared = self.warm.take(limits) if self.warm else None
                while True:
                    try:
                        return await self.sandbox.run(
                            job,
                            limits,
                            execution_id=execution_id,
                            caps=caps,
                            prepared=prepared,
                            cancel=cancel,
                        )
                    except SandboxError as exc:
                        if prepared is None:
                            raise
                        # A warm container that died while waiting (a daemon restart, say) is
                        # no fault of the job's: run it cold instead.
                        log.warning("warm container unusable (%s); running cold", exc)
                        prepared = None
            finally:
                self.in_flight -= 1
        finally:
            self._slots.release()

    async def _acquire(self, cancel: asyncio.Event | None) -> None:
        if cancel is None:
            await self._slots.acquire()
            return
        if cancel.is_set():
            raise CancelledBeforeStart()
        slot = asyncio.ensure_future(self._slots.acquire())
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({slot, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            cancelled.cancel()
            self._give_back(slot)
            raise
        cancelled.cancel()
        if slot.done() and not cancel.is_set():
            return
        self._give_back(slot)
        raise CancelledBeforeStart()

    def _give_back(self, slot: asyncio.Future[Any]) -> None:
        if slot.done() and not slot.cancelled():
            self._slots.release()
        else:
            slot.cancel()
