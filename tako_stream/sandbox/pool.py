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
import functools
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


#: Seconds a job that finds its shape empty waits for a refill already under way (which
#: started earlier, so ends sooner than a cold start would) before it runs cold.
REFILL_WAIT = 2.0


class WarmPool:
    """Started containers waiting for a job, per container shape, refilled as they are taken.

    Creating and starting a container costs the engine ~0.2 s of CPU that a running job would
    lose, and the engine churns only so many containers a second, so refills follow demand
    within the pool's slots (``capacity``, the jobs a worker runs at once): containers being
    prepared and jobs running never exceed it.  A shape with at least half of its containers
    waiting is refilled only while no job runs (takes are rare: spaced jobs keep their
    latency); a shape drained below half (back-to-back or bursty jobs) is refilled at once,
    several at a time, in whatever slots the running jobs leave free.  A saturated worker
    prepares nothing ahead: its jobs start their own containers in their own slots.
    """

    def __init__(
        self,
        sandbox: Sandbox,
        shapes: Iterable[tuple[Limits, int]],
        *,
        max_idle: float,
        busy: Callable[[], int] = lambda: 0,
        capacity: int = 1,
    ) -> None:
        """``shapes``: each container shape with how many of it to keep ready (job types that
        share a shape share its containers: the largest count wins); ``busy``: jobs running or
        waiting for a slot now; ``capacity``: the most jobs the worker runs at once."""
        self._sandbox = sandbox
        self._busy = busy
        self._capacity = max(1, capacity)
        self._max_idle = max_idle
        self._size: dict[Limits, int] = {}
        for shape, size in shapes:
            key = warm_key(shape)
            self._size[key] = max(size, self._size.get(key, 0))
        self._ready: dict[Limits, list[Prepared]] = {key: [] for key in self._size}
        self._preparing: dict[Limits, set[asyncio.Task[None]]] = {k: set() for k in self._size}
        self._failures = 0
        self._retry_at = 0.0
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None

    def sizes(self) -> dict[str, int]:
        """Ready containers by image (job types that share an image are summed)."""
        by_image: dict[str, int] = {}
        for shape, ready in self._ready.items():
            by_image[shape.image] = by_image.get(shape.image, 0) + len(ready)
        return by_image

    @property
    def preparing(self) -> int:
        """Refills under way."""
        return sum(len(tasks) for tasks in self._preparing.values())

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

    async def claim(self, limits: Limits, wait: float = REFILL_WAIT) -> Prepared | None:
        """A waiting container of the shape, or the first refill of it under way to end
        (within ``wait`` seconds); None when there is neither: the job runs cold."""
        key = warm_key(limits)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            prepared = self.take(limits)
            if prepared is not None:
                return prepared
            refills = self._preparing.get(key)
            left = deadline - loop.time()
            if not refills or left <= 0:
                return None
            # asyncio.wait: ending this wait (a timeout, a cancel) never cancels a refill
            await asyncio.wait(set(refills), timeout=left, return_when=asyncio.FIRST_COMPLETED)

    def job_ended(self) -> None:
        """A job's end frees a slot (and may leave the worker idle): a refill waiting for
        either may start now."""
        self._wanted.set()

    async def _fill(self) -> None:
        """Start the refills each wake-up allows; wake again on a take, a job's end, a
        refill's end or a back-off's end: whatever a waiting refill waits for is one of them."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self._expire()
            self._refill()
            if self._max_idle > 0:
                # wake up to recycle idle containers even when nobody takes one
                loop.call_later(self._max_idle / 2, self._wanted.set)

    def _refill(self) -> None:
        """Start the refills allowed now (see the class docstring)."""
        if time.monotonic() < self._retry_at:
            return  # the back-off's end wakes the filler
        busy = self._busy()
        free = self._capacity - busy - self.preparing
        for shape, ready in self._ready.items():
            preparing = self._preparing[shape]
            while len(ready) + len(preparing) < self._size[shape]:
                if free <= 0:
                    return  # a job's or a refill's end wakes the filler
                if busy and 2 * len(ready) >= self._size[shape]:
                    break  # taken rarely: a job's end wakes the filler once the worker idles
                task = asyncio.ensure_future(self._prepare(shape, ready))
                preparing.add(task)
                task.add_done_callback(functools.partial(self._prepared, preparing))
                free -= 1

    async def _prepare(self, shape: Limits, ready: list[Prepared]) -> None:
        try:
            ready.append(await self._sandbox.prepare(shape))
            self._failures = 0
        except SandboxError as exc:
            self._failures += 1
            log.warning("warm pool: could not start a container: %s", exc)
            # Docker is failing: back off, and let the breaker's pings judge it.
            delay = min(30.0, 0.5 * 2**self._failures)
            self._retry_at = time.monotonic() + delay
            asyncio.get_running_loop().call_later(delay, self._wanted.set)

    def _prepared(self, preparing: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
        """A refill ended: no longer counted, and the filler may start the next."""
        preparing.discard(task)
        self._wanted.set()

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
        refills = [task for tasks in self._preparing.values() for task in tasks]
        for task in refills:
            task.cancel()
        if refills:  # a cancelled prepare removes what it created
            await asyncio.gather(*refills, return_exceptions=True)
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
        self._waiting = 0

    @property
    def busy(self) -> int:
        """Jobs running or waiting for a slot: what a warm pool must not prepare ahead of.  A
        job ending while another waits leaves the worker as saturated as before: the waiting
        job starts its own container in the freed slot."""
        return self.in_flight + self._waiting

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
        self._waiting += 1
        try:
            await self._acquire(cancel)
        except BaseException:
            self._waiting -= 1
            if self.warm is not None:
                self.warm.job_ended()  # it leaves without running: demand fell all the same
            raise
        self._waiting -= 1
        try:
            self.in_flight += 1
            if on_start is not None:
                on_start()
            try:
                prepared = await self.warm.claim(limits) if self.warm else None
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
                if self.warm is not None:
                    self.warm.job_ended()
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
