"""The readers that only follow a topic into a view poll the broker at the follow wait, not at
the requests' short one: on the embedded broker (which answers a waiting fetch only when its
wait is over) a worker's four of them polling every 20 ms doubled its idle CPU and the
broker's."""

from __future__ import annotations

from typing import Any

import pytest

from tako_stream.kafka import reader as reader_module
from tako_stream.settings import Settings
from tako_stream.worker import answered as answered_module
from tako_stream.worker.answered import AnsweredIndex


class Opened(BaseException):
    """Ends the follower's loop (which retries Kafka's errors) once its reader is made."""


class Recorded:
    """A TopicReader that records how it was made and opens no connection."""

    made: list[dict[str, Any]] = []

    def __init__(self, settings: Settings, topic: str, **options: Any) -> None:
        Recorded.made.append({"topic": topic, **options})

    async def __aenter__(self) -> Recorded:
        raise Opened()

    async def __aexit__(self, *exc: object) -> None:
        return None


SETTINGS = Settings(kafka_fetch_wait_ms=20, kafka_follow_wait_ms=321)


@pytest.fixture(autouse=True)
def recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    Recorded.made = []
    monkeypatch.setattr(reader_module, "TopicReader", Recorded)
    monkeypatch.setattr(answered_module, "TopicReader", Recorded)


async def test_a_tailed_topic_is_read_at_the_follow_wait() -> None:
    with pytest.raises(Opened):
        await reader_module.tail(SETTINGS, "control", lambda key, value: None)
    assert Recorded.made == [{"topic": "control", "wait_for_topic": 1.0, "fetch_max_wait_ms": 321}]


async def test_the_answered_index_follows_the_results_at_the_follow_wait() -> None:
    with pytest.raises(Opened):
        await AnsweredIndex(SETTINGS).run()
    assert [made["topic"] for made in Recorded.made] == [SETTINGS.results_topic]
    assert Recorded.made[0]["fetch_max_wait_ms"] == 321


def test_the_follow_wait_defaults_to_a_fifth_of_a_second() -> None:
    assert Settings().kafka_follow_wait_ms == 200


async def test_a_follower_never_polls_more_often_than_the_requests_consumer() -> None:
    # Apache Kafka and Redpanda: TAKO_KAFKA_FETCH_WAIT_MS=500 (they answer a waiting fetch as
    # soon as a record arrives); the followers had inherited it and must not fall to 200.
    kafka = Settings(kafka_fetch_wait_ms=500)
    with pytest.raises(Opened):
        await reader_module.tail(kafka, "control", lambda key, value: None)
    with pytest.raises(Opened):
        await AnsweredIndex(kafka).run()
    assert [made["fetch_max_wait_ms"] for made in Recorded.made] == [500, 500]
