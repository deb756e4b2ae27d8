"""DLQ records keep the original message byte for byte and mirror their main fields in headers."""

from __future__ import annotations

import argparse
import base64
import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from tako_stream import cli, dlq
from tako_stream.core.errors import ErrorType, Status
from tako_stream.core.models import (
    CORRELATION_HEADER,
    DLQRecord,
    ErrorInfo,
    ExecutionResult,
    SourcePosition,
)
from tako_stream.kafka.message import Incoming
from tako_stream.settings import Settings

T0 = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = datetime(2024, 1, 2, 3, 4, 9, tzinfo=UTC)
SOURCE = SourcePosition(topic="tako.requests", partition=3, offset=1234, timestamp_ms=1700000000000)
ERROR = ErrorInfo(type=ErrorType.INVALID_REQUEST, message="code: Field required")


def build(
    key: bytes | None = b"job-1",
    value: bytes | None = b'{"nope": 1}',
    headers: list[tuple[str, bytes]] | None = None,
    source: SourcePosition = SOURCE,
    error: ErrorInfo = ERROR,
) -> tuple[DLQRecord, bytes, list[tuple[str, bytes]]]:
    message = Incoming(
        topic=source.topic,
        partition=source.partition,
        offset=source.offset,
        key=key,
        value=value,
        headers=tuple(headers or ()),
        timestamp_ms=source.timestamp_ms,
    )
    result = ExecutionResult(
        execution_id="job-1",
        correlation_id="corr-9",
        status=Status.REJECTED,
        success=False,
        error=error,
        attempts=2,
        worker_id="worker-a",
        finished_at=T1,
    )
    dead = dlq.dead_letter(message, result, first_failure_at=T0)
    return dead.record, dead.value, dead.headers


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def test_original_message_is_kept_byte_exact() -> None:
    key = b"\x00\xffkey\x80"
    value = b"\xff\xfe not json \x00 at all"
    headers = [
        ("x-correlation-id", b"corr-9"),
        ("bin", b"\x00\x01\xff"),
        ("dup", b"1"),
        ("dup", b"2"),
    ]
    record, _, _ = build(key=key, value=value, headers=headers)
    assert record.original_key is not None and unb64(record.original_key) == key
    assert unb64(record.original_value) == value
    assert [(k, unb64(v)) for k, v in record.original_headers] == headers


@settings(max_examples=200, deadline=None)
@given(
    st.binary() | st.none(),
    st.binary(),
    st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=50)), max_size=5),
)
def test_round_trip_through_the_encoded_value(
    key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
) -> None:
    _, encoded, _ = build(key=key, value=value, headers=headers)
    decoded = DLQRecord.model_validate_json(encoded)
    assert (unb64(decoded.original_key) if decoded.original_key is not None else None) == key
    assert unb64(decoded.original_value) == value
    assert [(k, unb64(v)) for k, v in decoded.original_headers] == headers


def test_missing_key_and_value() -> None:
    record, _, _ = build(key=None, value=None)
    assert record.original_key is None
    assert record.original_value is None  # a null value stays null, not ""
    assert record.original_headers == []
    assert dlq.replay_message(record)[1] is None


def test_empty_key_is_not_missing() -> None:
    record, _, _ = build(key=b"")
    assert record.original_key == ""


def test_record_fields_and_encoding() -> None:
    record, encoded, _ = build()
    assert record.execution_id == "job-1"
    assert record.correlation_id == "corr-9"
    assert record.error == ERROR
    assert record.attempts == 2
    assert record.first_failure_at == T0 and record.last_failure_at == T1
    assert record.worker_id == "worker-a"
    assert record.source == SOURCE
    assert orjson.loads(encoded) == record.model_dump(mode="json")
    assert DLQRecord.model_validate_json(encoded) == record


def test_dlq_id_is_stable_for_the_same_source() -> None:
    first, _, _ = build()
    again, _, _ = build(value=b"other", error=ErrorInfo(type=ErrorType.INTERNAL_ERROR, message="x"))
    assert first.dlq_id == again.dlq_id == dlq.dlq_id(SOURCE)
    same_position = SourcePosition(topic="tako.requests", partition=3, offset=1234)
    assert dlq.dlq_id(same_position) == first.dlq_id


@pytest.mark.parametrize(
    "other",
    [
        SourcePosition(topic="tako.requests", partition=3, offset=1235),
        SourcePosition(topic="tako.requests", partition=4, offset=1234),
        SourcePosition(topic="other", partition=3, offset=1234),
    ],
)
def test_dlq_id_differs_for_other_sources(other: SourcePosition) -> None:
    assert dlq.dlq_id(other) != dlq.dlq_id(SOURCE)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, 0),
        ([], 0),
        ([("x-tako-replay-count", b"3")], 3),
        ([("X-Tako-Replay-Count", b"5")], 5),
        ([("x-tako-replay-count", b"1"), ("x-tako-replay-count", b"2")], 2),
        ([("x-tako-replay-count", b" 7 ")], 7),
        ([("x-tako-replay-count", b"garbage")], 0),
        ([("x-tako-replay-count", b"")], 0),
        ([("x-tako-replay-count", b"-4")], 0),
        ([("x-tako-replay-count", b"2.5")], 0),
        ([("x-tako-replay-count", b"\xff\xfe")], 0),
        ([("x-tako-replay-count", b"9" * 5000)], 0),
        # Digits only, at most ten: once turned into any int, and past 64 bits the record
        # could not be encoded (TypeError), so the request was never dead-lettered.
        ([("x-tako-replay-count", b"9" * 10)], 9_999_999_999),
        ([("x-tako-replay-count", b"9" * 11)], 0),
        ([("x-tako-replay-count", b"1" * 4000)], 0),
        ([("x-tako-replay-count", b"+5")], 0),
        ([("x-tako-replay-count", b"1_000")], 0),
        ([("x-tako-replay-count", "\u0663".encode())], 0),  # ARABIC-INDIC DIGIT THREE
    ],
)
def test_replay_count(headers: list[tuple[str, bytes]] | None, expected: int) -> None:
    assert dlq.replay_count(headers) == expected
    record, _, mirrored = build(headers=headers)
    assert record.replay_count == expected
    assert dict(mirrored)[dlq.REPLAY_COUNT_HEADER] == str(expected).encode()


def test_mirrored_headers() -> None:
    record, _, mirrored = build(headers=[("x-tako-replay-count", b"1")])
    as_dict = dict(mirrored)
    assert len(as_dict) == len(mirrored)  # each header once
    assert as_dict == {
        CORRELATION_HEADER: b"corr-9",
        dlq.H_DLQ_ID: record.dlq_id.encode(),
        dlq.H_EXECUTION_ID: b"job-1",
        dlq.H_ERROR_TYPE: b"invalid_request",
        dlq.H_ERROR_MESSAGE: b"code: Field required",
        dlq.H_ORIGINAL_TOPIC: b"tako.requests",
        dlq.H_ORIGINAL_PARTITION: b"3",
        dlq.H_ORIGINAL_OFFSET: b"1234",
        dlq.H_ATTEMPTS: b"2",
        dlq.H_WORKER: b"worker-a",
        dlq.REPLAY_COUNT_HEADER: b"1",
    }
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in mirrored)


def test_mirrored_error_message_is_capped_and_utf8() -> None:
    error = ErrorInfo(type=ErrorType.INTERNAL_ERROR, message="é" * 2000)
    _, _, mirrored = build(error=error)
    message = dict(mirrored)[dlq.H_ERROR_MESSAGE]
    assert message.decode("utf-8") == "é" * 1000


def test_dead_letter_types() -> None:
    assert {
        ErrorType.INVALID_REQUEST,
        ErrorType.INTERNAL_ERROR,
        ErrorType.SERVICE_UNAVAILABLE,
        ErrorType.DOCKER_ERROR,  # a job type's missing image: ours, as internal_error was
    } == dlq.DEAD_LETTER_TYPES


def test_an_original_too_large_for_a_record_is_truncated_and_not_replayed() -> None:
    value = b"c" * (dlq.MAX_ORIGINAL_BYTES + 1000)
    record, encoded, _ = build(value=value, headers=[("h", b"v")])
    assert record.original_truncated and record.original_size == len(value) + 2 + len(b"job-1")
    assert record.original_value is not None
    assert unb64(record.original_value) == value[: dlq.MAX_ORIGINAL_BYTES]
    assert record.original_headers == []
    assert len(encoded) < 8 * 1024 * 1024 - 64 * 1024
    reason = dlq.refusal(record, max_replays=3, requests_topic="tako.requests")
    assert reason is not None and "tako.requests[3]@1234" in reason


def test_huge_headers_or_key_truncate_too() -> None:
    record, _, _ = build(headers=[("h", b"x" * (dlq.MAX_ORIGINAL_HEADERS + 1))])
    assert record.original_truncated and record.original_headers == []
    record, _, _ = build(key=b"k" * (dlq.MAX_ORIGINAL_KEY + 1))
    assert record.original_truncated
    assert record.original_key is not None
    assert len(unb64(record.original_key)) == dlq.MAX_ORIGINAL_KEY


def test_summaries_leave_the_original_out_and_are_not_replayed() -> None:
    record, encoded, _ = build(value=b"v" * 100_000, headers=[("h", b"v")])
    full, summary = dlq.DLQStore(), dlq.DLQStore(keep_originals=False)
    for store in (full, summary):
        store.apply(record.dlq_id.encode(), encoded)
    kept = summary.get(record.dlq_id)
    assert kept.original_omitted and kept.original_value is None and kept.original_headers == []
    assert kept.original_size == record.original_size and kept.error == record.error
    assert full.get(record.dlq_id) == record
    assert dlq.refusal(record, max_replays=3, requests_topic="tako.requests") is None
    assert dlq.refusal(kept, max_replays=3, requests_topic="tako.requests") is not None
    assert (
        dlq.refusal(
            record.model_copy(update={"replay_count": 3}),
            max_replays=3,
            requests_topic="tako.requests",
        )
        is not None
    )


def written_at(offset: int, last_failure_at: str) -> tuple[bytes, bytes]:
    """An entry whose times are written as a producer other than ours might write them."""
    record, _ = entry(offset)
    body = record.model_dump(mode="json")
    body["first_failure_at"] = body["last_failure_at"] = last_failure_at
    return record.dlq_id.encode(), orjson.dumps(body)


@pytest.mark.parametrize("keep_originals", [True, False])
def test_a_record_without_a_time_zone_is_listed_as_utc_among_the_others(
    keep_originals: bool,
) -> None:
    """``select`` sorts by ``last_failure_at`` and compares it with ``--since``/``--until``: a
    record without a zone once raised TypeError there (naive against aware), so no entry could
    be listed, replayed or deleted."""
    store = dlq.DLQStore(keep_originals=keep_originals)
    for n, moment in enumerate(
        ["2024-01-02T03:04:09Z", "2024-01-02T03:04:07", "2024-01-02T05:04:08+02:00"]
    ):
        store.apply(*written_at(n, moment))
    assert [r.source.offset for r in store.select()] == [1, 2, 0]
    middle = datetime(2024, 1, 2, 3, 4, 7, 500_000, tzinfo=UTC)
    assert [r.source.offset for r in store.select(since=middle)] == [2, 0]
    assert [r.source.offset for r in store.select(until=middle)] == [1]
    naive = store.get(entry(1)[0].dlq_id)
    assert naive is not None and naive.last_failure_at == datetime(2024, 1, 2, 3, 4, 7, tzinfo=UTC)
    assert naive.first_failure_at.tzinfo is not None


# --- The bounded view workers and gateways keep ----------------------------------------------


def consumed(key: str, value: bytes | None, headers: list[tuple[str, bytes]] | None = None) -> Any:
    return ConsumerRecord(
        topic="tako.dlq",
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=key.encode(),
        value=value,
        checksum=None,
        serialized_key_size=len(key),
        serialized_value_size=len(value or b""),
        headers=headers or [],
    )


def entry(offset: int, error: ErrorInfo = ERROR) -> tuple[DLQRecord, bytes]:
    record, encoded, _ = build(source=SOURCE.model_copy(update={"offset": offset}), error=error)
    return record, encoded


def test_view_counts_by_type_and_keeps_only_a_window() -> None:
    view = dlq.DLQView(keep=3)
    unavailable = ErrorInfo(type=ErrorType.SERVICE_UNAVAILABLE, message="down")
    for n in range(10):
        record, encoded = entry(n, ERROR if n % 2 else unavailable)
        view.apply(consumed(record.dlq_id, encoded))
    assert view.stats() == {
        "total": 10,
        "by_error_type": {"invalid_request": 5, "service_unavailable": 5},
    }
    newest, _ = entry(9)
    oldest, _ = entry(0)
    kept = view.get(newest.dlq_id)
    assert kept is not None and kept.original_omitted and kept.original_value is None
    assert view.get(oldest.dlq_id) is None  # beyond the window: read from the topic


def test_view_tombstones_decrement_by_the_type_they_name() -> None:
    view = dlq.DLQView(keep=1)
    first, first_value = entry(1)
    second, second_value = entry(2)
    view.apply(consumed(first.dlq_id, first_value))
    view.apply(consumed(second.dlq_id, second_value))  # pushes the first out of the window
    view.apply(consumed(first.dlq_id, None, dlq.tombstone_headers(first)))
    assert view.stats() == {"total": 1, "by_error_type": {"invalid_request": 1}}
    view.apply(consumed(second.dlq_id, None))  # in the window: its type is known without header
    assert view.stats() == {"total": 0, "by_error_type": {}}
    view.apply(consumed("unknown", None))  # a stray tombstone changes nothing
    assert len(view) == 0


def test_a_tombstone_for_an_entry_never_counted_changes_no_count() -> None:
    """On a compacted DLQ topic a deleted entry's record goes long before its tombstone: a
    view reading the topic then meets tombstones for entries it never counted (as it does for
    an entry deleted twice, or a made-up one).  Each took one off the type its header named,
    so the counts went low, hiding entries that are there."""
    view = dlq.DLQView()
    kept = [entry(n)[0] for n in range(3)]
    for n, record in enumerate(kept):
        view.apply(consumed(record.dlq_id, entry(n)[1]))
    compacted, _ = entry(99)  # its record compacted away: only its tombstone is left
    view.apply(consumed(compacted.dlq_id, None, dlq.tombstone_headers(compacted)))
    assert view.stats() == {"total": 3, "by_error_type": {"invalid_request": 3}}
    view.apply(consumed(kept[0].dlq_id, None, dlq.tombstone_headers(kept[0])))
    view.apply(consumed(kept[0].dlq_id, None, dlq.tombstone_headers(kept[0])))  # deleted twice
    assert view.stats() == {"total": 2, "by_error_type": {"invalid_request": 2}}


def test_past_track_ids_a_tombstone_takes_off_only_a_type_with_entries_let_go() -> None:
    """The ids remembered are bounded (``track``): past it the oldest are let go, still
    counted, and a tombstone for an id not remembered takes one off its header's type only
    while that type has entries let go."""
    view = dlq.DLQView(keep=1, track=2)
    unavailable = ErrorInfo(type=ErrorType.SERVICE_UNAVAILABLE, message="down")
    old, old_value = entry(1)
    view.apply(consumed(old.dlq_id, old_value))
    for n in (2, 3):
        record, value = entry(n, unavailable)
        view.apply(consumed(record.dlq_id, value))
    assert view.tracked == 2  # the first id let go; its entry still counted
    assert view.stats()["by_error_type"] == {"invalid_request": 1, "service_unavailable": 2}
    stray, _ = entry(50, unavailable)  # no service_unavailable entry was let go
    view.apply(consumed(stray.dlq_id, None, dlq.tombstone_headers(stray)))
    assert view.stats()["total"] == 3
    view.apply(consumed(old.dlq_id, None, dlq.tombstone_headers(old)))
    assert view.stats()["by_error_type"] == {"service_unavailable": 2}
    again, _ = entry(51)  # none let go is left to take off
    view.apply(consumed(again.dlq_id, None, dlq.tombstone_headers(again)))
    assert view.stats()["by_error_type"] == {"service_unavailable": 2}


def test_an_entry_read_again_is_counted_once_beyond_the_summary_window() -> None:
    """A read started over (a broker fault) hands the view every record again."""
    view = dlq.DLQView(keep=2)
    records = [entry(n) for n in range(5)]
    for _ in range(2):
        for record, value in records:
            view.apply(consumed(record.dlq_id, value))
    assert view.stats()["total"] == 5


def test_view_counts_an_entry_written_twice_once_while_in_the_window() -> None:
    view = dlq.DLQView()
    record, encoded = entry(7)
    view.apply(consumed(record.dlq_id, encoded))
    view.apply(consumed(record.dlq_id, encoded))
    assert view.stats()["total"] == 1
    view.apply(consumed(record.dlq_id, b"not json"))  # unreadable: the entry is gone
    assert view.stats()["total"] == 0


def test_view_keeps_a_small_record_with_its_type_header_as_read_and_summarises_on_demand() -> None:
    # what a worker dead-letters: headers mirror the record (the error type among them)
    view = dlq.DLQView()
    record, encoded, headers = build(source=SOURCE.model_copy(update={"offset": 41}))
    view.apply(consumed(record.dlq_id, encoded, headers))
    assert view.stats() == {"total": 1, "by_error_type": {"invalid_request": 1}}
    kept = view.get(record.dlq_id)
    assert kept is not None and kept.original_omitted and kept.original_value is None
    assert (
        kept.model_copy(
            update={
                "original_omitted": False,
                "original_value": record.original_value,
                "original_key": record.original_key,
                "original_headers": record.original_headers,
            }
        )
        == record
    )


def test_view_summarises_a_large_record_on_arrival_and_answers_none_for_an_unreadable_one() -> None:
    view = dlq.DLQView()
    big, big_value, big_headers = build(
        value=b"x" * 10_000, source=SOURCE.model_copy(update={"offset": 42})
    )
    view.apply(consumed(big.dlq_id, big_value, big_headers))
    kept = view.get(big.dlq_id)
    assert kept is not None and kept.original_omitted
    # a foreign record claiming our header but not a DLQ record: counted by its header, never
    # served as an entry
    view.apply(consumed("forged", b"not json", dlq.tombstone_headers(big)[:1]))
    assert view.stats()["total"] == 2
    assert view.get("forged") is None


def test_an_entry_overwritten_unreadably_is_no_longer_counted() -> None:
    """An entry whose key was written again with a value no summary can be made of stayed
    counted, and listed as its old summary; a view started after compaction (which keeps only
    the newest value) counts nothing for it.  Both agree now, for a large and a small value."""
    for n, junk in enumerate((b"not a DLQ record" * 400, b"not a DLQ record")):
        record, value = entry(n)
        long_lived, fresh = dlq.DLQView(), dlq.DLQView()
        long_lived.apply(consumed(record.dlq_id, value))
        assert len(long_lived) == 1 and long_lived.get(record.dlq_id) is not None
        long_lived.apply(consumed(record.dlq_id, junk))
        fresh.apply(consumed(record.dlq_id, junk))
        assert len(long_lived) == len(fresh) == 0, (len(long_lived), len(fresh))
        assert long_lived.get(record.dlq_id) is None and long_lived.tracked == 0
        long_lived.apply(consumed(record.dlq_id, value))  # written once more: counted again
        assert long_lived.stats() == {"total": 1, "by_error_type": {"invalid_request": 1}}


def test_a_record_with_numbers_past_64_bits_is_skipped_not_raised() -> None:
    """The DLQ topic is anyone's, and a view re-encodes what it reads (the summary): a number
    orjson cannot write once raised TypeError out of the view, ending the worker's DLQ follower
    and the worker with it, again on every restart."""
    record, _ = entry(5)
    body = record.model_dump(mode="json")
    body["replay_count"] = 10**30
    huge = json.dumps(body).encode()  # json: orjson refuses to write it
    view = dlq.DLQView()
    view.apply(consumed("no-header", huge))  # summarised on arrival
    view.apply(consumed("typed", huge, dlq.tombstone_headers(record)[:1]))  # when asked
    assert view.get("no-header") is None and view.get("typed") is None
    store = dlq.DLQStore(keep_originals=False)
    store.apply(b"no-header", huge)
    assert len(store) == 0


def test_an_entry_from_another_topic_is_not_replayed() -> None:
    # Anyone who can write the DLQ topic names the source: a replay would write their bytes to
    # the results, control or workers topic on the operator's behalf.
    record, _, _ = build()
    forged = record.model_copy(
        update={"source": record.source.model_copy(update={"topic": "tako.results"})}
    )
    reason = dlq.refusal(forged, max_replays=3, requests_topic="tako.requests")
    assert reason is not None and "'tako.results'" in reason


@pytest.mark.parametrize(
    "update",
    [
        {"original_value": "not base64!"},
        {"original_key": "abc"},  # bad padding
        {"original_headers": [("h", "%%%")]},
    ],
)
def test_an_entry_whose_bytes_do_not_decode_is_refused_not_half_replayed(
    update: dict[str, object],
) -> None:
    record, _, _ = build(headers=[("h", b"v")])
    broken = record.model_copy(update=update)
    reason = dlq.refusal(broken, max_replays=3, requests_topic="tako.requests")
    assert reason is not None and "base64" in reason


@pytest.mark.parametrize("as_json", [True, False])
async def test_dlq_list_skips_a_record_no_encoder_can_carry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    """``tako-stream dlq list`` reads the DLQ topic whole (originals kept, nothing re-encoded on
    the way) and prints each entry with orjson: another producer's record holding a number
    past 64 bits ended the command with a TypeError, listing nothing after it.  A correlation
    id longer than a request's is no record of ours either."""
    fine, fine_value = entry(1)
    store = dlq.DLQStore()
    store.apply(fine.dlq_id.encode(), fine_value)
    forged: list[tuple[str, Any]] = [
        ("replay_count", 10**30),
        ("attempts", 2**64),
        ("original_size", 10**30),
        ("source", {**SOURCE.model_dump(), "offset": 10**30}),
        ("correlation_id", "c" * 257),
    ]
    for n, (field, value) in enumerate(forged):
        body = {**orjson.loads(fine_value), "dlq_id": f"forged-{n}", field: value}
        store.apply(f"forged-{n}".encode(), json.dumps(body).encode())  # json: orjson refuses

    async def read_store(settings: Settings) -> dlq.DLQStore:
        return store

    monkeypatch.setattr(dlq, "read_store", read_store)
    args = argparse.Namespace(json=as_json, error_type=None, since=None, until=None)
    assert await cli._dlq_list(Settings(), args) == cli.EXIT_OK
    out = capsys.readouterr().out.splitlines()
    if as_json:
        assert [orjson.loads(line)["dlq_id"] for line in out] == [fine.dlq_id]
    else:
        assert len(out) == 2 and out[1].startswith(fine.dlq_id)  # a header, then the entry
