"""A memory budget shared by tasks: the rejection path holds at most so many bytes at once."""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    """At most ``total`` bytes held at once, handed out first come, first served; a request
    for more than the whole budget waits for all of it."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int) -> int:
        """Take ``size`` bytes (capped at the total); returns what to ``release`` later."""
        size = max(1, min(size, self.total))
        if not self._waiters and self.free >= size:
            self.free -= size
            return size
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((size, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(size)  # granted just as it was cancelled: give it back
            raise
        return size

    def release(self, size: int) -> None:
        self.free += size
        while self._waiters and self._waiters[0][0] <= self.free:
            wanted, granted = self._waiters.popleft()
            if granted.done():
                continue  # its waiter was cancelled
            self.free -= wanted
            granted.set_result(None)
