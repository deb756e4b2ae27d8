"""The producer's partitioner: keyed messages land where the Java client and aiokafka put them."""

from __future__ import annotations

import ctypes

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from tako_stream.kafka.clients import murmur2, partition_for, producer_options
from tako_stream.settings import Settings

#: org.apache.kafka.common.utils.UtilsTest#testMurmur2: the Java client's own vectors (signed).
JAVA_VECTORS = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]


@pytest.mark.parametrize(("key", "expected"), JAVA_VECTORS)
def test_murmur2_matches_the_java_client(key: bytes, expected: int) -> None:
    assert ctypes.c_int32(murmur2(key)).value == expected


@given(st.binary(max_size=300))
def test_murmur2_matches_aiokafka_on_any_bytes(key: bytes) -> None:
    assert murmur2(key) == aiokafka_murmur2(key)


@given(st.binary(max_size=80), st.integers(min_value=1, max_value=64))
def test_a_keyed_message_lands_where_aiokafkas_default_partitioner_puts_it(
    key: bytes, partitions: int
) -> None:
    every = list(range(partitions))
    assert partition_for(key, every, every) == DefaultPartitioner()(key, every, every)


def test_a_message_without_key_goes_to_an_available_partition() -> None:
    assert {partition_for(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
    assert partition_for(None, [0, 1], []) in {0, 1}


def test_every_producer_of_the_service_uses_it() -> None:
    assert producer_options(Settings())["partitioner"] is partition_for
