"""KafkaSource's pause and resume over aiokafka's consumer (its real subscription state, no
broker): what they pause, and that a partition a rebalance took in between ends nothing."""

from __future__ import annotations

import logging

import pytest
from aiokafka import TopicPartition
from aiokafka.consumer.subscription_state import SubscriptionState

from tako_stream.settings import Settings
from tako_stream.worker.stream import KafkaSource

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


def source_over(consumer: Consumer) -> KafkaSource:
    source = KafkaSource(Settings())
    source._consumer = consumer  # type: ignore[assignment]  # the test's stand-in
    return source


async def test_pause_stops_every_assigned_partition_and_resume_restarts_them() -> None:
    consumer = Consumer()
    source = source_over(consumer)
    source.pause()
    assert consumer.paused() == {TP0, TP1}
    source.resume()
    assert consumer.paused() == set()
    source.resume()  # nothing paused: nothing to do


async def test_a_partition_reassigned_while_paused_is_resumed_without_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rebalance while the intake waits: the new assignment comes unpaused, and resume only
    touches what is paused now (resuming the partitions paused before would raise in aiokafka
    for the one no longer assigned: nothing may be swallowed here)."""
    caplog.set_level(logging.DEBUG, logger="tako_stream.worker.stream")
    consumer = Consumer()
    source = source_over(consumer)
    source.pause()
    consumer.state.assign_from_subscribed({TP1})
    assert consumer.paused() == set()
    source.resume()
    assert not [r for r in caplog.records if "pausing or resuming" in r.getMessage()]
    source.pause()
    assert consumer.paused() == {TP1}
    source.resume()
    assert consumer.paused() == set()


async def test_an_error_from_the_consumer_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defensive: pausing only saves polls, so an aiokafka error here must not end the
    intake's loop (raising ``IllegalStateError`` for a partition not assigned)."""
    caplog.set_level(logging.DEBUG, logger="tako_stream.worker.stream")
    consumer = Consumer()
    source = source_over(consumer)
    consumer.state.assign_from_subscribed({TP1})
    source._consumer.pause = lambda *tps: consumer.state.pause(TP0)  # type: ignore[union-attr]
    source.pause()
    assert [r for r in caplog.records if "IllegalStateError" in r.getMessage()]
