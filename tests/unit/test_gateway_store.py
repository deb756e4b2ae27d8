"""The gateway's store: topics folded into SQLite, point reads, paging, superseded states."""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from tako_stream.core.errors import ErrorType, Status
from tako_stream.core.models import (
    PAYLOAD_HEADER,
    DLQRecord,
    ErrorInfo,
    ExecutionResult,
    JobStatus,
    SourcePosition,
)
from tako_stream.gateway.store import Store, sortable
from tako_stream.kafka.codec import dumps
from tests.fakes import TOPICS

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OFFSETS: dict[tuple[str, int], int] = {}


def record(
    topic: str,
    key: str | None,
    value: bytes | None,
    *,
    partition: int = 0,
    headers: list[tuple[str, bytes]] | None = None,
) -> Any:
    offset = OFFSETS.get((topic, partition), 0)
    OFFSETS[(topic, partition)] = offset + 1
    return ConsumerRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=1_700_000_000_000,
        timestamp_type=0,
        key=key.encode() if key is not None else None,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=headers or [],
    )


def result(
    execution_id: str, seconds: float, status: Status = Status.SUCCEEDED, **more: Any
) -> bytes:
    return dumps(
        ExecutionResult(
            execution_id=execution_id,
            correlation_id="c",
            status=status,
            success=status is Status.SUCCEEDED,
            worker_id="w",
            finished_at=T0 + timedelta(seconds=seconds),
            **more,
        )
    )


def dead_letter(dlq_id: str, last_failure_at: datetime = T0) -> bytes:
    return dumps(
        DLQRecord(
            dlq_id=dlq_id,
            execution_id=dlq_id,
            correlation_id="c",
            error=ErrorInfo(type=ErrorType.INVALID_REQUEST, message="x"),
            attempts=1,
            first_failure_at=T0,
            last_failure_at=last_failure_at,
            worker_id="w",
            source=SourcePosition(topic=TOPICS.requests, partition=0, offset=0),
            original_value=None,
        )
    )


def running(execution_id: str) -> bytes:
    return dumps(JobStatus(execution_id=execution_id, worker_id="w1", correlation_id="c", at=T0))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    OFFSETS.clear()
    return Store(tmp_path / "state.sqlite3", cache_mb=4)


def test_a_job_moves_from_queued_to_running_to_done_and_never_back(store: Store) -> None:
    store.apply([record(TOPICS.requests, "j1", b'{"code": "print(1)"}')], TOPICS)
    job = store.job("j1")
    assert job.request is not None and job.running is None and job.result is None
    store.apply([record(TOPICS.status, "j1", running("j1"))], TOPICS)
    assert store.job("j1").running == ("w1", T0.isoformat().replace("+00:00", "Z"))
    store.apply([record(TOPICS.results, "j1", result("j1", 1))], TOPICS)
    assert store.job("j1").result is not None and store.job("j1").running is None
    # a late "running" (the status topic is another topic: no order with the results) is ignored
    store.apply([record(TOPICS.status, "j1", running("j1"))], TOPICS)
    assert store.job("j1").running is None and store.job("j1").result is not None


def test_unknown_ids_are_unknown_and_lookups_do_not_depend_on_the_partition(store: Store) -> None:
    store.apply([record(TOPICS.results, "far", result("far", 1), partition=7)], TOPICS)
    assert store.job("far").result is not None
    unknown = store.job("nope")
    assert unknown.result is None and unknown.running is None and unknown.request is None


def test_executions_page_newest_first_with_filters(store: Store) -> None:
    records = []
    for n in range(10):  # failed: multiples of 3; job type "default": odd n
        fields: dict[str, Any] = {"job_type": "default" if n % 2 else "data-processing"}
        status = Status.SUCCEEDED
        if n % 3 == 0:
            status = Status.FAILED
            fields["error"] = ErrorInfo(type=ErrorType.DIVISION_ERROR, message="x")
        records.append(record(TOPICS.results, f"e{n}", result(f"e{n}", n, status, **fields)))
    # a rejected job is one of Tako VM's failed ones; a pinned job type filters by its name
    records.append(record(TOPICS.results, "r", result("r", 4.5, Status.REJECTED)))
    records.append(
        record(TOPICS.results, "p", result("p", 0.5, job_type="default@1")),
    )
    records.append(record(TOPICS.requests, "e9", b'{"code": "1"}'))
    store.apply(records, TOPICS)

    def page(**query: Any) -> tuple[int, list[str], list[int | None]]:
        total, rowids = store.execution_rows(**query)
        rows = [row for row in store.result_bodies(rowids, budget=1 << 30) if row is not None]
        ids = [orjson.loads(body)["execution_id"] for body, _ in rows]
        return total, ids, [produced for _, produced in rows]

    total, ids, produced = page(limit=3, offset=0, status=None, job_type=None)
    assert total == 12 and ids == ["e9", "e8", "e7"]
    assert produced[0] == 1_700_000_000_000 and produced[1] is None  # e9's request was read
    total, ids, _ = page(limit=2, offset=1, status="failed", job_type=None)
    assert total == 5 and ids == ["e6", "r"]
    total, ids, _ = page(limit=10, offset=0, status="succeeded", job_type="default")
    assert total == 4 and ids == ["e7", "e5", "e1", "p"]
    total, ids, _ = page(limit=10, offset=0, status=None, job_type="default@1")
    assert total == 6  # the name is what a job type filter compares


def test_a_page_is_cut_in_one_order_ties_in_time_included(store: Store) -> None:
    # Results finished at the same moment come in the order they were stored, with or without
    # a filter that has SQLite sort (failed: two statuses, read one after the other), so pages
    # cut at any offset never repeat or miss one.
    statuses = (Status.FAILED, Status.REJECTED)
    store.apply(
        [record(TOPICS.results, f"t{n}", result(f"t{n}", 1, statuses[n % 2])) for n in range(7)],
        TOPICS,
    )
    for status in (None, "failed"):
        _, everything = store.execution_rows(limit=10, offset=0, status=status, job_type=None)
        assert everything == sorted(everything) and len(everything) == 7
        pages = [
            store.execution_rows(limit=2, offset=at, status=status, job_type=None)[1]
            for at in range(0, 7, 2)
        ]
        assert [rowid for p in pages for rowid in p] == everything


def test_bodies_are_read_up_to_a_budget_and_at_least_one(store: Store) -> None:
    store.apply(
        [record(TOPICS.results, f"b{n}", result(f"b{n}", n, stdout="x" * 1000)) for n in range(5)],
        TOPICS,
    )
    _, rowids = store.execution_rows(limit=5, offset=0, status=None, job_type=None)
    size = len(store.result_bodies(rowids[:1], budget=1 << 30)[0][0])  # type: ignore[index]
    assert len(store.result_bodies(rowids, budget=1)) == 1  # a value past the budget: alone
    assert len(store.result_bodies(rowids, budget=2 * size)) == 2
    assert len(store.result_bodies(rowids, budget=2 * size + 1)) == 3
    assert len(store.result_bodies(rowids, budget=1 << 30)) == 5
    # A row gone since the page was picked: None, in its place.
    store.apply([record(TOPICS.results, "b3", None)], TOPICS)
    rows = store.result_bodies(rowids, budget=1 << 30)
    assert [row is None for row in rows] == [False, True, False, False, False]


def test_dead_letters_are_paged_oldest_first_by_row_id(store: Store) -> None:
    store.apply(
        [
            record(TOPICS.dlq, f"d{n}", dead_letter(f"d{n}", T0 + timedelta(seconds=5 - n)))
            for n in range(5)
        ],
        TOPICS,
    )
    total, rowids = store.dead_letter_rows(
        error_type=None, since=sortable(T0 + timedelta(seconds=2)), until=None, limit=2, offset=1
    )
    summaries = store.dead_letter_summaries(rowids, budget=1 << 30)
    ids = [orjson.loads(s)["dlq_id"] for s in summaries if s is not None]
    assert total == 4 and ids == ["d2", "d1"]  # d3 (2 s) is the oldest of the four: skipped
    assert len(store.dead_letter_summaries(rowids, budget=1)) == 1


def test_the_first_request_for_an_id_is_the_one_that_counts(store: Store) -> None:
    first = [(PAYLOAD_HEADER, b"digest-a")]
    second = [(PAYLOAD_HEADER, b"digest-b")]
    store.apply(
        [
            record(TOPICS.requests, "k", b'{"code": "1"}', headers=first),
            record(TOPICS.requests, "k", b'{"code": "2"}', headers=second),
        ],
        TOPICS,
    )
    request = store.request("k")
    assert request is not None and request.digest == "digest-a" and request.offset == 0


def test_positions_are_saved_with_the_batch(store: Store, tmp_path: Path) -> None:
    store.apply([record(TOPICS.results, f"p{n}", result(f"p{n}", n)) for n in range(5)], TOPICS)
    again = Store(tmp_path / "state.sqlite3", cache_mb=4)  # a restart
    assert again.positions() == {(TOPICS.results, 0): 5}
    assert again.known() == 5


def test_a_tombstone_deletes_and_noise_is_skipped(store: Store) -> None:
    store.apply(
        [
            record(TOPICS.results, "gone", result("gone", 1)),
            record(TOPICS.results, "gone", None),
            record(TOPICS.results, "junk", b"not json"),
            record(TOPICS.results, None, result("keyless", 1)),
        ],
        TOPICS,
    )
    assert store.known() == 0


@pytest.mark.parametrize(
    "poison",
    [
        b'{"status": "x", "finished_at": null}',
        b'{"status": "x", "finished_at": 1700000000}',
        # a valid time with an offset whose UTC is past year 9999: converting it overflows
        b'{"status": "x", "finished_at": "9999-12-31T23:59:59-01:00"}',
    ],
)
def test_a_result_the_store_cannot_use_is_skipped_and_the_batch_applied(
    store: Store, poison: bytes
) -> None:
    # anyone may write to the results topic: one such record once ended the store's reader
    store.apply(
        [
            record(TOPICS.results, "before", result("before", 1)),
            record(TOPICS.results, "poison", poison),
            record(TOPICS.results, "after", result("after", 2)),
        ],
        TOPICS,
    )
    assert store.job("before").result is not None and store.job("after").result is not None
    assert store.job("poison").result is None and store.known() == 2
    assert store.skipped == {"results": 1}
    assert store.positions() == {(TOPICS.results, 0): 3}  # read past it: not read again


def test_a_dead_letter_the_store_cannot_use_is_skipped_and_the_batch_applied(
    store: Store,
) -> None:
    # a valid DLQ record (its model accepts year 1) whose time in UTC is before year 1
    year_one = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    poison = dead_letter("poison", last_failure_at=year_one)
    assert b'"last_failure_at":"0001-01-01T00:00:00+01:00"' in poison
    store.apply(
        [
            record(TOPICS.dlq, "before", dead_letter("before")),
            record(TOPICS.dlq, "poison", poison),
            record(TOPICS.dlq, "after", dead_letter("after")),
        ],
        TOPICS,
    )
    assert store.dead_letter("before") is not None and store.dead_letter("after") is not None
    assert store.dead_letter("poison") is None and store.dead_letter_total() == 2
    assert store.skipped == {"dead letters": 1}


def test_skipped_records_are_logged_once_per_kind(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    poison = b'{"status": "x", "finished_at": null}'
    year_one = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    with caplog.at_level(logging.WARNING, logger="tako_stream.gateway.store"):
        for batch in range(3):
            store.apply(
                [
                    record(TOPICS.results, f"r{batch}", poison),
                    record(TOPICS.results, f"s{batch}", b"not json"),
                    record(TOPICS.dlq, f"d{batch}", dead_letter(f"d{batch}", year_one)),
                ],
                TOPICS,
            )
    assert store.skipped == {"results": 6, "dead letters": 3}
    assert len(caplog.records) == 2, caplog.text  # one line per kind, not one per record


def test_times_sort_as_times() -> None:
    assert sortable("2026-01-01T00:00:00Z") < sortable("2026-01-01T00:00:00.5Z")
    assert sortable("2026-01-01T00:00:00.5Z") < sortable("2026-01-01T00:00:01Z")
    assert sortable(T0) == "2026-01-01T00:00:00.000000Z"


def test_queue_positions_count_waiting_jobs_ahead_in_the_partition(store: Store) -> None:
    requests = [record(TOPICS.requests, f"q{n}", b'{"code": "print(1)"}') for n in range(4)]
    other = record(TOPICS.requests, "elsewhere", b'{"code": "print(1)"}', partition=1)
    store.apply([*requests, other], TOPICS)
    assert [store.queue_position(f"q{n}") for n in range(4)] == [1, 2, 3, 4]
    assert store.queue_position("elsewhere") == 1  # its own partition's order
    assert store.queue_counts() == (5, 0)
    # q0 runs, q1 is answered: q2 and q3 move up; neither counts as waiting any more
    store.apply(
        [record(TOPICS.status, "q0", running("q0")), record(TOPICS.results, "q1", result("q1", 1))],
        TOPICS,
    )
    assert store.queue_position("q0") is None and store.queue_position("q1") is None
    assert [store.queue_position(f"q{n}") for n in (2, 3)] == [1, 2]
    assert store.queue_counts() == (3, 1)
    assert store.queue_position("never-seen") is None


def test_a_result_read_before_its_request_leaves_nothing_waiting(store: Store) -> None:
    # separate topics: the result may be read first
    store.apply([record(TOPICS.results, "r1", result("r1", 1))], TOPICS)
    store.apply([record(TOPICS.requests, "r1", b'{"code": "print(1)"}')], TOPICS)
    assert store.queue_position("r1") is None and store.queue_counts() == (0, 0)
    # a repeat of a request (an idempotent resubmit) is not a second waiting job
    store.apply([record(TOPICS.requests, "r2", b'{"code": "print(1)"}')], TOPICS)
    store.apply([record(TOPICS.requests, "r2", b'{"code": "print(1)"}')], TOPICS)
    assert store.queue_counts() == (1, 0)


def test_a_store_of_another_schema_version_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE results (execution_id TEXT PRIMARY KEY, body BLOB)")
    old.execute("INSERT INTO results VALUES ('x', 'y')")
    old.execute("CREATE TABLE positions (topic TEXT, partition INTEGER, next_offset INTEGER)")
    old.execute("INSERT INTO positions VALUES ('t', 0, 99)")
    old.commit()
    old.close()
    store = Store(path, cache_mb=4)
    assert store.positions() == {} and store.known() == 0  # read from the topics again
    store.apply([record(TOPICS.results, "j", result("j", 1))], TOPICS)
    assert store.known() == 1
    assert Store(path, cache_mb=4).known() == 1  # the same version is kept
    # A store with AUTOINCREMENT tables (SQLite's own sqlite_sequence, which may not be
    # dropped) of another version is rebuilt too.
    other = sqlite3.connect(path)
    other.execute("PRAGMA user_version = 3")
    other.close()
    assert Store(path, cache_mb=4).known() == 0


def served(store: Store, rowids: list[int]) -> list[tuple[str, str] | None]:
    """(execution id, status) of each picked row as a page reads it later (None: gone)."""
    rows = store.result_bodies(rowids, budget=1 << 30)
    return [
        (orjson.loads(row[0])["execution_id"], orjson.loads(row[0])["status"]) if row else None
        for row in rows
    ]


def test_a_picked_row_id_never_names_another_row_later(store: Store) -> None:
    # A page picks its row ids, then reads their bodies (a streamed one, maybe minutes later).
    # SQLite gave the highest row id again once its row was deleted (anyone may write a
    # tombstone), or replaced (a later result for the same id), and every id from 1 after a
    # reset: the page then served a row its filter left out.
    for n in range(3):
        store.apply([record(TOPICS.results, f"f{n}", result(f"f{n}", n, Status.FAILED))], TOPICS)
    _, rowids = store.execution_rows(limit=10, offset=0, status="failed", job_type=None)
    assert served(store, rowids) == [("f2", "failed"), ("f1", "failed"), ("f0", "failed")]
    store.apply([record(TOPICS.results, "f2", None)], TOPICS)  # the newest deleted
    store.apply([record(TOPICS.results, "s9", result("s9", 9))], TOPICS)  # another job ends
    assert served(store, rowids) == [None, ("f1", "failed"), ("f0", "failed")]
    # The newest replaced by a later result for its id, which does not match the filter.
    _, rowids = store.execution_rows(limit=10, offset=0, status="failed", job_type=None)
    store.apply([record(TOPICS.results, "f1", result("f1", 1))], TOPICS)
    assert served(store, rowids) == [None, ("f0", "failed")]
    # Everything forgotten (the topics were recreated) and read again.
    _, rowids = store.execution_rows(limit=10, offset=0, status="failed", job_type=None)
    store.reset()
    for n in range(3):
        store.apply([record(TOPICS.results, f"s{n}", result(f"s{n}", n))], TOPICS)
    assert served(store, rowids) == [None]


def test_a_picked_dead_letter_row_id_never_names_another_entry_later(store: Store) -> None:
    # As for results: ``dlq delete`` writes tombstones, and a page may be filtered by type.
    store.apply([record(TOPICS.dlq, "d0", dead_letter("d0"))], TOPICS)
    store.apply([record(TOPICS.dlq, "d1", dead_letter("d1", T0 + timedelta(seconds=1)))], TOPICS)
    _, rowids = store.dead_letter_rows(
        error_type="invalid_request", since=None, until=None, limit=10
    )
    assert len(rowids) == 2
    store.apply([record(TOPICS.dlq, "d1", None)], TOPICS)
    store.apply([record(TOPICS.dlq, "other", dead_letter("other"))], TOPICS)
    summaries = store.dead_letter_summaries(rowids, budget=1 << 30)
    assert [orjson.loads(s)["dlq_id"] if s else None for s in summaries] == ["d0", None]
    store.reset()
    store.apply([record(TOPICS.dlq, "again", dead_letter("again"))], TOPICS)
    assert store.dead_letter_summaries(rowids, budget=1 << 30) == [None, None]
