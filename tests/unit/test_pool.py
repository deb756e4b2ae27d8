"""SandboxPool and WarmPool over a fake sandbox: slots, warm containers, refills, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from tako_stream.core.errors import (
    CancelledBeforeStart,
    SandboxSetupError,
    SandboxUnavailableError,
)
from tako_stream.core.jobtypes import Limits
from tako_stream.sandbox.base import SandboxRun
from tako_stream.sandbox.pool import SandboxPool, WarmPool
from tako_stream.settings import OutputCaps
from tests.fakes import (
    FakePrepared,
    FakeSandbox,
    blocking,
    bounded,
    eventually,
    limits_of,
    make_warm,
    raising,
    spin,
)

CAPS = OutputCaps()
DEFAULT = limits_of("default")
DATA = limits_of("data-processing")


def run(
    pool: SandboxPool,
    execution_id: str,
    limits: Limits = DEFAULT,
    cancel: asyncio.Event | None = None,
) -> asyncio.Task[SandboxRun]:
    return asyncio.ensure_future(
        pool.run(b"job", limits, execution_id=execution_id, caps=CAPS, cancel=cancel)
    )


class Warm:
    """A pool with a warm pool over one fake sandbox, drained at the end of the test."""

    def __init__(
        self, shapes: list[tuple[Limits, int]], size: int = 2, sandbox: FakeSandbox | None = None
    ) -> None:
        self.sandbox = sandbox or FakeSandbox()
        self.pool: SandboxPool | None = None
        self.warm: WarmPool = make_warm(self.sandbox, shapes, pool=lambda: self.pool, capacity=size)
        self.pool = SandboxPool(self.sandbox, size, self.warm)

    @property
    def p(self) -> SandboxPool:
        assert self.pool is not None
        return self.pool

    def ready(self, image: str) -> int:
        return self.warm.sizes().get(image, 0)


@pytest.fixture
async def warm_default() -> AsyncIterator[Warm]:
    """One warm container of the default shape, filled before the test starts."""
    w = Warm([(DEFAULT, 1)])
    w.warm.start()
    try:
        await eventually(lambda: w.ready(DEFAULT.image) == 1, "the warm pool to fill")
        yield w
    finally:
        w.sandbox.release_all()
        await bounded(w.warm.drain(), "the warm pool to drain")


async def test_never_more_than_size_jobs_at_once() -> None:
    sandbox = FakeSandbox()
    release = asyncio.Event()
    sandbox.default = blocking(release)
    pool = SandboxPool(sandbox, 2)
    tasks = [run(pool, f"job-{n}") for n in range(5)]
    await sandbox.wait_running(2)
    await spin()
    assert (sandbox.running, len(sandbox.runs), pool.in_flight) == (2, 2, 2)
    release.set()
    done = await bounded(asyncio.gather(*tasks), "the jobs to finish")
    assert [r.collected.report and r.collected.report.exit_code for r in done] == [0] * 5
    assert sorted(c.execution_id for c in sandbox.runs) == [f"job-{n}" for n in range(5)]
    assert sandbox.max_running == 2
    assert pool.in_flight == 0


async def test_a_job_with_the_warm_shape_takes_a_warm_container(warm_default: Warm) -> None:
    w = warm_default
    (prepared,) = w.sandbox.prepared
    # the timeout travels with the job: a different one still fits the warm container
    result = await bounded(
        w.p.run(b"job", replace(DEFAULT, timeout=5), execution_id="a", caps=CAPS), "run"
    )
    (call,) = w.sandbox.runs
    assert call.prepared is prepared
    assert result.warm is True


async def test_a_job_with_other_limits_runs_cold(warm_default: Warm) -> None:
    w = warm_default
    bigger = replace(DEFAULT, memory=DEFAULT.memory * 2)
    result = await bounded(w.p.run(b"job", bigger, execution_id="a", caps=CAPS), "run")
    (call,) = w.sandbox.runs
    assert call.prepared is None and call.limits == bigger
    assert result.warm is False
    assert w.ready(DEFAULT.image) == 1  # still waiting for a job of its shape
    assert len(w.sandbox.prepare_calls) == 1


async def test_the_warm_pool_refills_after_a_take(warm_default: Warm) -> None:
    w = warm_default
    (first,) = w.sandbox.prepared
    await bounded(w.p.run(b"job", DEFAULT, execution_id="a", caps=CAPS), "run")
    assert w.sandbox.runs[0].prepared is first
    await eventually(lambda: w.ready(DEFAULT.image) == 1, "a refill")
    assert len(w.sandbox.prepared) == 2
    assert w.sandbox.prepare_calls[1][0] == replace(DEFAULT, timeout=0)  # made for the shape
    await bounded(w.p.run(b"job", DEFAULT, execution_id="b", caps=CAPS), "run")
    assert w.sandbox.runs[1].prepared is w.sandbox.prepared[1]


async def test_a_dead_warm_container_makes_the_job_run_cold(warm_default: Warm) -> None:
    w = warm_default
    (prepared,) = w.sandbox.prepared
    assert isinstance(prepared, FakePrepared)
    prepared.kill()
    result = await bounded(w.p.run(b"job", DEFAULT, execution_id="a", caps=CAPS), "run")
    assert [c.prepared for c in w.sandbox.runs] == [prepared, None]
    assert [c.outcome for c in w.sandbox.runs] == ["raised", "returned"]
    assert prepared in w.sandbox.discarded
    assert result.warm is False and result.collected.report is not None
    assert result.collected.report.exit_code == 0


@pytest.mark.parametrize("error", [SandboxUnavailableError("gone"), SandboxSetupError("no")])
async def test_a_warm_run_that_fails_is_retried_cold(warm_default: Warm, error: Exception) -> None:
    w = warm_default
    (prepared,) = w.sandbox.prepared
    w.sandbox.then(raising(error))
    result = await bounded(w.p.run(b"job", DEFAULT, execution_id="a", caps=CAPS), "run")
    assert [c.prepared for c in w.sandbox.runs] == [prepared, None]
    assert [c.outcome for c in w.sandbox.runs] == ["raised", "returned"]
    assert result.warm is False


async def test_a_cold_run_that_fails_is_not_retried_by_the_pool() -> None:
    sandbox = FakeSandbox()
    sandbox.then(raising(SandboxUnavailableError("daemon away")))
    pool = SandboxPool(sandbox, 1)
    with pytest.raises(SandboxUnavailableError, match="daemon away"):
        await bounded(pool.run(b"job", DEFAULT, execution_id="a", caps=CAPS), "run")
    assert len(sandbox.runs) == 1
    assert pool.in_flight == 0
    # and the slot came back
    await bounded(pool.run(b"job", DEFAULT, execution_id="b", caps=CAPS), "run")
    assert len(sandbox.runs) == 2


async def test_drain_discards_every_waiting_container() -> None:
    w = Warm([(DEFAULT, 2), (DATA, 1)])
    w.warm.start()
    try:
        await eventually(
            lambda: w.warm.sizes() == {DEFAULT.image: 2, DATA.image: 1}, "the warm pool to fill"
        )
    finally:
        await bounded(w.warm.drain(), "the warm pool to drain")
    assert len(w.sandbox.prepared) == 3
    assert sorted(p.name for p in w.sandbox.discarded) == sorted(p.name for p in w.sandbox.prepared)
    assert w.warm.sizes() == {DEFAULT.image: 0, DATA.image: 0}
    # no refill after a drain, and a job now runs cold
    await bounded(w.p.run(b"job", DEFAULT, execution_id="a", caps=CAPS), "run")
    await spin()
    assert len(w.sandbox.prepare_calls) == 3
    assert w.sandbox.runs[0].prepared is None


async def test_shapes_shared_by_job_types_keep_the_largest_count() -> None:
    w = Warm([(DEFAULT, 1), (replace(DEFAULT, timeout=99), 3)])
    w.warm.start()
    try:
        await eventually(lambda: w.ready(DEFAULT.image) == 3, "the warm pool to fill")
        await spin()
        assert len(w.sandbox.prepare_calls) == 3
    finally:
        await bounded(w.warm.drain(), "the warm pool to drain")


async def test_a_cancel_while_waiting_for_a_slot_raises_and_keeps_the_count_right() -> None:
    sandbox = FakeSandbox()
    pool = SandboxPool(sandbox, 1)
    release = asyncio.Event()
    sandbox.script_job("holder", blocking(release))
    holder = run(pool, "holder")
    await sandbox.wait_started("holder")
    cancel = asyncio.Event()
    waiting = run(pool, "waiting", cancel=cancel)
    await spin()
    assert not waiting.done()
    cancel.set()
    with pytest.raises(CancelledBeforeStart):
        await bounded(waiting, "the cancelled job")
    assert sandbox.runs_of("waiting") == []
    release.set()
    await bounded(holder, "the holder")
    # the slot count is still 1: a later job runs, and two at once do not
    second = asyncio.Event()
    sandbox.script_job("c", blocking(second))
    sandbox.script_job("d", blocking(second))
    later = [run(pool, "c"), run(pool, "d")]
    await sandbox.wait_started("c")
    await spin()
    assert sandbox.running == 1 and sandbox.runs_of("d") == []
    second.set()
    await bounded(asyncio.gather(*later), "the later jobs")
    assert sandbox.max_running == 1 and pool.in_flight == 0


async def test_a_cancel_already_set_never_takes_a_slot() -> None:
    sandbox = FakeSandbox()
    pool = SandboxPool(sandbox, 1)
    cancel = asyncio.Event()
    cancel.set()
    with pytest.raises(CancelledBeforeStart):
        await bounded(pool.run(b"job", DEFAULT, execution_id="a", caps=CAPS, cancel=cancel), "run")
    assert sandbox.runs == []
    await bounded(pool.run(b"job", DEFAULT, execution_id="b", caps=CAPS), "run")
    assert [c.execution_id for c in sandbox.runs] == ["b"]


async def test_a_cancel_and_a_free_slot_at_once_leave_the_count_right() -> None:
    sandbox = FakeSandbox()
    pool = SandboxPool(sandbox, 1)
    release = asyncio.Event()
    cancel = asyncio.Event()
    sandbox.script_job("holder", blocking(release))

    async def hold_then_cancel() -> None:
        await pool.run(b"job", DEFAULT, execution_id="holder", caps=CAPS)
        cancel.set()  # in the very step that freed the slot for the waiting job

    holder = asyncio.ensure_future(hold_then_cancel())
    await sandbox.wait_started("holder")
    waiting = run(pool, "waiting", cancel=cancel)
    await spin()
    release.set()
    await bounded(holder, "the holder")
    with pytest.raises(CancelledBeforeStart):
        await bounded(waiting, "the cancelled job")
    assert sandbox.runs_of("waiting") == []
    gate = asyncio.Event()
    sandbox.script_job("c", blocking(gate))
    sandbox.script_job("d", blocking(gate))
    later = [run(pool, "c"), run(pool, "d")]
    await sandbox.wait_running(1)
    await spin()
    assert sandbox.running == 1 and len(sandbox.runs) == 2
    gate.set()
    await bounded(asyncio.gather(*later), "the later jobs")
    assert sandbox.max_running == 1


async def test_on_start_is_called_once_the_job_has_its_slot() -> None:
    sandbox = FakeSandbox()
    pool = SandboxPool(sandbox, 1)
    release = asyncio.Event()
    sandbox.script_job("holder", blocking(release))
    holder = run(pool, "holder")
    await sandbox.wait_started("holder")
    started: list[int] = []
    second = asyncio.ensure_future(
        pool.run(
            b"job",
            DEFAULT,
            execution_id="b",
            caps=CAPS,
            on_start=lambda: started.append(len(sandbox.runs)),
        )
    )
    await spin()
    assert started == []
    release.set()
    await bounded(asyncio.gather(holder, second), "the jobs")
    assert started == [1]  # before its own run began


class GatedSandbox(FakeSandbox):
    """Prepares wait for ``gate``; ``peak`` is the most prepares in flight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.preparing = 0
        self.peak = 0

    async def prepare(self, limits: Limits, *, execution_id: str = "warm") -> FakePrepared:
        self.preparing += 1
        self.peak = max(self.peak, self.preparing)
        try:
            await bounded(self.gate.wait(), "the test to let prepares end")
            prepared = await super().prepare(limits, execution_id=execution_id)
            assert isinstance(prepared, FakePrepared)
            return prepared
        finally:
            self.preparing -= 1


class Jobs:
    """Jobs running, as a warm pool's ``busy`` counts them; each end told to the warm pool as
    ``SandboxPool`` tells it (nothing polls the count)."""

    def __init__(self) -> None:
        self.count = 0
        self.warm: WarmPool | None = None

    def end(self, n: int = 1) -> None:
        self.count -= n
        assert self.warm is not None
        self.warm.job_ended()


def gated_warm(size: int, capacity: int) -> tuple[GatedSandbox, Jobs, WarmPool]:
    sandbox, jobs = GatedSandbox(), Jobs()
    jobs.warm = WarmPool(
        sandbox, [(DEFAULT, size)], max_idle=3600, busy=lambda: jobs.count, capacity=capacity
    )
    return sandbox, jobs, jobs.warm


async def test_a_rarely_taken_shape_is_refilled_only_while_no_job_runs() -> None:
    """Spaced jobs keep their latency: with half the shape still waiting, a refill would only
    take CPU from the running job."""
    sandbox, jobs, warm = gated_warm(size=2, capacity=4)
    warm.start()
    try:
        await eventually(lambda: warm.sizes()[DEFAULT.image] == 2, "the warm pool to fill")
        calls = len(sandbox.prepare_calls)
        jobs.count = 1
        assert warm.take(DEFAULT) is not None  # one of two still waits
        await asyncio.sleep(0.1)
        assert len(sandbox.prepare_calls) == calls, "refilled while a job ran"
        jobs.end()
        await eventually(lambda: warm.sizes()[DEFAULT.image] == 2, "the refill once idle")
    finally:
        await bounded(warm.drain(), "the warm pool to drain")


async def test_a_drained_shape_is_refilled_at_once_in_the_slots_jobs_leave_free() -> None:
    """Back-to-back jobs: one job runs, so three of the four slots may prepare containers."""
    sandbox, jobs, warm = gated_warm(size=4, capacity=4)
    warm.start()
    try:
        await eventually(lambda: warm.sizes()[DEFAULT.image] == 4, "the warm pool to fill")
        sandbox.gate.clear()
        sandbox.peak = 0
        jobs.count = 1
        for _ in range(4):
            assert warm.take(DEFAULT) is not None
        await eventually(lambda: sandbox.preparing == 3, "three refills at once")
        await asyncio.sleep(0.05)
        assert sandbox.peak == 3 and warm.preparing == 3
        jobs.end()
        await eventually(lambda: sandbox.preparing == 4, "the fourth once the job ended")
        sandbox.gate.set()
        await eventually(lambda: warm.sizes()[DEFAULT.image] == 4, "the pool refilled")
    finally:
        sandbox.gate.set()
        await bounded(warm.drain(), "the warm pool to drain")


async def test_a_saturated_worker_prepares_nothing_ahead() -> None:
    """Every slot runs a job: a refill would only take CPU from them (jobs start their own
    containers, in their own slots)."""
    sandbox, jobs, warm = gated_warm(size=2, capacity=2)
    warm.start()
    try:
        await eventually(lambda: warm.sizes()[DEFAULT.image] == 2, "the warm pool to fill")
        calls = len(sandbox.prepare_calls)
        jobs.count = 2
        assert warm.take(DEFAULT) is not None and warm.take(DEFAULT) is not None
        await asyncio.sleep(0.1)
        assert len(sandbox.prepare_calls) == calls
        jobs.end()
        await eventually(lambda: len(sandbox.prepare_calls) == calls + 1, "one slot freed")
    finally:
        await bounded(warm.drain(), "the warm pool to drain")


async def test_a_job_ending_in_the_pool_lets_a_refill_waiting_for_its_slot_start() -> None:
    """``SandboxPool`` tells the warm pool of each job's end: a refill waiting for a free slot
    waits for exactly that."""
    sandbox = GatedSandbox()
    pooled = Warm([(DEFAULT, 2)], size=2, sandbox=sandbox)
    pool, warm = pooled.p, pooled.warm
    first, second = asyncio.Event(), asyncio.Event()
    sandbox.then(blocking(first), blocking(second))
    warm.start()
    try:
        await eventually(lambda: warm.sizes()[DEFAULT.image] == 2, "the warm pool to fill")
        calls = len(sandbox.prepare_calls)
        running = [
            asyncio.ensure_future(pool.run(b"job", DEFAULT, execution_id=f"j{i}", caps=CAPS))
            for i in range(2)
        ]
        await eventually(lambda: sandbox.running == 2, "both jobs to run, warm")
        await asyncio.sleep(0.1)
        assert len(sandbox.prepare_calls) == calls, "prepared ahead while saturated"
        first.set()
        await eventually(lambda: len(sandbox.prepare_calls) == calls + 1, "the freed slot used")
        second.set()
        assert all(run.warm for run in await bounded(asyncio.gather(*running), "the jobs"))
    finally:
        sandbox.release_all()
        await bounded(warm.drain(), "the warm pool to drain")


async def test_a_job_ending_while_others_wait_for_a_slot_starts_no_refill() -> None:
    """Still saturated: the job waiting for the freed slot starts its own container, so a
    refill there would only add a container to the engine's load (or make that job wait)."""
    sandbox = GatedSandbox()
    pooled = Warm([(DEFAULT, 2)], size=2, sandbox=sandbox)
    pool, warm = pooled.p, pooled.warm
    first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
    sandbox.script_job("j0", blocking(first))
    sandbox.script_job("j1", blocking(second))
    sandbox.script_job("j2", blocking(third))
    warm.start()
    try:
        await eventually(lambda: warm.sizes()[DEFAULT.image] == 2, "the warm pool to fill")
        calls = len(sandbox.prepare_calls)
        running = [
            asyncio.ensure_future(pool.run(b"job", DEFAULT, execution_id=f"j{i}", caps=CAPS))
            for i in range(3)
        ]
        await eventually(lambda: sandbox.running == 2, "two jobs to run, warm")
        await spin()
        assert pool.busy == 3  # two running, one waiting for a slot
        first.set()
        await eventually(lambda: len(sandbox.runs_of("j2")) == 1, "the third job to start")
        assert sandbox.prepare_calls[calls:] == [], "a refill started"
        assert sandbox.runs_of("j2")[0].prepared is None  # its own container, cold
        second.set()
        third.set()
        await bounded(asyncio.gather(*running), "the jobs")
    finally:
        sandbox.release_all()
        await bounded(warm.drain(), "the warm pool to drain")


async def test_a_job_leaving_while_waiting_for_a_slot_lets_the_refill_start() -> None:
    """A job cancelled while it waits for a slot lowers the demand as an ending job does: the
    filler must hear of it, or an idle worker's refill waits for the next take."""
    sandbox = GatedSandbox()
    pooled = Warm([(DEFAULT, 2)], size=1, sandbox=sandbox)
    pool, warm = pooled.p, pooled.warm
    release, cancel = asyncio.Event(), asyncio.Event()
    sandbox.script_job("runs", blocking(release))
    warm.start()
    try:
        await eventually(lambda: warm.sizes()[DEFAULT.image] == 2, "the warm pool to fill")
        running = asyncio.ensure_future(pool.run(b"job", DEFAULT, execution_id="runs", caps=CAPS))
        await eventually(lambda: sandbox.running == 1, "the job to run, warm")
        waiting = asyncio.ensure_future(
            pool.run(b"job", DEFAULT, execution_id="leaves", caps=CAPS, cancel=cancel)
        )
        await spin()
        assert pool.busy == 2 and warm.sizes()[DEFAULT.image] == 1  # half full: no refill yet
        release.set()  # the job ends and frees the slot ...
        await bounded(running, "the running job")
        cancel.set()  # ... as the waiting one is cancelled
        with pytest.raises(CancelledBeforeStart):
            await bounded(waiting, "the cancelled job")
        assert pool.busy == 0
        await eventually(lambda: warm.sizes()[DEFAULT.image] == 2, "the refill once idle")
    finally:
        sandbox.release_all()
        await bounded(warm.drain(), "the warm pool to drain")


async def test_a_job_finding_its_shape_empty_waits_for_the_refill_under_way() -> None:
    sandbox, _, warm = gated_warm(size=1, capacity=2)
    warm.start()
    pool = SandboxPool(sandbox, 2, warm)
    try:
        await eventually(lambda: warm.sizes()[DEFAULT.image] == 1, "the warm pool to fill")
        sandbox.gate.clear()
        assert warm.take(DEFAULT) is not None
        await eventually(lambda: warm.preparing == 1, "the refill to start")
        running = asyncio.ensure_future(pool.run(b"job", DEFAULT, execution_id="j", caps=CAPS))
        await asyncio.sleep(0.05)
        assert not running.done()
        sandbox.gate.set()
        result = await bounded(running, "the job")
        assert result.warm is True
        assert [label for _, label in sandbox.prepare_calls] == ["warm"] * len(
            sandbox.prepare_calls
        )  # no cold start of its own
    finally:
        sandbox.gate.set()
        await bounded(warm.drain(), "the warm pool to drain")


async def test_a_job_waits_for_a_refill_no_longer_than_its_bound() -> None:
    sandbox, _, warm = gated_warm(size=1, capacity=2)
    warm.start()
    try:
        await eventually(lambda: warm.sizes()[DEFAULT.image] == 1, "the warm pool to fill")
        sandbox.gate.clear()
        assert warm.take(DEFAULT) is not None
        await eventually(lambda: warm.preparing == 1, "the refill to start")
        assert await bounded(warm.claim(DEFAULT, wait=0.05), "the claim") is None
        assert warm.preparing == 1  # the refill goes on for the next job
    finally:
        sandbox.gate.set()
        await bounded(warm.drain(), "the warm pool to drain")


async def test_draining_cancels_refills_under_way() -> None:
    sandbox, _, warm = gated_warm(size=2, capacity=2)
    sandbox.gate.clear()
    warm.start()
    await eventually(lambda: sandbox.preparing == 2, "two refills")
    await bounded(warm.drain(), "the warm pool to drain")
    assert warm.preparing == 0 and sandbox.preparing == 0
