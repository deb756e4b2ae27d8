"""The breaker's state machine: closed → open → half_open → closed, as a fold over events."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import faust
import orjson
import pytest
from faust.types import Message

from tako_stream.settings import BreakerConfig, Settings
from tako_stream.worker.breaker.handle import Breaker
from tako_stream.worker.breaker.shared import (
    MAX_ENDPOINTS,
    MAX_KEY,
    MAX_VALUE,
    BreakerStates,
    TableWriter,
    attach,
    stored_state,
)
from tako_stream.worker.breaker.state import (
    MAX_DETAIL,
    BreakerEvent,
    BreakerState,
    Outcome,
    State,
    endpoint_key,
    fold,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CONFIG = BreakerConfig(failure_threshold=5, reset_timeout=30, success_threshold=2)


def ev(outcome: Outcome, seconds: float) -> BreakerEvent:
    return BreakerEvent(
        endpoint="e", outcome=outcome, at=T0 + timedelta(seconds=seconds), worker_id="w"
    )


def run(events: list[BreakerEvent]) -> BreakerState:
    state = None
    for event in events:
        state = fold(state, event, CONFIG)
    assert state is not None
    return state


F, S = Outcome.FAILURE, Outcome.SUCCESS


def test_opens_after_five_consecutive_failures() -> None:
    assert run([ev(F, i) for i in range(4)]).state is State.CLOSED
    opened = run([ev(F, i) for i in range(5)])
    assert opened.state is State.OPEN and opened.opened_at == T0 + timedelta(seconds=4)
    assert opened.failure_count == 5 and opened.last_failure == opened.opened_at


def test_a_success_resets_the_consecutive_count() -> None:
    state = run([ev(F, 0), ev(F, 1), ev(F, 2), ev(F, 3), ev(S, 4), ev(F, 5)])
    assert state.state is State.CLOSED and state.failure_count == 1


def test_half_open_after_the_reset_timeout_then_closed_after_two_successes() -> None:
    opened = run([ev(F, i) for i in range(5)])
    assert opened.effective(T0 + timedelta(seconds=33), CONFIG).state is State.OPEN
    half = opened.effective(T0 + timedelta(seconds=34), CONFIG)
    assert half.state is State.HALF_OPEN and half.success_count == 0
    one = fold(opened, ev(S, 35), CONFIG)
    assert one.state is State.HALF_OPEN and one.success_count == 1
    two = fold(one, ev(S, 36), CONFIG)
    assert two.state is State.CLOSED and two.failure_count == 0


def test_any_failure_in_half_open_reopens() -> None:
    opened = run([ev(F, i) for i in range(5)])
    one = fold(opened, ev(S, 40), CONFIG)
    again = fold(one, ev(F, 41), CONFIG)
    assert again.state is State.OPEN and again.opened_at == T0 + timedelta(seconds=41)
    # and the reset timeout runs from the re-opening
    assert again.effective(T0 + timedelta(seconds=70), CONFIG).state is State.OPEN
    assert again.effective(T0 + timedelta(seconds=71), CONFIG).state is State.HALF_OPEN


def test_events_while_open_do_not_close_or_extend_it() -> None:
    opened = run([ev(F, i) for i in range(5)])
    late_success = fold(opened, ev(S, 10), CONFIG)
    assert late_success.state is State.OPEN and late_success.opened_at == opened.opened_at
    more = fold(opened, ev(F, 20), CONFIG)
    assert more.state is State.OPEN and more.opened_at == opened.opened_at
    assert more.failure_count == 6


def test_endpoint_key_is_per_host_for_local_sockets() -> None:
    assert endpoint_key(None, "h1") == "h1|unix:///var/run/docker.sock"
    assert endpoint_key("unix:///tmp/d.sock", "h2") == "h2|unix:///tmp/d.sock"
    assert endpoint_key("tcp://10.0.0.5:2375", "h1") == "tcp://10.0.0.5:2375"


class FakeTable:
    """Stands in for the GlobalTable: the fold applied at once, as the single writer would."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.published: list[BreakerEvent] = []
        self.now = T0

    def read(self, key: str) -> BreakerState | None:
        raw = self.data.get(key)
        return BreakerState.model_validate(raw) if raw else None

    async def publish(self, event: BreakerEvent) -> None:
        self.published.append(event)
        previous = self.data.get(event.endpoint)
        state = BreakerState.model_validate(previous) if previous else None
        self.data[event.endpoint] = fold(state, event, CONFIG).model_dump(mode="json")


@pytest.fixture
def table() -> FakeTable:
    return FakeTable()


def handle(table: FakeTable) -> Breaker:
    return Breaker(
        endpoint="e",
        config=CONFIG,
        worker_id="w",
        read=table.read,
        publish=table.publish,
        clock=lambda: table.now,
    )


async def test_handle_admits_one_trial_at_a_time_when_half_open(table: FakeTable) -> None:
    breaker = handle(table)
    assert breaker.acquire() is not None
    for _ in range(5):
        await breaker.record(Outcome.FAILURE, source="job", detail="down")
    assert breaker.view().state is State.OPEN
    assert breaker.acquire() is None
    table.now = T0 + timedelta(seconds=31)
    trial = breaker.acquire()
    assert trial is not None
    assert breaker.acquire() is None  # one trial per worker at a time
    trial.release()
    assert breaker.acquire() is not None


async def test_quiet_successes_are_not_published(table: FakeTable) -> None:
    breaker = handle(table)
    await breaker.record(Outcome.SUCCESS, source="ping")
    assert table.published == []
    await breaker.record(Outcome.FAILURE, source="ping", detail="x")
    await breaker.record(Outcome.SUCCESS, source="ping")
    assert [e.outcome for e in table.published] == [Outcome.FAILURE, Outcome.SUCCESS]


async def test_a_failing_publish_never_raises(table: FakeTable) -> None:
    async def broken(event: BreakerEvent) -> None:
        raise RuntimeError("broker down")

    breaker = Breaker(endpoint="e", config=CONFIG, worker_id="w", read=table.read, publish=broken)
    await breaker.record(Outcome.FAILURE, source="job")


def test_pings_do_not_erase_job_failures() -> None:
    """Create and start failing while /info answers: the pings in between must not reset the
    count, or such an engine would never open the breaker."""
    events = []
    for n in range(5):
        events.append(
            BreakerEvent(
                endpoint="e",
                outcome=F,
                at=T0 + timedelta(seconds=2 * n),
                worker_id="w",
                source="job",
            )
        )
        events.append(
            BreakerEvent(
                endpoint="e",
                outcome=S,
                at=T0 + timedelta(seconds=2 * n + 1),
                worker_id="w",
                source="ping",
            )
        )
    assert run(events[:-1]).state is State.OPEN


def test_a_ping_ends_a_run_of_ping_failures_and_a_job_ends_any() -> None:
    def event(outcome: Outcome, seconds: float, source: str) -> BreakerEvent:
        return BreakerEvent(
            endpoint="e",
            outcome=outcome,
            at=T0 + timedelta(seconds=seconds),
            worker_id="w",
            source=source,
        )

    pinged = run([event(F, 0, "ping"), event(F, 1, "ping"), event(S, 2, "ping")])
    assert pinged.state is State.CLOSED and pinged.failure_count == 0
    jobs = run([event(F, 0, "job"), event(S, 1, "ping")])
    assert jobs.failure_count == 1
    assert run([event(F, 0, "job"), event(S, 1, "ping"), event(S, 2, "job")]).failure_count == 0


# --- Records from the topics: anyone may write them, none may crash a reader ---------------------

OPEN_NAIVE = (
    b'{"endpoint":"h|unix:///var/run/docker.sock","state":"open","opened_at":"2024-01-01T00:00:00"}'
)


def test_a_time_without_a_zone_is_read_as_utc() -> None:
    """A changelog record without a zone once made ``effective`` raise TypeError (naive minus
    aware): the ping task died with the worker, again on every restart, and every job's
    ``acquire`` raised meanwhile."""
    state = BreakerState.model_validate_json(OPEN_NAIVE)
    assert state.opened_at == datetime(2024, 1, 1, tzinfo=UTC)
    assert state.effective(T0, CONFIG).state is State.HALF_OPEN
    assert state.effective(datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC), CONFIG).state is State.OPEN
    event = BreakerEvent.model_validate_json(
        b'{"endpoint":"e","outcome":"failure","at":"2026-01-01T00:01:00","worker_id":"w"}'
    )
    assert event.at == T0 + timedelta(minutes=1)
    assert fold(run([ev(F, i) for i in range(5)]), event, CONFIG).state is State.OPEN


async def test_a_changelog_record_without_a_zone_crashes_no_reader() -> None:
    states = BreakerStates(CONFIG)
    states.apply(b"h|unix:///var/run/docker.sock", OPEN_NAIVE)
    assert states.worst(T0).state is State.HALF_OPEN  # what the gateway's /health reads
    breaker = Breaker(
        endpoint="h|unix:///var/run/docker.sock",
        config=CONFIG,
        worker_id="w",
        read=states.get,
        publish=FakeTable().publish,
        clock=lambda: T0,
    )
    assert breaker.acquire() is not None  # the half-open trial
    await breaker.record(Outcome.SUCCESS, source="ping")  # what the ping task does


def test_counts_no_encoder_can_carry_are_skipped() -> None:
    """Counts are written back by the table's writer and served by /health and /metrics, all
    encoded with orjson (64-bit integers) or as float gauges: a record past that is not ours."""
    states = BreakerStates(CONFIG)
    for count in (10**30, -1):  # json: orjson itself refuses to write the first
        states.apply(b"e", json.dumps({"endpoint": "e", "failure_count": count}).encode())
        assert states.get("e") is None
    states.apply(b"e", orjson.dumps({"endpoint": "e", "failure_count": 7}))
    assert states.get("e") == BreakerState(endpoint="e", failure_count=7)


def test_the_writer_starts_afresh_from_a_stored_state_it_cannot_read() -> None:
    """The folding agent reads the previous state from its table, recovered from the changelog
    anyone may write: a value that is no state must not end the agent."""
    assert stored_state(None) is None
    assert stored_state({"endpoint": "e", "failure_count": 10**30}) is None
    assert stored_state(["not", "a", "state"]) is None
    assert stored_state({"endpoint": "e", "opened_at": "2024-01-01T00:00:00"}) == BreakerState(
        endpoint="e", opened_at=datetime(2024, 1, 1, tzinfo=UTC)
    )


def test_the_view_of_every_endpoint_is_bounded() -> None:
    """Forged endpoint keys (and huge records) once grew every worker's and gateway's view
    without bound; the least recently written are forgotten now (an engine in trouble is
    written at every ping, so it is never among them)."""
    states = BreakerStates(CONFIG)
    for n in range(5000):
        states.apply(f"forged-{n}".encode(), orjson.dumps({"endpoint": f"forged-{n}"}))
    states.apply(b"real", orjson.dumps({"endpoint": "real", "state": "open"}))
    assert len(states.view) < 5000
    assert states.get("real") is not None and states.get("forged-4999") is not None
    huge = orjson.dumps({"endpoint": "big", "last_error": "x" * 100_000})
    states.apply(b"big", huge)
    states.apply(b"k" * 100_000, orjson.dumps({"endpoint": "long key"}))
    states.apply(None, huge)
    assert states.get("big") is None and len(states.view) < 5000
    assert all(len(key) < 100_000 for key in states.view)


def event_bytes(endpoint: str, outcome: Outcome = Outcome.FAILURE, seconds: float = 0) -> bytes:
    return orjson.dumps(
        BreakerEvent(
            endpoint=endpoint, outcome=outcome, at=T0 + timedelta(seconds=seconds), worker_id="w"
        ).model_dump(mode="json")
    )


def test_the_writers_table_keeps_at_most_max_endpoints() -> None:
    """Each endpoint a (forged) event named was a table entry for good: the writer's memory grew
    without bound.  Beyond ``MAX_ENDPOINTS`` the least recently written endpoint is deleted (a
    tombstone for the views too); an engine in trouble, written at every ping, stays."""
    table: dict[bytes, Any] = {}
    writer = TableWriter(table, CONFIG)
    for n in range(3 * MAX_ENDPOINTS):
        writer.apply(event_bytes(f"forged-{n}"))
        if n % 100 == 0:  # the real engine fails between them, as its pings do
            writer.apply(event_bytes("real", seconds=n))
    assert len(table) == MAX_ENDPOINTS
    assert writer.forgotten == 2 * MAX_ENDPOINTS + 1
    assert b"real" in table and table[b"real"]["failure_count"] == 30
    assert b"forged-0" not in table and b"forged-2999" in table
    writer.apply(event_bytes("x" * (MAX_KEY + 1)))  # too long to be an engine of ours
    assert len(table) == MAX_ENDPOINTS and b"forged-2999" in table


def test_a_recovered_table_over_the_bound_loses_what_was_not_written_since() -> None:
    """A writer taking over recovers the table from the changelog (a version without the bound
    left it any size): those entries predate anything it writes, so they go first."""
    table: dict[bytes, Any] = {f"old-{n}".encode(): {"endpoint": f"old-{n}"} for n in range(5)}
    writer = TableWriter(table, CONFIG, keep=3)
    writer.apply(event_bytes("old-4"))  # written again: now the newest
    writer.apply(event_bytes("new"))
    assert sorted(table) == [b"new", b"old-3", b"old-4"]
    assert table[b"old-4"]["failure_count"] == 1
    writer.apply(event_bytes("newer"))
    assert sorted(table) == [b"new", b"newer", b"old-4"]


def test_the_writer_skips_an_unreadable_event() -> None:
    table: dict[bytes, Any] = {}
    writer = TableWriter(table, CONFIG)
    writer.apply(b"not json")
    writer.apply(event_bytes("e"))
    assert list(table) == [b"e"] and table[b"e"]["failure_count"] == 1


async def test_record_never_raises_whatever_the_state_read(table: FakeTable) -> None:
    def broken(endpoint: str) -> BreakerState | None:
        raise TypeError("unreadable")

    breaker = Breaker(
        endpoint="e", config=CONFIG, worker_id="w", read=broken, publish=table.publish
    )
    await breaker.record(Outcome.SUCCESS, source="ping")


def forged_event(endpoint: str, **fields: Any) -> bytes:
    event = {"endpoint": endpoint, "outcome": "failure", "at": "2026-01-01T00:00:00Z"}
    return orjson.dumps({**event, "worker_id": "w", **fields})


def test_an_event_is_no_larger_than_ours_and_names_only_our_sources() -> None:
    """The table's writer bounded how many endpoints it kept, not each state: ``source`` and
    ``worker_id`` had no bound and ``source`` was copied into the state, so 1,000 forged
    endpoints with a megabyte each made the writer's table about a gigabyte."""
    table: dict[bytes, Any] = {}
    writer = TableWriter(table, CONFIG, keep=10)
    for n in range(10):
        writer.apply(forged_event(f"forged-{n}", source="s" * 500_000))
        writer.apply(forged_event(f"forged-{n}", source="s" * 5_000))  # under MAX_VALUE raw
        writer.apply(forged_event(f"forged-{n}", worker_id="w" * 5_000))
    assert table == {}
    for bad in ({"source": "cron"}, {"worker_id": "w" * 257}, {"worker_id": ""}):
        with pytest.raises(ValueError):
            BreakerEvent.model_validate_json(forged_event("e", **bad))
    for source in ("job", "ping"):  # all the workers send (execute.py, runtime.py)
        writer.apply(forged_event("e", source=source, worker_id="w" * 256))
    assert table[b"e"]["failure_source"] == "ping" and table[b"e"]["failure_count"] == 2
    assert all(len(orjson.dumps(value)) <= MAX_VALUE for value in table.values())


def test_a_state_over_max_value_is_not_written() -> None:
    """An event under ``MAX_VALUE`` may still fold into a state over it (an endpoint of
    characters JSON escapes six times over): the state is skipped, as every reader would skip
    it, and the endpoint's state before it kept."""
    endpoint, detail = "\x01" * 840, "\x01" * MAX_DETAIL
    raw = forged_event(endpoint, detail=detail)
    assert len(endpoint.encode()) <= MAX_KEY and len(raw) <= MAX_VALUE
    table: dict[bytes, Any] = {}
    writer = TableWriter(table, CONFIG)
    writer.apply(forged_event(endpoint))
    assert table[endpoint.encode()]["failure_count"] == 1
    writer.apply(raw)
    assert table[endpoint.encode()]["failure_count"] == 1  # the state before it
    assert writer.skips.counts == {"a state too large to be ours": 1}


def test_skipped_events_are_logged_at_powers_of_two_not_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A forged event was a warning each: anyone writing the events topic flooded the logs."""
    writer = TableWriter({}, CONFIG)
    with caplog.at_level("WARNING"):
        for _ in range(100):
            writer.apply(event_bytes("x" * (MAX_KEY + 1)))
            writer.apply(b"not json")
            writer.apply(b"x" * (MAX_VALUE + 1))
    assert len(caplog.records) == 3 * 7  # the 1st, 2nd, 4th ... 64th of each
    assert all(len(r.getMessage()) < 400 for r in caplog.records)
    assert writer.skips.counts == {
        "an event for an endpoint too long to be ours": 100,
        "an unreadable event": 100,
        "an event too large to be ours": 100,
    }


def test_a_record_not_ours_ends_the_views_copy_of_its_key() -> None:
    """A reader skipped a value too large (or unreadable) and kept the key's previous state: one
    forged record froze every view's copy of an engine, where a reader started after compaction
    (which keeps only the newest value) has none.  Both read it as closed now."""
    for forged in (
        orjson.dumps({"endpoint": "e", "state": "open", "failure_source": "s" * 10_000}),
        orjson.dumps({"endpoint": "e", "state": "open", "failure_source": "cron"}),
        b"not json",
    ):
        long_lived, fresh = BreakerStates(CONFIG), BreakerStates(CONFIG)
        long_lived.apply(b"e", orjson.dumps({"endpoint": "e", "state": "open"}))
        assert long_lived.get("e") is not None
        long_lived.apply(b"e", forged)
        fresh.apply(b"e", forged)
        assert long_lived.get("e") is None and fresh.get("e") is None
        assert long_lived.worst(T0).state is State.CLOSED


class ChangelogEvent:
    """What faust's recovery hands a table: the decoded key and value, and the raw message."""

    def __init__(self, key: bytes, value: Any, raw: bytes | None = None) -> None:
        self.key, self.value = key, value
        raw = orjson.dumps(value) if raw is None and value is not None else raw
        self.message = type("Message", (), {"key": key, "value": raw, "partition": 0})()


def recovering_table() -> Any:
    """The table ``attach`` gives the worker's faust app (never started: nothing connects)."""
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1")
    app = faust.App(settings.breaker_app_id, broker="kafka://127.0.0.1:1", store="memory://")
    attach(app, settings)
    return app.tables[settings.breaker_table]


def test_recovery_keeps_only_what_the_writer_would() -> None:
    """faust's memory store loaded every key of the changelog (anyone's), each value whatever
    its size: a writer taking over held all of them.  Keys over ``MAX_KEY`` are skipped, a
    value over ``MAX_VALUE`` ends its key (the newest value, the one compaction keeps), and past
    ``MAX_ENDPOINTS`` the least recently written keys go, batch by batch."""
    table = recovering_table()
    state = {"endpoint": "real", "state": "open"}
    table.apply_changelog_batch([ChangelogEvent(b"real", state), ChangelogEvent(b"big", state)])
    huge = {"endpoint": "big", "last_error": "x" * 1_000_000}
    table.apply_changelog_batch(
        [ChangelogEvent(b"big", huge), ChangelogEvent(b"k" * (MAX_KEY + 1), state)]
    )
    assert dict(table) == {b"real": state}
    starts = range(0, 2 * MAX_ENDPOINTS, 32)
    for start in starts:  # batches, as faust's recovery applies them
        table.apply_changelog_batch(
            [
                ChangelogEvent(f"forged-{n}".encode(), {"endpoint": "f"})
                for n in range(start, start + 32)
            ]
            + [ChangelogEvent(b"real", state)] * (start % 320 == 0)
        )
        assert len(table) <= MAX_ENDPOINTS
    assert len(table) == MAX_ENDPOINTS and b"real" in table
    assert b"forged-0" not in table and f"forged-{starts[-1] + 31}".encode() in table
    table.apply_changelog_batch([ChangelogEvent(b"real", None)])  # a tombstone
    assert b"real" not in table and len(table) == MAX_ENDPOINTS - 1
    assert table.recovery_buffer_size <= 100  # each record buffered is held decoded till then


def test_a_worker_id_longer_than_its_reports_carry_is_refused_at_start() -> None:
    with pytest.raises(ValueError):
        Settings(worker_id="w" * 257)
    assert Settings(worker_id="w" * 256).worker_id == "w" * 256


def test_the_changelog_decodes_our_keys_as_they_are_written() -> None:
    """faust decodes the changelog's keys with the serializer of the table's ``key_type`` (json
    without one), not with its schema's: every key of ours ("host|unix://...") failed to
    decode, recovery waited for good for the record it lost, and a writer taking over a
    changelog never got ready."""
    table = recovering_table()
    message = Message(
        topic=table.changelog_topic.get_topic_name(),
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        headers=[],
        key=b"h|unix:///var/run/docker.sock",
        value=orjson.dumps({"endpoint": "h|unix:///var/run/docker.sock"}),
        checksum=None,
    )
    schema = table.changelog_topic.schema
    assert schema.loads_key(
        table.app, message, serializer=table.changelog_topic.key_serializer
    ) == (b"h|unix:///var/run/docker.sock")
    assert schema.loads_value(
        table.app, message, serializer=table.changelog_topic.value_serializer
    ) == {"endpoint": "h|unix:///var/run/docker.sock"}
