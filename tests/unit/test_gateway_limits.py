"""The gateway's rate limit: a fixed window per client, Retry-After, bounded memory."""

from __future__ import annotations

from tako_stream.gateway.limits import FixedWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_window_allows_the_limit_then_says_when_to_retry() -> None:
    clock = Clock()
    limiter = FixedWindow(2, 60, clock)
    assert limiter.allow("a") == (True, 0) and limiter.allow("a") == (True, 0)
    clock.now += 15.5
    assert limiter.allow("a") == (False, 45)  # the window ends 44.5 s from now, rounded up
    assert limiter.allow("b") == (True, 0)  # per client
    clock.now += 44.5
    assert limiter.allow("a") == (True, 0)  # a new window


def test_idle_clients_are_forgotten() -> None:
    clock = Clock()
    limiter = FixedWindow(1, 10, clock)
    for n in range(100):
        limiter.allow(f"client-{n}")
    assert len(limiter) == 100
    clock.now += 25
    limiter.allow("new")
    assert len(limiter) == 1
