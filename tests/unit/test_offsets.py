"""OffsetTracker: the committed position never passes a job that is still running."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tako_stream.worker.offsets import OffsetTracker


def test_unknown_partition_has_no_position() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    assert tracker.position("p") is None
    assert tracker.running("p") == 0
    assert tracker.committable() == {}


def test_position_while_running_and_after() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.start("p", 10)
    assert tracker.position("p") == 10
    assert tracker.running("p") == 1
    tracker.finish("p", 10)
    assert tracker.position("p") == 11
    assert tracker.running("p") == 0


def test_out_of_order_finishes_never_pass_an_unfinished_offset() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(5):
        tracker.start("p", offset)
    tracker.finish("p", 4)
    tracker.finish("p", 2)
    tracker.finish("p", 3)
    assert tracker.position("p") == 0
    tracker.finish("p", 0)
    assert tracker.position("p") == 1
    tracker.finish("p", 1)
    assert tracker.position("p") == 5


def test_partitions_are_independent() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    a, b = ("t", 0), ("t", 1)
    tracker.start(a, 0)
    tracker.start(b, 100)
    tracker.finish(b, 100)
    assert tracker.position(a) == 0
    assert tracker.position(b) == 101
    assert tracker.committable() == {a: 0, b: 101}


def test_finishing_an_unknown_offset_is_harmless() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.finish("nobody", 3)
    tracker.start("p", 1)
    tracker.finish("p", 7)
    assert tracker.position("p") == 1
    assert tracker.position("nobody") is None


def test_committable_reports_only_moved_positions() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.start("a", 0)
    tracker.start("b", 0)
    tracker.finish("a", 0)
    assert tracker.committable() == {"a": 1, "b": 0}
    tracker.committed({"a": 1, "b": 0})
    assert tracker.committable() == {}
    tracker.finish("b", 0)
    assert tracker.committable() == {"b": 1}
    tracker.start("a", 1)  # position of a stays 1: already committed
    assert tracker.committable() == {"b": 1}


def test_committed_then_committable_is_empty() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(3):
        tracker.start("p", offset)
        tracker.finish("p", offset)
    tracker.committed(tracker.committable())
    assert tracker.committable() == {}


def test_committed_never_moves_backwards() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.start("p", 5)
    tracker.finish("p", 5)
    tracker.committed({"p": 6})
    tracker.committed({"p": 2})
    assert tracker.committable() == {}


def test_forget_drops_everything_of_a_partition() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.start("a", 3)
    tracker.start("b", 4)
    tracker.committed({"a": 3})
    tracker.forget(["a", "unknown"])
    assert tracker.position("a") is None
    assert tracker.running("a") == 0
    assert tracker.committable() == {"b": 4}
    # Reassigned later: it starts over, and its first position is committable again.
    tracker.start("a", 3)
    assert tracker.committable() == {"a": 3, "b": 4}


def expected_position(started: set[int], finished: set[int]) -> int:
    unfinished = started - finished
    return min(unfinished) if unfinished else max(started) + 1


@settings(max_examples=300, deadline=None)
@given(st.data(), st.integers(min_value=0, max_value=1000), st.integers(min_value=1, max_value=30))
def test_position_is_lowest_unfinished_or_one_past_last(
    data: st.DataObject, first: int, count: int
) -> None:
    """Offsets start in order (as Kafka delivers them) and finish in any order."""
    tracker: OffsetTracker[str] = OffsetTracker()
    started: set[int] = set()
    finished: set[int] = set()
    pending = list(range(first, first + count))
    while pending or started - finished:
        running = sorted(started - finished)
        if pending and (not running or data.draw(st.booleans())):
            offset = pending.pop(0)
            tracker.start("p", offset)
            started.add(offset)
        else:
            offset = data.draw(st.sampled_from(running))
            tracker.finish("p", offset)
            finished.add(offset)
        position = tracker.position("p")
        assert position == expected_position(started, finished)
        assert all(position <= o for o in started - finished)
        assert tracker.running("p") == len(started - finished)
    assert tracker.position("p") == first + count


class TrackerMachine(RuleBasedStateMachine):
    """Two partitions, starts in increasing order, finishes and commits at random."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker: OffsetTracker[int] = OffsetTracker()
        self.next = {0: 0, 1: 50}
        self.started: dict[int, set[int]] = {0: set(), 1: set()}
        self.finished: dict[int, set[int]] = {0: set(), 1: set()}
        self.committed: dict[int, int] = {}

    @rule(partition=st.sampled_from([0, 1]), skip=st.integers(min_value=0, max_value=3))
    def start(self, partition: int, skip: int) -> None:
        offset = self.next[partition] + skip  # gaps: compacted topics, transaction markers
        self.next[partition] = offset + 1
        self.tracker.start(partition, offset)
        self.started[partition].add(offset)

    @precondition(lambda self: any(self.started[p] - self.finished[p] for p in (0, 1)))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        partition = data.draw(
            st.sampled_from([p for p in (0, 1) if self.started[p] - self.finished[p]])
        )
        offset = data.draw(
            st.sampled_from(sorted(self.started[partition] - self.finished[partition]))
        )
        self.tracker.finish(partition, offset)
        self.finished[partition].add(offset)

    @rule()
    def commit(self) -> None:
        ready = self.tracker.committable()
        for partition, position in ready.items():
            assert position > self.committed.get(partition, -1)
        self.tracker.committed(ready)
        self.committed.update(ready)
        assert self.tracker.committable() == {}

    @invariant()
    def position_is_safe(self) -> None:
        for partition in (0, 1):
            started = self.started[partition]
            if not started:
                assert self.tracker.position(partition) is None
                continue
            expected = expected_position(started, self.finished[partition])
            assert self.tracker.position(partition) == expected
            assert self.committed.get(partition, -1) <= expected


TestTrackerMachine = TrackerMachine.TestCase
TestTrackerMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
