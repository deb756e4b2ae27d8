"""Callers waiting for a record by key: the Python client's and the gateway's result waits.

A waiter registers before it looks the key up, so a record read between the lookup and the wait
still wakes it; it is removed however its wait ends (answer, timeout, cancellation), so waits
that time out leave nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Waiters(Generic[T]):
    """Futures by key, woken with the value read for that key."""

    def __init__(self) -> None:
        self._by_key: dict[str, list[asyncio.Future[T]]] = {}

    @contextlib.contextmanager
    def waiting(self, key: str) -> Iterator[asyncio.Future[T]]:
        """A future that ``wake(key, …)`` completes, registered while the block runs."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._by_key.setdefault(key, []).append(future)
        try:
            yield future
        finally:
            waiting = self._by_key.get(key, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._by_key.pop(key, None)

    def wake(self, key: str, value: T) -> None:
        for future in self._by_key.get(key, []):
            if not future.done():
                future.set_result(value)

    def __len__(self) -> int:
        """Keys waited for now."""
        return len(self._by_key)
