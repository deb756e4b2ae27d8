"""The one keyed view every compacted topic is folded into: writes, tombstones, the bound."""

from __future__ import annotations

import orjson
import pytest

from tako_stream.core.models import CancelRequest
from tako_stream.kafka.view import KeyedView


def parse(raw: bytes) -> dict[str, object]:
    value = orjson.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


def test_latest_value_per_key_and_tombstones_delete() -> None:
    view: KeyedView[dict[str, object]] = KeyedView(parse)
    view.apply(b"a", b'{"n": 1}')
    view.apply(b"b", b'{"n": 2}')
    view.apply(b"a", b'{"n": 3}')
    assert view.get("a") == {"n": 3} and len(view) == 2
    assert view.apply(b"a", None) is None
    assert "a" not in view and view.get("a") is None and list(view) == ["b"]
    view.apply(b"missing", None)  # a tombstone for an unknown key is harmless
    assert len(view) == 1


def test_unreadable_records_and_keyless_records_are_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    view: KeyedView[dict[str, object]] = KeyedView(parse, name="test view")
    assert view.apply(b"a", b"[1, 2]") is None
    assert view.apply(None, b'{"n": 1}') is None
    assert len(view) == 0
    assert "test view: skipping an unreadable record" in caplog.text


def test_the_least_recently_written_key_is_forgotten_beyond_keep() -> None:
    view: KeyedView[dict[str, object]] = KeyedView(parse, keep=2)
    view.apply(b"a", b"{}")
    view.apply(b"b", b"{}")
    view.apply(b"a", b'{"again": true}')  # a rewrite makes "a" the newest
    view.apply(b"c", b"{}")
    assert list(view) == ["a", "c"]
    assert view.values() == [{"again": True}, {}]


def test_key_of_files_values_under_the_id_they_name() -> None:
    view: KeyedView[CancelRequest] = KeyedView(
        CancelRequest.model_validate_json, key_of=lambda r: r.execution_id
    )
    body = b'{"execution_id": "job-1", "requested_at": "2026-01-01T00:00:00Z"}'
    view.apply(None, body)
    view.apply(b"some-other-key", body)
    assert list(view) == ["job-1"]
    view.apply(b"job-1", None)
    assert len(view) == 0
