"""Record batches with a header key that is not UTF-8: parsed, not a poison pill.

The batches are built with aiokafka's own (pure-Python) batch builder, as a producer would send
them; the bad key is written through a ``str`` whose ``encode`` returns raw bytes, the one way
to make that builder write bytes that are not UTF-8.
"""

from __future__ import annotations

import pytest
from aiokafka.record.default_records import DefaultRecordBatch, _DefaultRecordBatchBuilderPy

from tako_stream.kafka.records import TolerantMemoryRecords

GZIP = 1


class RawKey(str):
    """A header key the builder writes as the given bytes."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawKey:
        key = super().__new__(cls, "raw")
        key.raw = raw
        return key

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


def batch(
    base: int, records: list[tuple[bytes, list[tuple[str, bytes | None]]]], compression: int = 0
) -> bytes:
    builder = _DefaultRecordBatchBuilderPy(
        magic=2,
        compression_type=compression,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for i, (value, headers) in enumerate(records):
        builder.append(i, timestamp=1_700_000_000_000, key=b"k", value=value, headers=headers)
    data = builder.build()
    data[0:8] = base.to_bytes(8, "big")  # the base offset, as the broker assigns it
    return bytes(data)


def read(data: bytes) -> list[tuple[int, bytes | None, list[tuple[str, bytes | None]]]]:
    records = TolerantMemoryRecords(data)
    out = []
    while records.has_next():
        parsed = records.next_batch()
        assert parsed.validate_crc()
        out += [(r.offset, r.value, list(r.headers)) for r in parsed]
    return out


def test_the_fast_parser_alone_refuses_a_bad_header_key() -> None:
    """What happens without this module: every fetch of the partition raises."""
    data = batch(0, [(b"v", [(RawKey(b"\xff\xfe"), b"x")])])
    with pytest.raises(UnicodeDecodeError):
        list(DefaultRecordBatch(data))


@pytest.mark.parametrize("compression", [0, GZIP])
def test_a_bad_header_key_is_decoded_with_replacement_and_nothing_is_lost(compression: int) -> None:
    data = (
        batch(0, [(b"before", [("x-correlation-id", b"c0")])], compression)
        + batch(
            1,
            [
                (b"good-in-same-batch", [("ok", b"1")]),
                (b"poison", [(RawKey(b"\xffbad"), b"v"), ("x-correlation-id", b"c1")]),
                (b"after-in-same-batch", []),
            ],
            compression,
        )
        + batch(4, [(b"after", [])], compression)
    )
    assert read(data) == [
        (0, b"before", [("x-correlation-id", b"c0")]),
        (1, b"good-in-same-batch", [("ok", b"1")]),
        (2, b"poison", [("\ufffdbad", b"v"), ("x-correlation-id", b"c1")]),
        (3, b"after-in-same-batch", []),
        (4, b"after", []),
    ]


def test_good_batches_parse_as_before_and_a_partial_batch_waits() -> None:
    whole = batch(7, [(b"a", [("h", None)]), (b"b", [])])
    assert read(whole) == [(7, b"a", [("h", None)]), (8, b"b", [])]
    # A fetch may end in the middle of a batch: that batch is left for the next fetch.
    records = TolerantMemoryRecords(whole + whole[:30])
    assert records.has_next()
    records.next_batch()
    assert not records.has_next() and records.next_batch() is None
    assert records.size_in_bytes() == len(whole) + 30


def test_a_corrupt_batch_is_still_refused() -> None:
    data = bytearray(batch(0, [(b"value", [])]))
    data[-1] ^= 0xFF  # flips a byte the CRC covers
    parsed = TolerantMemoryRecords(bytes(data)).next_batch()
    assert not parsed.validate_crc()  # aiokafka's fetcher raises CorruptRecordException on this
