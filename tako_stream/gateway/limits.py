"""The gateway's request rate limit: a fixed window per client address, as Tako VM's API has.

In memory, per gateway: a client spread over several gateways gets each one's allowance (a
load balancer pinning clients to one gateway makes it exact).  Buckets of clients idle for two
windows are dropped once per window, so memory follows the clients active now.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class FixedWindow:
    """``limit`` requests per ``window`` seconds per key."""

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._buckets: dict[str, tuple[float, int]] = {}
        self._swept = clock()

    def allow(self, key: str) -> tuple[bool, int]:
        """(allowed, seconds until the window ends: the Retry-After of a refusal)."""
        now = self._clock()
        start, count = self._buckets.get(key, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        count += 1
        self._buckets[key] = (start, count)
        self._sweep(now)
        if count <= self.limit:
            return True, 0
        return False, max(1, math.ceil(self.window - (now - start)))

    def _sweep(self, now: float) -> None:
        if now - self._swept < self.window:
            return
        cutoff = now - 2 * self.window
        self._buckets = {k: v for k, v in self._buckets.items() if v[0] >= cutoff}
        self._swept = now

    def __len__(self) -> int:
        return len(self._buckets)
