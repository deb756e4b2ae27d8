"""Backoff: exponential, jittered, capped."""

from __future__ import annotations

from tako_stream.settings import RetryPolicy


def test_equal_jitter_bounds() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay=1.0, max_delay=8.0)
    assert policy.delay(1, rand=lambda: 0.0) == 0.5
    assert policy.delay(1, rand=lambda: 1.0) == 1.0
    assert policy.delay(3, rand=lambda: 0.0) == 2.0
    assert policy.delay(3, rand=lambda: 1.0) == 4.0
    assert policy.delay(10, rand=lambda: 1.0) == 8.0  # capped


def test_jitter_spreads_retries() -> None:
    policy = RetryPolicy()
    delays = {round(policy.delay(1), 6) for _ in range(50)}
    assert len(delays) > 10 and all(0.5 <= d <= 1.0 for d in delays)
