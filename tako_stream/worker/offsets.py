"""Which offsets may be committed while jobs finish out of order.

Jobs of one partition run concurrently and finish in any order, yet Kafka stores one position
per partition: everything before it counts as done.  So the position committed is the lowest
offset still running (or one past the last seen when none is), never beyond an unfinished job.
This is the guard faust-streaming lacks with concurrent agents (its issue #606), which is why
the request stream is consumed and committed here rather than by a faust agent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

P = TypeVar("P")  # a partition handle: aiokafka's TopicPartition, or anything hashable in tests


class OffsetTracker(Generic[P]):
    """Per partition: offsets started and not finished, and the position safe to commit."""

    def __init__(self) -> None:
        self._running: dict[P, set[int]] = {}
        self._next: dict[P, int] = {}
        self._committed: dict[P, int] = {}

    def start(self, partition: P, offset: int) -> None:
        self._running.setdefault(partition, set()).add(offset)
        self._next[partition] = max(self._next.get(partition, 0), offset + 1)

    def finish(self, partition: P, offset: int) -> None:
        running = self._running.get(partition)
        if running is not None:
            running.discard(offset)

    def running(self, partition: P) -> int:
        return len(self._running.get(partition, ()))

    def position(self, partition: P) -> int | None:
        """The offset to commit: everything before it has been answered."""
        if partition not in self._next:
            return None
        running = self._running.get(partition)
        return min(running) if running else self._next[partition]

    def committable(self) -> dict[P, int]:
        """Positions that moved since they were last committed."""
        ready = {}
        for partition in self._next:
            position = self.position(partition)
            if position is not None and position > self._committed.get(partition, -1):
                ready[partition] = position
        return ready

    def committed(self, positions: dict[P, int]) -> None:
        for partition, position in positions.items():
            self._committed[partition] = max(self._committed.get(partition, -1), position)

    def forget(self, partitions: Iterable[P]) -> None:
        """Drop partitions this worker no longer owns (after a revoke)."""
        for partition in partitions:
            self._running.pop(partition, None)
            self._next.pop(partition, None)
            self._committed.pop(partition, None)
