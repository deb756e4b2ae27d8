"""The answered index reads a topic anyone may write to: what it cannot use, it skips."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from tako_stream.worker.answered import SOURCE_HEADER, answered_position


def record(key: bytes | None, headers: list[tuple[str, bytes]]) -> Any:
    return ConsumerRecord(
        topic="t.results",
        partition=0,
        offset=7,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=b"{}",
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=2,
        headers=headers,
    )


def test_a_result_names_its_request() -> None:
    found = answered_position(record(b"job-1", [(SOURCE_HEADER, b"t.requests:3:41")]))
    assert found == ("job-1", "t.requests:3:41")


@pytest.mark.parametrize(
    ("key", "headers"),
    [
        (None, [(SOURCE_HEADER, b"t.requests:3:41")]),  # no key
        (b"job-1", []),  # no position
        (b"job-1", [("other", b"x")]),
        (b"k" * 129, [(SOURCE_HEADER, b"t.requests:3:41")]),  # longer than any execution id
        (b"job-1", [(SOURCE_HEADER, b"p" * 301)]),  # longer than any position
    ],
)
def test_a_record_naming_nothing_usable_is_skipped(
    key: bytes | None, headers: list[tuple[str, bytes]]
) -> None:
    assert answered_position(record(key, headers)) is None


def test_bytes_that_are_not_utf8_are_replaced_not_raised_on() -> None:
    # Once a UnicodeDecodeError: the follower's task ended and took the worker down with it.
    found = answered_position(record(b"job-\xff", [(SOURCE_HEADER, b"\xff\xfe:0:1")]))
    assert found == ("job-\ufffd", "\ufffd\ufffd:0:1")
