"""The intake over fake Kafka and a fake sandbox: one answer per record, offsets committed last."""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import weakref
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tako_stream import dlq
from tako_stream.core.errors import ErrorType, SandboxUnavailableError, Status
from tako_stream.core.models import (
    CORRELATION_HEADER,
    PAYLOAD_HEADER,
    ExecutionRequest,
    ExecutionResult,
)
from tako_stream.kafka.codec import dumps
from tako_stream.kafka.message import Incoming
from tako_stream.worker import intake as intake_module
from tako_stream.worker import publish
from tako_stream.worker.budget import ByteBudget
from tako_stream.worker.intake import Rejection, decode, rejection_cost
from tako_stream.worker.verdict import Job, Verdict, answer
from tests.fakes import (
    TOPICS,
    FakeAnswers,
    Rig,
    blocking,
    bounded,
    cancel_bytes,
    correlation,
    incoming,
    intake_rig,
    raising,
    request_bytes,
    spin,
    succeed,
)

RESULTS, DLQ, STATUS = TOPICS.results, TOPICS.dlq, TOPICS.status


def test_decode_tells_requests_from_rejections() -> None:
    ok = decode(incoming(request_bytes(execution_id="a"), key=b"k"))
    assert isinstance(ok, ExecutionRequest) and ok.execution_id == "a"
    keyed = decode(incoming(request_bytes(execution_id=None), key=b"from-key"))
    assert isinstance(keyed, ExecutionRequest) and keyed.execution_id == "from-key"
    bad = decode(incoming(b"{nope", key=b"bad-1"))
    assert isinstance(bad, Rejection) and bad.execution_id == "bad-1"
    assert "not valid JSON" in bad.problems[0]
    empty = decode(incoming(None))
    assert isinstance(empty, Rejection) and empty.execution_id is None


async def test_every_request_gets_exactly_one_result_and_offsets_reach_the_end() -> None:
    async with intake_rig(capacity=3, pool_size=2) as rig:
        rig.sandbox.default = succeed(stdout=b"out", result=b'{"ok": true}')
        ids = [f"p{p}-{n}" for p in (0, 1) for n in range(4)]
        for eid in ids:
            rig.source.add(request_bytes(execution_id=eid), partition=int(eid[1]), key=eid.encode())
        await rig.sink.wait_for(RESULTS, len(ids))
        await rig.source.wait_committed(0, 4)
        await rig.source.wait_committed(1, 4)
        results = rig.sink.on(RESULTS)
        assert sorted(s.key or b"" for s in results) == sorted(eid.encode() for eid in ids)
        for sent in results:
            result = ExecutionResult.model_validate_json(sent.value or b"")
            assert sent.key == result.execution_id.encode()
            assert result.status is Status.SUCCEEDED and result.output == {"ok": True}
            assert sent.header("x-tako-status") == b"succeeded"
        assert rig.sink.on(DLQ) == []
        # each job said it was running, once
        assert sorted(s.execution_id for s in rig.sink.statuses()) == sorted(ids)
        assert rig.intake.answered == len(ids)
        assert rig.intake.in_flight == 0
        assert rig.sandbox.max_running == 2
    # commits never go backwards
    for partition in (0, 1):
        positions = rig.source.commits_of(partition)
        assert positions == sorted(positions) and positions[-1] == 4


async def test_a_slow_job_holds_the_commit_until_it_finishes() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        release = asyncio.Event()
        rig.sandbox.script_job("slow", blocking(release))
        rig.source.add(request_bytes(execution_id="slow"))
        rig.source.add(request_bytes(execution_id="fast"))
        fast = await rig.sink.wait_result("fast")
        assert fast.status is Status.SUCCEEDED
        await rig.source.commit_rounds(3)
        assert [r.execution_id for r in rig.sink.results()] == ["fast"]
        assert set(rig.source.commits_of(0)) <= {0}
        assert rig.intake.tracker.position(rig.tp(0)) == 0
        release.set()
        await rig.sink.wait_result("slow")
        await rig.source.wait_committed(0, 2)
        assert rig.source.commits_of(0)[-1] == 2


async def test_an_invalid_request_is_rejected_dead_lettered_and_committed() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        original = b"not json at all"
        rig.source.add(original, key=b"bad-1", headers=correlation("corr-bad"))
        (result_msg,) = await rig.sink.wait_for(RESULTS, 1)
        (dlq_msg,) = await rig.sink.wait_for(DLQ, 1)
        await rig.source.wait_committed(0, 1)
        result = ExecutionResult.model_validate_json(result_msg.value or b"")
        assert result.status is Status.REJECTED
        assert result.error is not None and result.error.type is ErrorType.INVALID_REQUEST
        assert result.execution_id == "bad-1" and result_msg.key == b"bad-1"
        assert result.correlation_id == "corr-bad"
        (record,) = rig.sink.dead_letters()
        assert record.original_value is not None
        assert base64.b64decode(record.original_value) == original
        assert record.original_key is not None
        assert base64.b64decode(record.original_key) == b"bad-1"
        assert record.error.type is ErrorType.INVALID_REQUEST
        assert record.source.offset == 0 and record.source.topic == TOPICS.requests
        assert dlq_msg.key == record.dlq_id.encode()
        assert rig.sandbox.runs == []
        assert rig.sink.on(STATUS) == []


async def test_a_rejection_is_logged_once_with_why(caplog: pytest.LogCaptureFixture) -> None:
    """A state change is logged once: a burst of bad requests costs one line each."""
    caplog.set_level(logging.INFO, logger="tako_stream.worker.intake")
    async with intake_rig(partitions=(0,)) as rig:
        rig.source.add(b'{"code": ""}', key=b"blank-1")
        await rig.source.wait_committed(0, 1)
    lines = [r.getMessage() for r in caplog.records if r.name == "tako_stream.worker.intake"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("answered: status=rejected error=invalid_request")
    assert "(invalid request: code: String should have at least 1 character)" in lines[0]


async def test_a_burst_of_rejections_is_answered_with_batched_sends() -> None:
    """The Kafka path's throughput: refused records of a fetch are answered together, their
    results in one ``send_all`` and their DLQ records in another, not a send (and a wait for
    its acknowledgement) per message."""
    async with intake_rig(partitions=(0,)) as rig:
        ids = [f"blank-{n}" for n in range(20)]
        for execution_id in ids:
            rig.source.add(request_bytes(execution_id=execution_id, code=""))
        await rig.source.wait_committed(0, 20)
        assert sorted(r.execution_id for r in rig.sink.results()) == sorted(ids)
        assert sorted(d.execution_id for d in rig.sink.dead_letters()) == sorted(ids)
        assert sum(rig.sink.batches) == 40
        assert max(rig.sink.batches) > 1 and len(rig.sink.batches) < 40, rig.sink.batches


async def test_a_rejection_whose_batched_send_fails_is_retried_alone_and_answered_once() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.sink.fail(RESULTS, times=1)
        rig.sink.fail(DLQ, times=1)
        ids = [f"blank-{n}" for n in range(5)]
        for execution_id in ids:
            rig.source.add(request_bytes(execution_id=execution_id, code=""))
        await rig.source.wait_committed(0, 5)
        assert sorted(r.execution_id for r in rig.sink.results()) == sorted(ids)  # once each
        assert sorted(d.execution_id for d in rig.sink.dead_letters()) == sorted(ids)
        assert len(rig.sink.tries(RESULTS)) == 6 and len(rig.sink.tries(DLQ)) == 6


def answer_of(execution_id: bytes) -> bytes:
    """The encoded answer to a blank-code request with correlation id ``c``."""
    refused = decode(incoming(request_bytes(execution_id=execution_id.decode(), code="")))
    assert isinstance(refused, Rejection)
    result = answer(Job(execution_id.decode(), "c", "worker-1"), Verdict.rejected(refused.problems))
    return dumps(result)


async def test_a_rejection_whose_batched_result_is_refused_is_dead_lettered_alone() -> None:
    """A refusal for good in a batch takes ``publish``'s path for that answer alone: here even
    its reduced answer is refused, so its request lands in the DLQ saying so; the other
    answers of the batch are published as usual."""
    async with intake_rig(partitions=(0,)) as rig:
        # the same refusal, but one answer carries a long correlation id: 200 bytes larger
        rig.sink.refuse(RESULTS, larger_than=len(answer_of(b"short")) + 100)
        rig.source.add(request_bytes(execution_id="short", code=""), headers=correlation("c"))
        rig.source.add(request_bytes(execution_id="long", code=""), headers=correlation("c" * 200))
        await rig.source.wait_committed(0, 2)
        assert [r.execution_id for r in rig.sink.results()] == ["short"]
        by_id = {d.execution_id: d for d in rig.sink.dead_letters()}
        assert by_id["short"].error.type is ErrorType.INVALID_REQUEST
        assert by_id["long"].error.type is ErrorType.INTERNAL_ERROR
        assert "No answer could be published" in by_id["long"].error.message
        assert by_id["long"].original_value is not None


async def test_a_huge_replay_count_in_a_batch_of_rejections_poisons_no_answer() -> None:
    """A replay-count header of 4000 digits once made its DLQ record unencodable (TypeError,
    past 64 bits) after the batch's results were sent: every answer of the batch was then
    published again one by one, and that request got internal_error and no DLQ record."""
    async with intake_rig(partitions=(0,)) as rig:
        ids = ["before", "poisoned", "after"]
        for execution_id in ids:
            count = b"9" * 4000 if execution_id == "poisoned" else b"1"
            rig.source.add(
                request_bytes(execution_id=execution_id, code=""),
                headers=[(dlq.REPLAY_COUNT_HEADER, count)],
            )
        await rig.source.wait_committed(0, 3)
        assert sorted(r.execution_id for r in rig.sink.results()) == sorted(ids)  # once each
        assert {r.error.type for r in rig.sink.results() if r.error} == {ErrorType.INVALID_REQUEST}
        by_id = {d.execution_id: d for d in rig.sink.dead_letters()}
        assert sorted(by_id) == sorted(ids) and len(rig.sink.dead_letters()) == 3
        assert by_id["poisoned"].error.type is ErrorType.INVALID_REQUEST
        assert by_id["poisoned"].replay_count == 0 and by_id["after"].replay_count == 1


async def test_a_dead_letter_that_cannot_be_built_costs_the_batch_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever else might make one DLQ record fail to build, that request is dead-lettered
    without its headers, saying why, and the batch's other answers are sent once."""

    def fragile(message: Incoming, result: ExecutionResult, **kwargs: Any) -> dlq.DeadLetter:
        if any(name == "x-unforeseen" for name, _ in message.headers):
            raise TypeError("something unforeseen")
        return dlq.dead_letter(message, result, **kwargs)

    monkeypatch.setattr(publish, "dead_letter", fragile)
    async with intake_rig(partitions=(0,)) as rig:
        ids = ["first", "odd", "last"]
        for execution_id in ids:
            extra = [("x-unforeseen", b"1")] if execution_id == "odd" else []
            rig.source.add(
                request_bytes(execution_id=execution_id, code=""),
                headers=[*correlation(f"c-{execution_id}"), *extra],
            )
        await rig.source.wait_committed(0, 3)
        assert sorted(r.execution_id for r in rig.sink.results()) == sorted(ids)  # once each
        assert all(r.status is Status.REJECTED for r in rig.sink.results())
        by_id = {d.execution_id: d for d in rig.sink.dead_letters()}
        assert sorted(by_id) == sorted(ids) and len(rig.sink.dead_letters()) == 3
        odd = by_id["odd"]
        assert odd.error.type is ErrorType.INTERNAL_ERROR
        assert (
            "invalid_request" in odd.error.message and "something unforeseen" in odd.error.message
        )
        assert odd.original_headers == [] and odd.original_value is not None
        assert odd.correlation_id == "c-odd"
        assert by_id["first"].error.type is ErrorType.INVALID_REQUEST


async def test_an_idempotent_repeat_in_the_same_batch_of_rejections_is_skipped() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        for _ in range(2):
            rig.source.add(
                request_bytes(execution_id="same", code=""), headers=[(PAYLOAD_HEADER, b"k")]
            )
        await rig.source.wait_committed(0, 2)
        assert [r.execution_id for r in rig.sink.results()] == ["same"]


async def both_slots_held(rig: Rig, *, partition: int) -> asyncio.Event:
    """Both of a 2-slot rig's slots held by requests "a" and "b" of ``partition``, running
    until the returned event is set."""
    release = asyncio.Event()
    rig.sandbox.default = blocking(release)
    rig.source.add(request_bytes(execution_id="a"), partition=partition)
    rig.source.add(request_bytes(execution_id="b"), partition=partition)
    await rig.sandbox.wait_running(2)
    return release


async def test_rejections_are_answered_while_every_slot_is_held() -> None:
    async with intake_rig(capacity=2, pool_size=2) as rig:
        release = await both_slots_held(rig, partition=0)
        rig.source.add(b"[1, 2", partition=1, key=b"bad")
        rig.source.add(request_bytes(execution_id="x", code=""), partition=1)
        await rig.sink.wait_for(RESULTS, 2)
        await rig.source.wait_committed(1, 2)
        assert sorted(r.execution_id for r in rig.sink.results()) == ["bad", "x"]
        assert {r.status for r in rig.sink.results()} == {Status.REJECTED}
        assert len(rig.sink.dead_letters()) == 2
        assert set(rig.source.commits_of(0)) <= {0}
        release.set()
        await rig.source.wait_committed(0, 2)


async def test_a_rejection_does_not_queue_behind_a_request_waiting_for_capacity() -> None:
    """The intake's promise: rejections "never queue behind running jobs".  Here every slot is
    held and a valid request, fetched before the bad one, waits for a slot."""
    async with intake_rig(capacity=2, pool_size=2) as rig:
        release = await both_slots_held(rig, partition=0)
        rig.source.add(request_bytes(execution_id="waits"), partition=0)
        rig.source.add(b"not json", partition=1, key=b"bad")
        await rig.source.changed.until(lambda: len(rig.source.delivered) == 4, "the bad record")
        await rig.source.commit_rounds(5)
        answered = [r.execution_id for r in rig.sink.results()]
        release.set()
        assert answered == ["bad"], "the rejection waited for a slot like the request before it"


async def test_a_rejection_answered_first_never_commits_past_a_request_waiting_before_it() -> None:
    """Rejections are answered before the requests of their fetch that wait for capacity, but
    the commit must stop at the first record not answered.  It did not: a request waiting for
    a slot was not yet known to the offset tracker, so a rejection after it in its partition
    moved the commit past it, and a worker dying then lost the request (seen in CI: the
    group's commits reached the end while such a request still waited)."""
    async with intake_rig(capacity=2, pool_size=2) as rig:
        release = await both_slots_held(rig, partition=1)
        rig.source.add(request_bytes(execution_id="waits"), partition=0)  # offset 0
        rig.source.add(request_bytes(code="", execution_id="bad"), partition=0)  # offset 1
        await rig.sink.wait_result("bad")
        await rig.source.commit_rounds(3)
        assert max(rig.source.commits_of(0), default=0) == 0, rig.source.commits_of(0)
        release.set()
        assert (await rig.sink.wait_result("waits")).status is Status.SUCCEEDED
        await rig.source.wait_committed(0, 2)


async def test_a_request_waiting_for_capacity_pauses_fetching_until_it_has_a_slot() -> None:
    """A saturated worker fetched nothing it could use and kept long-polling anyway (on the
    embedded broker, 50 empty fetches a second of worker and broker CPU at the default wait,
    taken from the containers): the source is paused while a request waits for a slot."""
    async with intake_rig(capacity=2, pool_size=2) as rig:
        release = await both_slots_held(rig, partition=0)
        assert (rig.source.paused, rig.source.pauses) == (False, 0), "paused with a slot free"
        rig.source.add(request_bytes(execution_id="waits"), partition=1)
        await rig.source.changed.until(lambda: rig.source.paused, "fetching paused")
        release.set()
        assert (await rig.sink.wait_result("waits")).status is Status.SUCCEEDED
        await rig.source.changed.until(lambda: not rig.source.paused, "fetching resumed")
        rig.source.add(request_bytes(execution_id="later"), partition=1)
        assert (await rig.sink.wait_result("later")).status is Status.SUCCEEDED
        await rig.source.wait_committed(1, 2)
        assert rig.source.pauses == 1
        assert rig.source.fetches_paused == 0


async def test_at_most_capacity_jobs_are_in_flight() -> None:
    async with intake_rig(partitions=(0,), capacity=2, pool_size=4) as rig:
        release = asyncio.Event()
        rig.sandbox.default = blocking(release)
        for n in range(5):
            rig.source.add(request_bytes(execution_id=f"j{n}"))
        await rig.sandbox.wait_running(2)
        await rig.source.commit_rounds(3)
        assert rig.intake.in_flight == 2
        assert [c.execution_id for c in rig.sandbox.runs] == ["j0", "j1"]
        assert rig.sandbox.running == 2
        release.set()
        await rig.sink.wait_for(RESULTS, 5)
        await rig.source.wait_committed(0, 5)
        assert rig.sandbox.max_running == 2


def live_requests(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[ExecutionRequest]]:
    """Weak references to every request the intake decodes (which ones are still held)."""
    refs: list[weakref.ref[ExecutionRequest]] = []
    real = intake_module.decode

    def tracking(message: Incoming) -> ExecutionRequest | Rejection:
        decoded = real(message)
        if isinstance(decoded, ExecutionRequest):
            refs.append(weakref.ref(decoded))
        return decoded

    monkeypatch.setattr(intake_module, "decode", tracking)
    return refs


async def test_requests_waiting_for_capacity_hold_their_bytes_not_their_decoded_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 16 MiB fetch of 1 MiB requests was decoded whole before taking capacity: 300-400 MB
    of decoded requests held while they waited for slots.  Only ``decoded_ahead`` bytes of a
    fetch stay decoded; the others are decoded when they get their slot, each still answered
    (with its own code), in order, and committed."""
    refs = live_requests(monkeypatch)
    codes = [f"x = {n}\n" + "#" * (64 * 1024) for n in range(8)]
    # room for two of them decoded: the running one and the next
    async with intake_rig(
        partitions=(0,), capacity=1, pool_size=1, decoded_ahead=2 * 64 * 1024 + 1024
    ) as rig:
        release = asyncio.Event()
        rig.sandbox.default = blocking(release)
        for n, code in enumerate(codes):  # one fetch: added before the intake's next turn
            rig.source.add(request_bytes(code, execution_id=f"j{n}"))
        await rig.sandbox.wait_running(1)
        await rig.source.commit_rounds(3)
        assert rig.source.fetches >= 1 and len(rig.source.delivered) == 8
        gc.collect()
        held = [ref() for ref in refs]
        assert sorted(r.execution_id or "" for r in held if r is not None) == ["j0", "j1"]
        del held
        release.set()
        await rig.source.wait_committed(0, 8)
        assert [r.execution_id for r in rig.sink.results()] == [f"j{n}" for n in range(8)]
        assert {r.status for r in rig.sink.results()} == {Status.SUCCEEDED}
        assert [c.code for c in rig.sandbox.runs] == codes


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(st.tuples(st.booleans(), st.integers(0, 3000)), min_size=1, max_size=12),
    decoded_ahead=st.integers(0, 20_000),
    capacity=st.integers(1, 3),
)
def test_a_fetch_of_any_mix_is_answered_once_each_in_order_whatever_is_kept_decoded(
    records: list[tuple[bool, int]], decoded_ahead: int, capacity: int
) -> None:
    """Requests kept decoded or as their bytes, rejections among them: one answer each, the
    requests started in their order, every offset committed."""

    async def scenario() -> None:
        async with intake_rig(
            partitions=(0,), capacity=capacity, pool_size=capacity, decoded_ahead=decoded_ahead
        ) as rig:
            for n, (valid, pad) in enumerate(records):
                code = f"x = {n}  #" + "p" * pad if valid else ""
                rig.source.add(request_bytes(code, execution_id=f"r{n}"))
            await rig.source.wait_committed(0, len(records))
            answered = sorted(r.execution_id for r in rig.sink.results())
            assert answered == sorted(f"r{n}" for n in range(len(records)))
            started = [c.execution_id for c in rig.sandbox.runs]
            assert started == [f"r{n}" for n, (valid, _) in enumerate(records) if valid]
            assert [c.code for c in rig.sandbox.runs] == [
                f"x = {n}  #" + "p" * pad for n, (valid, pad) in enumerate(records) if valid
            ]

    asyncio.run(scenario())


async def test_a_result_whose_send_fails_twice_is_published_once_and_committed() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.sink.fail(RESULTS, times=2)
        rig.source.add(request_bytes(execution_id="r"))
        await rig.source.wait_committed(0, 1)
        assert len(rig.sink.tries(RESULTS)) == 3
        (sent,) = rig.sink.on(RESULTS)
        assert sent.key == b"r"
        assert rig.sink.result("r").status is Status.SUCCEEDED


async def test_a_failing_dlq_send_does_not_resend_the_result() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.sink.fail(DLQ, times=1)
        rig.source.add(b"garbage")
        await rig.source.wait_committed(0, 1)
        assert len(rig.sink.tries(RESULTS)) == 1 and len(rig.sink.on(RESULTS)) == 1
        assert len(rig.sink.tries(DLQ)) == 2 and len(rig.sink.on(DLQ)) == 1


async def test_a_refused_result_is_not_retried_and_the_original_is_dead_lettered() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.sink.refuse(RESULTS)
        original = request_bytes(execution_id="big")
        rig.source.add(original)
        await rig.source.wait_committed(0, 1)
        await rig.source.commit_rounds(3)
        # the answer, then an answer saying it was refused; neither retried
        assert len(rig.sink.tries(RESULTS)) == 2
        assert rig.sink.on(RESULTS) == []
        (dead,) = rig.sink.dead_letters()
        assert dead.error.type == "internal_error" and "refused" in dead.error.message
        assert base64.b64decode(dead.original_value or "") == original
        assert rig.intake.answered == 1


async def test_a_result_too_large_for_the_topic_is_answered_with_why() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.sink.refuse(RESULTS, larger_than=2_000)
        rig.sandbox.default = succeed(stdout=b"x" * 10_000)
        original = request_bytes(execution_id="huge")
        rig.source.add(original)
        result = await rig.sink.wait_result("huge")
        await rig.source.wait_committed(0, 1)
        assert result.status == "failed" and result.error is not None
        assert result.error.type == "internal_error"
        assert "results topic refused" in result.error.message and result.stdout == ""
        (dead,) = rig.sink.dead_letters()
        assert dead.execution_id == "huge"
        assert base64.b64decode(dead.original_value or "") == original


async def test_reply_to_gets_the_result_too() -> None:
    async with intake_rig(partitions=(0,), existing_topics=["my.replies"]) as rig:
        rig.source.add(request_bytes(execution_id="rt", reply_to="my.replies"))
        rig.source.add(request_bytes(execution_id="same", reply_to=RESULTS))
        await rig.source.wait_committed(0, 2)
        (main,) = [s for s in rig.sink.on(RESULTS) if s.key == b"rt"]
        (copy,) = rig.sink.on("my.replies")
        assert (copy.key, copy.value, copy.headers) == (main.key, main.value, main.headers)
        # reply_to naming the results topic is not sent twice
        assert len([s for s in rig.sink.on(RESULTS) if s.key == b"same"]) == 1


async def test_a_job_cancelled_before_it_runs_never_reaches_the_sandbox() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.cancellations.apply(b"doomed", cancel_bytes("doomed"))
        rig.source.add(request_bytes(execution_id="doomed"))
        result = await rig.sink.wait_result("doomed")
        await rig.source.wait_committed(0, 1)
        assert result.status is Status.CANCELLED
        assert result.error is not None and result.error.type is ErrorType.CANCELLED
        assert "before it ran" in result.error.message
        assert rig.sandbox.runs == []
        assert rig.sink.on(DLQ) == [] and rig.sink.on(STATUS) == []


async def test_a_cancel_while_the_job_runs_stops_it() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.sandbox.script_job("long", blocking(asyncio.Event()))
        rig.source.add(request_bytes(execution_id="long"))
        call = await rig.sandbox.wait_started("long")
        assert call.cancel is not None and not call.cancel.is_set()
        rig.cancellations.apply(b"long", cancel_bytes("long"))
        assert call.cancel.is_set()
        result = await rig.sink.wait_result("long")
        assert result.status is Status.CANCELLED and result.exit_code == 143
        assert result.error is not None and result.error.type is ErrorType.CANCELLED
        assert call.outcome == "cancelled"
        await rig.source.wait_committed(0, 1)
        assert rig.sink.on(DLQ) == []


async def test_revoking_a_partition_waits_for_its_job_and_commits() -> None:
    async with intake_rig(partitions=(0, 1)) as rig:
        release = asyncio.Event()
        rig.sandbox.script_job("on-0", blocking(release))
        rig.source.add(request_bytes(execution_id="on-0"), partition=0)
        rig.source.add(request_bytes(execution_id="on-1"), partition=1)
        await rig.sandbox.wait_started("on-0")
        await rig.source.wait_committed(1, 1)
        revoking = asyncio.ensure_future(rig.source.revoke([0]))
        await rig.source.commit_rounds(3)
        assert not revoking.done()
        assert [r.execution_id for r in rig.sink.results()] == ["on-1"]
        release.set()
        await bounded(revoking, "the revoke")
        assert rig.sink.result("on-0").status is Status.SUCCEEDED
        assert rig.source.committed[rig.tp(0)] == 1
        assert rig.intake.tracker.position(rig.tp(0)) is None
        assert rig.tp(0) not in rig.source.assignment()
        assert rig.intake.tracker.position(rig.tp(1)) == 1
        # the other partition goes on as before
        rig.source.add(request_bytes(execution_id="after"), partition=1)
        await rig.source.wait_committed(1, 2)


@pytest.mark.parametrize("decoded_ahead", [0, 1024 * 1024], ids=["bytes", "decoded"])
async def test_a_record_waiting_for_capacity_on_a_revoked_partition_is_left_alone(
    decoded_ahead: int,
) -> None:
    """Whether it waited decoded or as its bytes (decoded once it has a slot)."""
    async with intake_rig(partitions=(0, 1), capacity=1, decoded_ahead=decoded_ahead) as rig:
        release = asyncio.Event()
        rig.sandbox.script_job("first", blocking(release))
        rig.source.add(request_bytes(execution_id="first"), partition=0)
        await rig.sandbox.wait_started("first")
        rig.source.add(request_bytes(execution_id="second"), partition=0)
        await rig.source.changed.until(lambda: len(rig.source.delivered) == 2, "the 2nd fetch")
        revoking = asyncio.ensure_future(rig.source.revoke([0]))
        await spin()
        release.set()
        await bounded(revoking, "the revoke")
        assert rig.source.committed[rig.tp(0)] == 1  # the new owner starts at "second"
        await rig.source.commit_rounds(3)
        assert rig.sandbox.runs_of("second") == []
        assert [r.execution_id for r in rig.sink.results()] == ["first"]
        # the capacity it waited for is free again
        rig.source.add(request_bytes(execution_id="on-1"), partition=1)
        await rig.sink.wait_result("on-1")


async def test_a_job_that_outlives_the_grace_is_handed_back_uncommitted() -> None:
    async with intake_rig(partitions=(0, 1), shutdown_grace=0.05) as rig:
        rig.sandbox.script_job("stuck", blocking(asyncio.Event(), honour_cancel=False))
        rig.source.add(request_bytes(execution_id="stuck"), partition=0)
        call = await rig.sandbox.wait_started("stuck")
        await bounded(rig.source.revoke([0]), "the revoke")
        assert call.outcome == "interrupted"
        assert rig.sink.results() == []
        assert set(rig.source.commits_of(0)) <= {0}
        assert rig.intake.tracker.position(rig.tp(0)) is None
        assert rig.intake.in_flight == 0 and rig.executor.pool.in_flight == 0
        # its capacity came back: the next job runs
        rig.source.add(request_bytes(execution_id="next"), partition=1)
        await rig.sink.wait_result("next")


async def test_an_exception_in_the_executor_is_an_internal_error_and_dead_lettered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with intake_rig(partitions=(0,)) as rig:

        async def explode(*args: Any, **kwargs: Any) -> ExecutionResult:
            raise RuntimeError("boom")

        monkeypatch.setattr(rig.executor, "execute", explode)
        rig.source.add(request_bytes(execution_id="bug"), headers=correlation("corr-bug"))
        result = await rig.sink.wait_result("bug")
        await rig.sink.wait_for(DLQ, 1)
        (record,) = rig.sink.dead_letters()
        await rig.source.wait_committed(0, 1)
        assert result.status is Status.FAILED
        assert result.error is not None and result.error.type is ErrorType.INTERNAL_ERROR
        assert "boom" in result.error.message
        assert result.correlation_id == "corr-bug"
        assert record.execution_id == "bug" and record.error.type is ErrorType.INTERNAL_ERROR


async def test_an_unavailable_sandbox_is_answered_and_dead_lettered() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.sandbox.decide = lambda call: raising(SandboxUnavailableError("docker away"))
        rig.source.add(request_bytes(execution_id="u"))
        result = await rig.sink.wait_result("u")
        await rig.sink.wait_for(DLQ, 1)
        await rig.source.wait_committed(0, 1)
        assert result.status is Status.REJECTED and result.attempts == 2
        assert result.error is not None
        assert result.error.type is ErrorType.SERVICE_UNAVAILABLE
        (record,) = rig.sink.dead_letters()
        assert record.attempts == 2


async def test_stop_waits_for_running_jobs_then_commits_and_closes() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        release = asyncio.Event()
        rig.sandbox.script_job("last", blocking(release))
        rig.source.add(request_bytes(execution_id="last"))
        await rig.sandbox.wait_started("last")
        stopping = asyncio.ensure_future(rig.intake.stop())
        await spin(50)
        assert not stopping.done()
        assert not rig.source.stopped and not rig.sink.stopped
        release.set()
        await bounded(stopping, "stop")
        assert rig.sink.result("last").status is Status.SUCCEEDED
        assert rig.source.committed[rig.tp(0)] == 1
        assert rig.source.stopped and rig.sink.stopped
        assert rig.sandbox.drains == 1
        # nothing more is taken once stopped
        rig.source.add(request_bytes(execution_id="late"))
        await spin(50)
        assert rig.sandbox.runs_of("late") == []


async def test_stop_hands_back_a_job_that_outlives_the_grace() -> None:
    async with intake_rig(partitions=(0,), shutdown_grace=0.05) as rig:
        rig.sandbox.script_job("stuck", blocking(asyncio.Event(), honour_cancel=False))
        rig.source.add(request_bytes(execution_id="stuck"))
        call = await rig.sandbox.wait_started("stuck")
        await bounded(rig.intake.stop(), "stop")
        assert call.outcome == "interrupted"
        assert rig.sink.results() == []
        assert set(rig.source.commits_of(0)) <= {0}
        assert rig.source.stopped and rig.sink.stopped


async def test_on_answered_is_told_of_each_answer() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        answers: list[tuple[str, Status, float | None]] = []
        rig.intake.on_answered = lambda result, since: answers.append(
            (result.execution_id, result.status, since)
        )
        produced_ms = 1_700_000_000_000
        rig.source.add(request_bytes(execution_id="t1"), timestamp_ms=produced_ms)
        rig.source.add(b"nope", key=b"t2")
        await rig.source.wait_committed(0, 2)
        assert sorted((eid, status) for eid, status, _ in answers) == [
            ("t1", Status.SUCCEEDED),
            ("t2", Status.REJECTED),
        ]
        since = {eid: s for eid, _, s in answers}
        assert since["t2"] is None
        assert since["t1"] is not None and since["t1"] > 0
        queued = rig.sink.result("t1").timing.queued
        assert queued is not None and queued > 0


async def test_the_correlation_id_header_is_carried_to_the_result() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.source.add(request_bytes(execution_id="c1"), headers=[("X-Correlation-ID", b"abc-123")])
        rig.source.add(request_bytes(execution_id="c2"))
        await rig.source.wait_committed(0, 2)
        first, second = rig.sink.result("c1"), rig.sink.result("c2")
        assert first.correlation_id == "abc-123"
        (sent,) = [s for s in rig.sink.on(RESULTS) if s.key == b"c1"]
        assert sent.header(CORRELATION_HEADER) == b"abc-123"
        (status,) = [s for s in rig.sink.statuses() if s.execution_id == "c1"]
        assert status.correlation_id == "abc-123"
        # without the header, a fresh one is made up
        assert second.correlation_id and second.correlation_id != "abc-123"


async def test_a_failed_commit_is_retried() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.source.commit_errors = 1
        rig.source.add(request_bytes(execution_id="a"))
        await rig.source.wait_committed(0, 1)
        assert rig.source.failed_commits == [{rig.tp(0): 1}]


async def test_a_failed_fetch_does_not_stop_the_stream() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.source.fetch_errors = 1
        rig.source.add(request_bytes(execution_id="after-error"))
        await rig.sink.wait_result("after-error")
        assert rig.source.fetch_errors == 0


async def test_a_blocked_status_topic_never_delays_the_result() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        gate = rig.sink.block(STATUS)
        rig.source.add(request_bytes(execution_id="s"))
        await rig.source.wait_committed(0, 1)
        assert rig.sink.result("s").status is Status.SUCCEEDED
        assert rig.sink.on(STATUS) == []
        gate.set()
        await rig.sink.wait_for(STATUS, 1)


# --- Every request answered (what a hostile requester or a misconfigured topic can do) -------


def nested(depth: int) -> bytes:
    """JSON text of objects nested ``depth`` deep: orjson reads up to 1,024 levels but writes
    at most 254, so deep values are written by hand."""
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


async def test_a_request_without_id_or_key_is_answered_under_its_position() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.source.add(request_bytes(execution_id=None), partition=0)
        rig.source.add(b"not json", partition=0)
        await rig.source.wait_committed(0, 2)
        ids = sorted(r.execution_id for r in rig.sink.results())
        assert ids == [f"{RESULTS.replace('results', 'requests')}:0:0", "tako.requests:0:1"]


async def test_output_nested_too_deep_for_a_result_is_invalid_output() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        rig.sandbox.default = succeed(result=nested(300))
        rig.source.add(request_bytes(execution_id="deep"))
        result = await rig.sink.wait_result("deep")
        await rig.source.wait_committed(0, 1)
        assert result.error is not None and result.error.type == "invalid_output"
        assert "nested deeper" in result.error.message and result.output is None
        assert rig.sink.dead_letters() == []  # the job's own doing: no dead letter


async def test_metadata_nested_too_deep_is_refused_on_entry() -> None:
    async with intake_rig(partitions=(0,)) as rig:
        body = b'{"execution_id": "meta", "code": "print(1)", "metadata": ' + nested(254) + b"}"
        rig.source.add(body)
        result = await rig.sink.wait_result("meta")
        await rig.source.wait_committed(0, 1)
        assert result.status == "rejected" and result.error is not None
        assert result.error.type == "invalid_request" and "metadata" in result.error.message
        assert rig.sandbox.runs == []
        (dead,) = rig.sink.dead_letters()
        assert dead.execution_id == "meta"


async def test_a_result_that_cannot_be_encoded_is_answered_with_why() -> None:
    """The last line of defence, for whatever passed the entry checks: a result that orjson
    cannot encode (here an integer beyond 64 bits in the output) becomes invalid_output."""
    async with intake_rig(partitions=(0,)) as rig:
        original = rig.executor.execute

        async def huge_int(*args: Any, **kwargs: Any) -> ExecutionResult:
            result = await original(*args, **kwargs)
            return result.model_copy(update={"output": {"n": 2**70}})

        rig.executor.execute = huge_int  # type: ignore[method-assign]
        rig.source.add(request_bytes(execution_id="int"))
        result = await rig.sink.wait_result("int")
        await rig.source.wait_committed(0, 1)
        assert result.error is not None and result.error.type == "invalid_output"
        assert "cannot be carried" in result.error.message


async def test_reply_to_must_be_an_allowed_existing_topic() -> None:
    async with intake_rig(partitions=(0,), existing_topics=["replies"]) as rig:
        rig.source.add(request_bytes(execution_id="missing", reply_to="nowhere"))
        rig.source.add(request_bytes(execution_id="own", reply_to=TOPICS.requests))
        rig.source.add(request_bytes(execution_id="fine", reply_to="replies"))
        await rig.source.wait_committed(0, 3)
        missing, own = rig.sink.result("missing"), rig.sink.result("own")
        assert missing.error is not None and "does not exist" in missing.error.message
        assert own.error is not None and "service's own topics" in own.error.message
        assert rig.sink.result("fine").success
        assert [r.execution_id for r in rig.sink.results("replies")] == ["fine"]
        assert [c.execution_id for c in rig.sandbox.runs] == ["fine"]
        # a refused reply_to is never written to (a broker that creates topics on use would)
        assert rig.sink.tries("nowhere") == [] and rig.sink.tries(TOPICS.requests) == []


async def test_a_failing_reply_to_never_blocks_the_result_which_says_so() -> None:
    async with intake_rig(partitions=(0,), existing_topics=["replies"]) as rig:
        rig.sink.block("replies")  # never acknowledged: the copy's bound (1 s here) ends it
        rig.source.add(request_bytes(execution_id="late", reply_to="replies"))
        result = await rig.sink.wait_result("late")
        await rig.source.wait_committed(0, 1)
        assert result.success and result.reply_to_error is not None
        assert "replies" in result.reply_to_error
        rig.sink.refuse("replies")
        rig.sink.release_all()
        rig.source.add(request_bytes(execution_id="refused", reply_to="replies"))
        refused = await rig.sink.wait_result("refused")
        assert refused.reply_to_error is not None and "refused" in refused.reply_to_error


async def test_rejections_hold_at_most_their_byte_budget() -> None:
    message = incoming(b"x" * (400 * 1024), key=b"bad-0")
    budget = 2 * rejection_cost(message) + 1
    async with intake_rig(partitions=(0,), rejection_budget=budget) as rig:
        gate = rig.sink.block(RESULTS)
        for n in range(6):
            rig.source.add(b"x" * (400 * 1024), key=f"bad-{n}".encode())
        await spin(200)
        held = len(rig.sink.tries(RESULTS))
        assert held == 2  # two fit in the budget, a third does not
        gate.set()
        await rig.source.wait_committed(0, 6)
        assert len(rig.sink.results()) == 6


async def test_a_record_delivered_again_after_its_answer_is_not_run_again() -> None:
    """A worker that died after publishing, before committing: the next owner gets the record
    again, and a cancel that arrived meanwhile must not turn its success into ``cancelled``."""
    async with intake_rig(partitions=(0,)) as rig:
        rig.source.add(request_bytes(execution_id="done"))
        first = await rig.sink.wait_result("done")
        rig.cancellations.apply(b"done", cancel_bytes("done"))
        rig.source.redeliver(0, [0])
        await rig.source.changed.until(lambda: len(rig.source.delivered) == 2, "the re-delivery")
        await rig.source.wait_committed(0, 1)
        await rig.source.commit_rounds(3)
        assert first.success and rig.sink.results() == [first]
        assert len(rig.sandbox.runs) == 1


async def test_the_same_id_at_another_position_runs_again() -> None:
    """A DLQ replay or a resubmission is a new record with the same id: it runs."""
    async with intake_rig(partitions=(0,)) as rig:
        rig.source.add(request_bytes(execution_id="again"))
        await rig.sink.wait_result("again")
        rig.source.add(request_bytes(execution_id="again"))
        await rig.source.wait_committed(0, 2)
        assert [r.execution_id for r in rig.sink.results()] == ["again", "again"]
        assert len(rig.sandbox.runs) == 2


async def test_new_partitions_wait_for_the_answered_index() -> None:
    answers = FakeAnswers()
    async with intake_rig(partitions=(0,), answers=answers):
        assert answers.waits == 1


async def test_a_result_the_broker_never_acknowledges_is_dead_lettered_in_time() -> None:
    """A results topic that keeps failing (e.g. min.insync.replicas that cannot be met) must not
    hold the partition's commits back for good: past publish_timeout the original goes to the
    DLQ and the offset is committed."""
    async with intake_rig(partitions=(0,), publish_timeout=0.5) as rig:
        rig.sink.fail(RESULTS, times=1_000)
        original = request_bytes(execution_id="stuck")
        rig.source.add(original)
        await rig.source.wait_committed(0, 1)
        assert rig.sink.on(RESULTS) == []
        (dead,) = rig.sink.dead_letters()
        assert dead.execution_id == "stuck" and dead.error.type == "internal_error"
        assert "did not acknowledge" in dead.error.message
        assert base64.b64decode(dead.original_value or "") == original


async def test_byte_budget_is_first_come_first_served_and_survives_cancelled_waiters() -> None:
    budget = ByteBudget(10)
    assert await budget.acquire(6) == 6
    big = asyncio.ensure_future(budget.acquire(8))
    small = asyncio.ensure_future(budget.acquire(2))
    await spin()
    assert not big.done() and not small.done()  # the small one waits its turn
    big.cancel()
    budget.release(6)
    assert await bounded(small, "the small request") == 2
    budget.release(2)
    # more than the whole budget: capped at it, so it waits for all of it rather than forever
    assert await bounded(budget.acquire(100), "the whole budget") == 10
    assert budget.free == 0


async def test_a_failing_step_of_stopping_does_not_skip_the_others() -> None:
    async with intake_rig(partitions=(0,)) as rig:

        async def broken() -> None:
            raise RuntimeError("the broker went away")

        rig.source.stop = broken  # type: ignore[method-assign]
        assert await bounded(rig.intake.stop(), "the stop") is True
        assert rig.sink.stopped and rig.sandbox.drains == 1
        rig.source.stopped = True  # for the rig's own clean-up


async def test_repeats_of_an_idempotent_request_are_skipped_while_it_runs_or_once_answered() -> (
    None
):
    """Two gateways racing on one idempotency key both produce; the key's first request is the
    job and the workers skip the rest (the gateways tell their clients which one won)."""
    idempotent = [(PAYLOAD_HEADER, b"digest-a")]
    async with intake_rig(partitions=(0,), capacity=4, pool_size=4) as rig:
        release = asyncio.Event()
        rig.sandbox.default = blocking(release)
        rig.source.add(request_bytes(execution_id="key-1"), headers=idempotent)
        rig.source.add(request_bytes("print('other')", execution_id="key-1"), headers=idempotent)
        await rig.sandbox.wait_running(1)
        await rig.source.wait_committed(0, 0)
        release.set()
        await rig.source.wait_committed(0, 2)
        rig.source.add(request_bytes(execution_id="key-1"), headers=idempotent)  # after it
        await rig.source.wait_committed(0, 3)
        assert len(rig.sandbox.runs) == 1
        assert [r.execution_id for r in rig.sink.results()] == ["key-1"]
