"""Retrying transient Docker failures: exponential backoff with jitter.

Only ``SandboxUnavailableError`` is retried (the daemon unreachable or erring); the user's code
failing, timeouts and sandbox set-up refusals are final on the first attempt.  The wait is an
``asyncio.sleep`` inside the job's own task, so it never blocks the event loop or other jobs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 2
    base_delay: float = 1.0
    max_delay: float = 30.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based).

        "Equal jitter": half the exponential step is kept, half is random, so workers that
        failed together do not retry together, yet never retry at once.
        """
        step = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return step / 2 + rand() * step / 2
