"""The DLQ: stats, list, delete (for good, across restarts), replay with a limit, dry runs."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from tako_stream import dlq
from tako_stream.client import Producer, ResultReader
from tako_stream.core.models import DLQRecord
from tako_stream.kafka.reader import tail_records
from tako_stream.settings import Settings
from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def http(method: str, url: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, timeout=aiohttp.ClientTimeout(total=10)) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def wait_for_stats(url: str, total: int) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for _ in range(60):
        status, stats = await http("GET", url)
        if status == 200 and stats.get("total") == total:
            return stats
        await asyncio.sleep(0.5)
    raise AssertionError(f"DLQ stats never reached {total}: {stats}")


async def test_dlq_stats_list_delete_and_replay(new_stack: Stack) -> None:
    worker = new_stack.start_worker()
    await worker.wait_ready()
    settings = new_stack.settings
    ids = [f"dead-{n}-{uuid.uuid4().hex[:6]}" for n in range(3)]
    async with ResultReader(settings) as reader, Producer(settings) as producer:
        for execution_id in ids:  # unknown job type: invalid_request, dead-lettered
            await producer.send_raw(
                orjson.dumps({"execution_id": execution_id, "code": "1", "job_type": "nope"}),
                key=execution_id.encode(),
                headers=[("x-correlation-id", f"c-{execution_id}".encode())],
            )
        found = await reader.wait_for(set(ids), 60)
    assert set(found) == set(ids)

    base = f"http://127.0.0.1:{worker.web_port}"
    stats = await wait_for_stats(f"{base}/dlq/stats", 3)
    assert stats == {"total": 3, "by_error_type": {"invalid_request": 3}}
    code, out, _ = await new_stack.cli("dlq", "stats")
    assert code == 0 and orjson.loads(out) == stats

    code, out, _ = await new_stack.cli("dlq", "list", "--json", "--error-type", "invalid_request")
    entries = [orjson.loads(line) for line in out.splitlines()]
    assert code == 0 and sorted(e["execution_id"] for e in entries) == sorted(ids)
    assert all(e["replay_count"] == 0 and e["attempts"] == 0 for e in entries)
    status, listing = await http("GET", f"{base}/dlq")
    assert status == 200 and listing["total"] == 3
    code, out, _ = await new_stack.cli("dlq", "list", "--json", "--since", "2999-01-01T00:00")
    assert code == 0 and out == ""

    # Delete one over HTTP and one from the CLI.
    by_exec = {e["execution_id"]: e["dlq_id"] for e in entries}
    status, body = await http("DELETE", f"{base}/dlq/{by_exec[ids[0]]}")
    assert status == 200 and body == {"status": "removed", "entry_id": by_exec[ids[0]]}
    status, _ = await http("DELETE", f"{base}/dlq/{by_exec[ids[0]]}")
    assert status == 404
    code, _, _ = await new_stack.cli("dlq", "delete", by_exec[ids[1]])
    assert code == 0
    code, _, err = await new_stack.cli("dlq", "delete", "no-such-entry")
    assert code == 1 and "no DLQ entry" in err
    await wait_for_stats(f"{base}/dlq/stats", 1)

    # Tombstones for entries a view never counted: one deleted again, one never written (as a
    # compacted topic leaves a deletion's tombstone once the entry's record is gone).  A view
    # reading the topic counts the one entry left, not fewer.
    deleted = DLQRecord.model_validate(next(e for e in entries if e["execution_id"] == ids[0]))
    await dlq.delete(settings, [deleted, deleted.model_copy(update={"dlq_id": "never-written"})])
    view, caught_up = dlq.DLQView(), asyncio.Event()
    following = asyncio.ensure_future(
        tail_records(settings, settings.dlq_topic, view.apply, caught_up)
    )
    try:
        await asyncio.wait_for(caught_up.wait(), 60)
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
    assert view.stats() == {"total": 1, "by_error_type": {"invalid_request": 1}}

    # Deletions hold across a restart of the worker (the store is the DLQ topic itself).
    worker.kill()
    worker.wait_exit(30)
    again = new_stack.start_worker()
    await again.wait_ready()
    stats = await wait_for_stats(f"http://127.0.0.1:{again.web_port}/dlq/stats", 1)
    assert stats["total"] == 1

    # A dry run changes nothing.
    code, out, err = await new_stack.cli("dlq", "replay", "--all", "--dry-run")
    assert code == 0 and "would replay 1" in out and "[1/1] would replay" in err
    assert (await dlq.read_store(settings)).stats()["total"] == 1

    # Each replay re-produces the same request (same execution_id, one more replay); it fails
    # again, so it comes back with a higher count, until the limit refuses it.
    async with ResultReader(settings) as reader:
        for round_ in range(1, 3):
            code, out, _ = await new_stack.cli(
                "dlq", "replay", "--all", "--max-replays", "2", "--rate", "10"
            )
            assert code == 0 and "replayed 1" in out
            again_result = await reader.wait_for({ids[2]}, 60)
            assert again_result[ids[2]].error is not None
            store = None
            for _ in range(40):
                store = await dlq.read_store(settings)
                if [e.replay_count for e in store.records()] == [round_]:
                    break
                await asyncio.sleep(0.5)
            assert store is not None
            (entry,) = store.records()
            assert entry.execution_id == ids[2] and entry.replay_count == round_
            assert entry.correlation_id == f"c-{ids[2]}"
    code, out, err = await new_stack.cli("dlq", "replay", "--all", "--max-replays", "2")
    assert code == 1 and "refused 1" in out and "limit 2" in err
    assert (await dlq.read_store(settings)).stats()["total"] == 1


async def test_replay_writes_only_to_the_requests_topic(new_stack: Stack) -> None:
    """A DLQ entry names its source topic, and anyone who can write the DLQ topic writes
    entries: one naming the results topic is refused, and nothing is written there."""
    settings = new_stack.settings
    forged = DLQRecord.model_validate(
        {
            "dlq_id": f"forged-{uuid.uuid4().hex[:8]}",
            "execution_id": "forged-1",
            "correlation_id": "forged",
            "error": {"type": "invalid_request", "message": "x"},
            "attempts": 0,
            "first_failure_at": "2026-11-30T00:00:00Z",
            "last_failure_at": "2026-11-30T00:00:00Z",
            "worker_id": "w",
            "source": {"topic": settings.results_topic, "partition": 0, "offset": 0},
            "original_key": base64.b64encode(b"forged-1").decode(),
            "original_value": base64.b64encode(b'{"status": "succeeded"}').decode(),
            "original_headers": [],
            "original_size": 10,
            "original_truncated": False,
        }
    )
    async with Producer(settings) as producer:
        await producer.send_raw(
            orjson.dumps(forged.model_dump(mode="json")),
            key=forged.dlq_id.encode(),
            topic=settings.dlq_topic,
        )
    for _ in range(40):
        if forged.dlq_id in {e.dlq_id for e in (await dlq.read_store(settings)).records()}:
            break
        await asyncio.sleep(0.5)
    async with ResultReader(settings) as reader:
        code, out, err = await new_stack.cli("dlq", "replay", "--all")
        assert code == 1 and "refused 1" in out, (out, err)
        assert "is not this deployment's requests topic" in err
        assert await reader.wait_for({"forged-1"}, 3) == {}


def dlq_body(settings: Settings, execution_id: str) -> dict[str, Any]:
    """A DLQ record's fields, as anyone could write them (no ``dlq_id``)."""
    return {
        "execution_id": execution_id,
        "correlation_id": "c",
        "error": {"type": "invalid_request", "message": "x"},
        "attempts": 0,
        "first_failure_at": "2026-11-30T00:00:00Z",
        "last_failure_at": "2026-11-30T00:00:00Z",
        "worker_id": "w",
        "source": {"topic": settings.requests_topic, "partition": 0, "offset": 0},
        "original_value": None,
    }


async def test_dlq_list_skips_another_producers_records_no_record_of_ours_holds(
    new_stack: Stack,
) -> None:
    """Anyone may write the DLQ topic: a record holding a number past 64 bits ended `dlq list
    --json` with a TypeError (orjson cannot write it), and one with a correlation id longer than
    a request's was listed as is.  Both are skipped; the entries around them are listed."""
    settings = new_stack.settings
    tag = uuid.uuid4().hex[:8]
    body = dlq_body(settings, "foreign-1")
    forged = {
        f"huge-{tag}": {"replay_count": 123456789012345678901234567890},
        f"offset-{tag}": {"source": {**body["source"], "offset": 2**64}},
        f"long-{tag}": {"correlation_id": "c" * 257},
    }
    fine = [f"fine-{n}-{tag}" for n in range(2)]
    records = [(fine[0], {}), *forged.items(), (fine[1], {})]
    async with Producer(settings) as producer:
        for dlq_id, fields in records:
            value = json.dumps({**body, "dlq_id": dlq_id, **fields}).encode()  # json: past 64 bits
            await producer.send_raw(value, key=dlq_id.encode(), topic=settings.dlq_topic)
    code, out, err = await new_stack.cli("dlq", "list", "--json")
    assert code == 0, err
    assert sorted(orjson.loads(line)["dlq_id"] for line in out.splitlines()) == fine
    code, out, err = await new_stack.cli("dlq", "list")
    assert code == 0 and "2 entries" in err, err
    assert sorted(line.split()[0] for line in out.splitlines()[1:]) == fine


async def test_an_entry_overwritten_with_a_value_no_view_can_read_is_no_longer_counted(
    new_stack: Stack,
) -> None:
    """Anyone may write the DLQ topic: an entry whose key was written again with a value that is
    no DLQ record stayed counted (and listed as its old summary) by the views of workers and
    gateways, where a view started after compaction (only that value left) counts nothing."""
    settings = new_stack.settings
    tag = uuid.uuid4().hex[:8]
    body = dlq_body(settings, "e")
    kept, overwritten = f"kept-{tag}", f"overwritten-{tag}"
    async with Producer(settings) as producer:
        for dlq_id in (kept, overwritten):
            value = orjson.dumps({**body, "dlq_id": dlq_id})
            await producer.send_raw(value, key=dlq_id.encode(), topic=settings.dlq_topic)
        junk = b"not a DLQ record" * 400
        await producer.send_raw(junk, key=overwritten.encode(), topic=settings.dlq_topic)
    view, caught_up = dlq.DLQView(), asyncio.Event()
    following = asyncio.ensure_future(
        tail_records(settings, settings.dlq_topic, view.apply, caught_up)
    )
    try:
        await asyncio.wait_for(caught_up.wait(), 60)
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
    assert view.stats() == {"total": 1, "by_error_type": {"invalid_request": 1}}
    assert view.get(overwritten) is None and view.get(kept) is not None
