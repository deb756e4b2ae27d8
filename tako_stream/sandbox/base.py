"""The seam between the worker and whatever runs a job: the ``Sandbox`` protocol.

The pools and the executor only know this protocol, so their orchestration (slots, warm
containers, retries, cancellation) is unit-tested against an in-memory fake, while
``DockerSandbox`` is tested against the real engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from tako_stream.core.jobtypes import Limits
from tako_stream.sandbox.protocol import Collected
from tako_stream.settings import OutputCaps


@dataclass
class SandboxRun:
    """What happened in the sandbox, before classification."""

    collected: Collected
    oom_killed: bool
    container_exit: int | None
    outer_timeout: bool
    seconds: float
    warm: bool = False
    #: A cancel was sent to the supervisor while the job ran.
    cancel_sent: bool = False


class Prepared(Protocol):
    """A sandbox started ahead of time, waiting for its one job."""

    #: ``time.monotonic()`` when it was started, so idle ones can be replaced.
    created: float

    def alive(self) -> bool:
        """Whether it can still take a job (its connection to the engine is open)."""
        ...


class Sandbox(Protocol):
    """Runs one job per fresh sandbox; every failure around the job is a ``SandboxError``."""

    async def ping(self) -> None:
        """Return when the engine answers; ``SandboxUnavailableError`` otherwise."""
        ...

    async def prepare(self, limits: Limits, *, execution_id: str = "warm") -> Prepared:
        """Start a sandbox that waits for one job; ``StartupTimeoutError`` when that takes
        longer than ``limits.startup_timeout``."""
        ...

    async def run(
        self,
        job: bytes,
        limits: Limits,
        *,
        execution_id: str,
        caps: OutputCaps,
        prepared: Prepared | None = None,
        cancel: asyncio.Event | None = None,
    ) -> SandboxRun:
        """Run ``job`` (encoded by ``protocol.encode_job``) in ``prepared`` or a new sandbox,
        which is gone afterwards whatever happened; ``cancel`` set while it runs stops it."""
        ...

    async def discard(self, prepared: Prepared) -> None:
        """Remove a prepared sandbox that will not run a job."""
        ...

    async def distributions(self, limits: Limits) -> Mapping[str, str]:
        """The Python distributions installed in ``limits.image``, as a job's interpreter finds
        them: PEP 503-normalised name → version.  Learnt once per image and kept."""
        ...

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait (at most ``timeout``) for removals still under way."""
        ...
