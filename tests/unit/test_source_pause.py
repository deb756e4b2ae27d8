"""The intake source's pause and resume over aiokafka's consumer (its real subscription state, no
broker): what they pause, and that a partition a rebalance took in between ends nothing."""

from __future__ import annotations

import logging

import pytest
from aiokafka import TopicPartition
from aiokafka.consumer.subscription_state import SubscriptionState

from tako_stream.worker.stream import pause_fetching, resume_fetching

TP0, TP1 = TopicPartition("requests", 0), TopicPartition("requests", 1)


class Consumer:
    """The four methods KafkaSource's pause and resume use, over aiokafka's own state."""

    def __init__(self) -> None:
        self.state = SubscriptionState()
        self.state.subscribe({"requests"})
        self.state.assign_from_subscribed({TP0, TP1})

    def assignment(self) -> set[TopicPartition]:
        return self.state.assigned_partitions()

    def paused(self) -> set[TopicPartition]:
        return self.state.paused_partitions()

    def pause(self, *partitions: TopicPartition) -> None:
        for tp in partitions:
            self.state.pause(tp)

    def resume(self, *partitions: TopicPartition) -> None:
        for tp in partitions:
            self.state.resume(tp)


async def test_pause_stops_every_assigned_partition_and_resume_restarts_them() -> None:
    consumer = Consumer()
    pause_fetching(consumer)
    assert consumer.paused() == {TP0, TP1}
    resume_fetching(consumer)
    assert consumer.paused() == set()
    resume_fetching(consumer)  # nothing paused: nothing to do


async def test_a_partition_reassigned_while_paused_is_resumed_without_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rebalance while the intake waits: the new assignment comes unpaused, and resume only
    touches what is paused now (resuming the partitions paused before would raise in aiokafka
    for the one no longer assigned: nothing may be swallowed here)."""
    caplog.set_level(logging.DEBUG, logger="tako_stream.worker.stream")
    consumer = Consumer()
    pause_fetching(consumer)
    consumer.state.assign_from_subscribed({TP1})
    assert consumer.paused() == set()
    resume_fetching(consumer)
    assert not [r for r in caplog.records if "pausing or resuming" in r.getMessage()]
    pause_fetching(consumer)
    assert consumer.paused() == {TP1}
    resume_fetching(consumer)
    assert consumer.paused() == set()


async def test_an_error_from_the_consumer_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defensive: pausing only saves polls, so an aiokafka error here must not end the
    intake's loop (raising ``IllegalStateError`` for a partition not assigned)."""
    caplog.set_level(logging.DEBUG, logger="tako_stream.worker.stream")
    consumer = Consumer()
    consumer.state.assign_from_subscribed({TP1})
    consumer.pause = lambda *tps: consumer.state.pause(TP0)  # type: ignore[method-assign]
    pause_fetching(consumer)
    assert [r for r in caplog.records if "IllegalStateError" in r.getMessage()]
