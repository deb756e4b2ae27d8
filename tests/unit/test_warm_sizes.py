"""How the warm pool counts: shapes shared by job types, and sizes reported by image."""

from __future__ import annotations

from typing import cast

import pytest
from pydantic import ValidationError

from tako_stream.core.models import JobType
from tako_stream.sandbox.docker import DockerSandbox, Limits
from tako_stream.sandbox.pool import WarmPool

MiB = 1024 * 1024


def limits(image: str, memory: int, timeout: float = 30) -> Limits:
    return Limits(image=image, memory=memory * MiB, cpus=1.0, pids_limit=128, timeout=timeout)


def pool(*shapes: tuple[Limits, int]) -> WarmPool:
    # Never started: no Docker call is made, only the bookkeeping is under test.
    return WarmPool(cast(DockerSandbox, object()), shapes, max_idle=300)


def test_sizes_are_listed_by_image_even_when_empty() -> None:
    p = pool((limits("a", 256), 2), (limits("b", 512), 0))
    assert p.sizes() == {"a": 0, "b": 0}
    assert p.take(limits("a", 256)) is None  # nothing started yet: the job runs cold


def test_shapes_that_differ_only_in_timeout_share_containers() -> None:
    # The timeout travels with the job, so two job types alike but for it share one shape,
    # and the larger count wins rather than the two adding up.
    p = pool((limits("a", 256, timeout=30), 1), (limits("a", 256, timeout=60), 3))
    assert p._size == {limits("a", 256, timeout=0): 3}


def test_a_pool_of_only_zero_sizes_never_starts() -> None:
    p = pool((limits("a", 256), 0))
    p.start()  # would need a running loop and Docker if it started a filler
    assert p._filler is None


@pytest.mark.parametrize("size", [-1, 65])
def test_job_type_warm_pool_size_is_bounded(size: int) -> None:
    with pytest.raises(ValidationError):
        JobType(name="x", image="i", warm_pool_size=size)


def test_job_type_warm_pool_size_defaults_to_the_worker_setting() -> None:
    assert JobType(name="x", image="i").warm_pool_size is None
