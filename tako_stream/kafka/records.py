"""Kafka record batches that a bad header key cannot turn into a poison pill.

A record header's key is a UTF-8 string in Kafka's protocol, but brokers store whatever a
producer sends.  aiokafka decodes keys strictly, so one record whose header key is not UTF-8
makes every ``getmany`` on its partition raise ``UnicodeDecodeError``, for every consumer, for
as long as the record is retained: no record after it is ever delivered.  The Java client
decodes such keys with replacement characters and goes on; so do we.

``install()`` swaps the ``MemoryRecords`` aiokafka's fetcher builds for one that parses each
batch with aiokafka's fast parser and, only when that fails on a header key, parses
the same bytes again with the pure-Python parser, header keys decoded with U+FFFD for bad bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import aiokafka.consumer.fetcher as _fetcher
from aiokafka.record.default_records import DefaultRecordBatch, _DefaultRecordBatchPy
from aiokafka.record.legacy_records import LegacyRecordBatch

_LENGTH = struct.Struct(">i")
_LENGTH_OFFSET = 8  # base offset (int64), then the batch length (int32)
_LOG_OVERHEAD = 12
_MAGIC_OFFSET = 16  # ... then the partition leader epoch (int32), then the magic byte
_MIN_BATCH = _LOG_OVERHEAD + 14  # the smallest legacy record (v0)


class _Lenient(bytearray):
    """Bytes whose slices decode bad UTF-8 with replacement characters."""

    def __getitem__(self, index: Any) -> Any:
        item = bytearray.__getitem__(self, index)
        return _Lenient(item) if isinstance(index, slice) else item

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytearray.decode(self, encoding, "replace")


class _LenientBatch(_DefaultRecordBatchPy):  # type: ignore[misc]
    """aiokafka's pure-Python batch parser over ``_Lenient`` bytes (also after decompression)."""

    def __init__(self, buffer: memoryview) -> None:
        super().__init__(buffer)
        self._buffer: bytearray = _Lenient(self._buffer)

    def _maybe_uncompress(self) -> None:
        super()._maybe_uncompress()
        if not isinstance(self._buffer, _Lenient):
            self._buffer = _Lenient(self._buffer)


class _ParsedBatch:
    """A batch parsed up front: the fetcher reads its attributes, then iterates its records."""

    __slots__ = ("_batch", "_records")

    def __init__(self, batch: Any, records: list[Any]) -> None:
        self._batch = batch
        self._records = iter(records)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def validate_crc(self) -> bool:
        return True  # checked before parsing (the parser insists)

    def __iter__(self) -> Iterator[Any]:
        return self._records

    def __next__(self) -> Any:
        return next(self._records)


class TolerantMemoryRecords:
    """The record batches of one fetched partition (aiokafka's ``MemoryRecords`` interface)."""

    def __init__(self, data: bytes) -> None:
        self._buffer = data
        self._view = memoryview(data)
        self._pos = 0

    def size_in_bytes(self) -> int:
        return len(self._buffer)

    def has_next(self) -> bool:
        remaining = len(self._buffer) - self._pos
        if remaining < _LOG_OVERHEAD:
            return False
        length: int = _LENGTH.unpack_from(self._buffer, self._pos + _LENGTH_OFFSET)[0]
        return self._pos + _LOG_OVERHEAD + length <= len(self._buffer)

    def next_batch(self) -> Any:
        if not self.has_next():
            return None
        (length,) = _LENGTH.unpack_from(self._buffer, self._pos + _LENGTH_OFFSET)
        end = self._pos + _LOG_OVERHEAD + length
        raw = self._view[self._pos : end]
        self._pos = end
        if len(raw) < _MIN_BATCH:
            from aiokafka.errors import CorruptRecordException

            raise CorruptRecordException("Record size is less than the minimum record overhead")
        magic = raw[_MAGIC_OFFSET]
        if magic < 2:
            return LegacyRecordBatch(raw, magic)  # v0/v1 records have no headers
        batch = DefaultRecordBatch(raw)
        if batch.is_control_batch or not batch.validate_crc():
            return batch  # aiokafka's fetcher skips the one and refuses the other
        try:
            return _ParsedBatch(batch, list(batch))
        except UnicodeDecodeError:
            lenient = _LenientBatch(raw)
            lenient.validate_crc()
            return _ParsedBatch(lenient, list(lenient))


def install() -> None:
    """Make every aiokafka consumer in this process use ``TolerantMemoryRecords``."""
    _fetcher.MemoryRecords = TolerantMemoryRecords
