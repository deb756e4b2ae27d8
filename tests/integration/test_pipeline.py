"""The execution pipeline end to end: real broker, real worker process, real containers."""

from __future__ import annotations

import asyncio
import base64
import uuid

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tako_stream.client import Producer, ResultReader
from tako_stream.core.models import CORRELATION_HEADER, DLQRecord
from tako_stream.worker.intake import DECODED_AHEAD
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration


def job(code: str, **fields: object) -> dict[str, object]:
    return {"execution_id": str(uuid.uuid4()), "code": code, **fields}


async def test_job_with_input_and_output(stack: Stack) -> None:
    code = (
        "import json\n"
        "data = json.load(open('/input/data.json'))\n"
        "print('adding', len(data['xs']), 'numbers')\n"
        "json.dump({'total': sum(data['xs'])}, open('/output/result.json', 'w'))\n"
    )
    result = await stack.run_job(job(code, input_data={"xs": [1, 2, 3, 4]}, metadata={"k": 1}))
    assert result.status == "succeeded" and result.success
    assert result.output == {"total": 10}
    assert result.stdout == "adding 4 numbers\n"
    assert result.exit_code == 0 and result.error is None
    assert result.metadata == {"k": 1}
    assert result.job_type == "default" and result.attempts == 1
    assert result.worker_id.startswith("w1-")
    assert result.started_at and result.finished_at >= result.started_at
    assert result.timing.warm == (stack.mode == "warm")


async def test_seed_examples(stack: Stack) -> None:
    div = (
        "import json\nwith open('/input/data.json') as f:\n    data = json.load(f)\n"
        "result = 100 / data['value']\n"
    )
    requests = {
        "syntax": job("def broken("),
        "division": job(div, input_data={"value": 0}),
        "timeout": job("import time; time.sleep(60)", timeout=5),
        "pandas_default": job("import pandas", job_type="default"),
        "pandas_dp": job(
            "import pandas, json\n"
            "json.dump({'v': pandas.__version__}, open('/output/result.json', 'w'))",
            job_type="data-processing",
        ),
    }
    found = await stack.run_jobs(list(requests.values()))
    r = {name: found[str(req["execution_id"])] for name, req in requests.items()}

    assert r["syntax"].status == "failed" and r["syntax"].error is not None
    assert r["syntax"].error.type == "syntax_error"
    assert "SyntaxError" in r["syntax"].stderr

    assert r["division"].error is not None and r["division"].error.type == "division_error"
    assert "ZeroDivisionError: division by zero" in r["division"].stderr
    assert r["division"].exit_code == 1

    assert r["timeout"].status == "timeout" and not r["timeout"].success
    assert r["timeout"].error is not None
    assert r["timeout"].error.message == "Execution timeout exceeded (5s)"
    assert 5 <= r["timeout"].execution_time < 15

    assert r["pandas_default"].error is not None
    assert r["pandas_default"].error.type == "import_error"
    assert "ModuleNotFoundError: No module named 'pandas'" in r["pandas_default"].stderr

    assert r["pandas_dp"].success, r["pandas_dp"].stderr
    assert isinstance(r["pandas_dp"].output, dict) and r["pandas_dp"].output["v"]


SIGNAL_ROWS = {
    # exit code: (code producing it for real, expected error type, expected status)
    143: ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", "cancelled", "cancelled"),
    139: ("import ctypes; ctypes.string_at(0)", "segfault", "failed"),
    134: ("import os; os.abort()", "abort", "failed"),
    136: ("import os, signal; os.kill(os.getpid(), signal.SIGFPE)", "arithmetic_error", "failed"),
    135: ("import os, signal; os.kill(os.getpid(), signal.SIGBUS)", "bus_error", "failed"),
    141: (
        "import os, signal\nsignal.signal(signal.SIGPIPE, signal.SIG_DFL)\n"
        "r, w = os.pipe(); os.close(r); os.write(w, b'x')",
        "pipe_error",
        "failed",
    ),
    137: ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed", "failed"),
}


async def test_every_exit_code_row(stack: Stack) -> None:
    requests = {code: job(src) for code, (src, _, _) in SIGNAL_ROWS.items()}
    oom = job("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n")
    found = await stack.run_jobs([*requests.values(), oom])
    for exit_code, request in requests.items():
        result = found[str(request["execution_id"])]
        _, error_type, status = SIGNAL_ROWS[exit_code]
        assert result.exit_code == exit_code, (exit_code, result)
        assert result.error is not None and result.error.type == error_type, result
        assert result.status == status
    memory = found[str(oom["execution_id"])]
    assert memory.status == "oom" and memory.exit_code == 137
    assert memory.error is not None and memory.error.type == "oom"
    assert memory.error.message == "Execution exceeded memory limit"


async def test_memory_limit_from_request(stack: Stack) -> None:
    # 100 MB fits the default 256m but not a 64m limit.
    code = "x = bytearray(100 * 1024 * 1024)\nprint('allocated')"
    small, default = job(code, memory_limit="64m"), job(code)
    too_big = job("print(1)", memory_limit="4g")
    found = await stack.run_jobs([small, default, too_big])
    assert found[str(small["execution_id"])].status == "oom"
    assert found[str(default["execution_id"])].success
    rejected = found[str(too_big["execution_id"])]
    assert rejected.status == "rejected" and rejected.error is not None
    assert rejected.error.type == "invalid_request"
    assert "memory_limit" in rejected.error.message


async def test_stdout_flood_is_truncated(stack: Stack) -> None:
    code = "import sys\nfor _ in range(100_000):\n    sys.stdout.write('y' * 99 + '\\n')\n"
    result = await stack.run_job(job(code))
    assert result.success
    assert result.stdout_truncated and not result.stderr_truncated
    assert len(result.stdout.encode()) == 64 * 1024


async def test_invalid_output_and_non_utf8(stack: Stack) -> None:
    bad_json = job("open('/output/result.json', 'w').write('{not json')")
    binary = job("import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe end')")
    found = await stack.run_jobs([bad_json, binary])
    r = found[str(bad_json["execution_id"])]
    assert r.output is None and r.error is not None and r.error.type == "invalid_output"
    assert "result.json" in r.error.message
    b = found[str(binary["execution_id"])]
    assert b.success and b.stdout.startswith("ok ") and b.stdout.endswith(" end")


async def test_lockdown_seen_from_inside(stack: Stack) -> None:
    code = (
        "import json, os, socket\n"
        "facts = {'uid': os.getuid(), 'gid': os.getgid()}\n"
        "status = open('/proc/self/status').read()\n"
        "facts['capeff'] = status.split('CapEff:')[1].split()[0]\n"
        "facts['nonewprivs'] = status.split('NoNewPrivs:')[1].split()[0]\n"
        "def attempt(fn):\n"
        "    try:\n        fn(); return 'allowed'\n"
        "    except Exception as exc:\n        return type(exc).__name__\n"
        "facts['write_root'] = attempt(lambda: open('/evil', 'w'))\n"
        "facts['write_input'] = attempt(lambda: open('/input/data.json', 'w'))\n"
        "facts['chmod_input'] = attempt(lambda: os.chmod('/input/data.json', 0o666))\n"
        "facts['write_code'] = attempt(lambda: open('/code/main.py', 'a'))\n"
        # No traffic is sent anywhere: the container must simply have no route out.
        "facts['routes'] = open('/proc/net/route').read().splitlines()[1:]\n"
        "facts['udp'] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
        ".connect(('192.0.2.1', 9)))\n"
        "facts['ifaces'] = sorted(os.listdir('/sys/class/net'))\n"
        "facts['environ'] = sorted(os.environ)\n"
        "json.dump(facts, open('/output/result.json', 'w'))\n"
    )
    result = await stack.run_job(job(code))
    assert result.success, result.stderr
    facts = result.output
    assert facts["uid"] == 65534 and facts["gid"] == 65534
    assert facts["capeff"] == "0000000000000000"
    assert facts["nonewprivs"] == "1"
    assert facts["write_root"] in ("OSError", "PermissionError")
    assert facts["write_input"] == "PermissionError"
    assert facts["chmod_input"] == "PermissionError"
    assert facts["write_code"] == "PermissionError"
    assert facts["routes"] == []  # no default route, no interface but loopback
    assert facts["udp"] == "OSError"  # ENETUNREACH: connecting a UDP socket sends nothing
    assert facts["ifaces"] == ["lo"]
    assert set(facts["environ"]) <= {
        "PATH",
        "HOME",
        "LANG",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "LC_CTYPE",
    }


async def test_invalid_messages_get_a_result_and_a_dlq_record(stack: Stack) -> None:
    settings = stack.settings
    garbage = b"\xff\xfe not json at all \x00"
    headers = [(CORRELATION_HEADER, b"corr-garbage"), ("x-extra", b"\x01\x02")]
    keyed_id = str(uuid.uuid4())
    cases = {
        "garbage": (garbage, keyed_id.encode(), headers),
        "validation": (
            orjson.dumps({"execution_id": "bad-1" + keyed_id[:8], "code": "", "timeout": 999}),
            None,
            [],
        ),
        "unknown_type": (
            orjson.dumps({"execution_id": "bad-2" + keyed_id[:8], "code": "1", "job_type": "gpu"}),
            None,
            [],
        ),
    }
    dlq = AIOKafkaConsumer(
        settings.dlq_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    async with ResultReader(settings) as reader, Producer(settings) as producer:
        for value, key, hdrs in cases.values():
            await producer.send_raw(value, key=key, headers=hdrs)
        expected = {keyed_id, "bad-1" + keyed_id[:8], "bad-2" + keyed_id[:8]}
        found = await reader.wait_for(expected, 60)
    assert set(found) == expected
    g = found[keyed_id]
    assert g.status == "rejected" and g.error is not None
    assert g.error.type == "invalid_request" and "not valid JSON" in g.error.message
    assert g.correlation_id == "corr-garbage"
    v = found["bad-1" + keyed_id[:8]]
    assert v.error is not None and "code" in v.error.message and "timeout" in v.error.message
    u = found["bad-2" + keyed_id[:8]]
    assert u.error is not None and "job_type" in u.error.message and "gpu" in u.error.message

    await dlq.start()
    try:
        records: dict[str, DLQRecord] = {}
        for _ in range(60):
            batch = await dlq.getmany(timeout_ms=500)
            for msgs in batch.values():
                for m in msgs:
                    rec = DLQRecord.model_validate_json(m.value or b"")
                    records[rec.execution_id] = rec
            if expected <= set(records):
                break
    finally:
        await dlq.stop()
    assert expected <= set(records)
    rec = records[keyed_id]
    assert base64.b64decode(rec.original_value) == garbage
    assert rec.original_key is not None and base64.b64decode(rec.original_key) == keyed_id.encode()
    assert [(k, base64.b64decode(v)) for k, v in rec.original_headers] == headers
    assert rec.error.type == "invalid_request" and rec.correlation_id == "corr-garbage"
    assert rec.source.topic == settings.requests_topic


async def test_correlation_id_round_trip(stack: Stack) -> None:
    settings = stack.settings
    request = job("print('traced')")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False
    )
    async with ResultReader(settings) as reader, Producer(settings) as producer:
        await producer.submit(request, correlation_id="trace-abc-123")
        found = await reader.wait_for({str(request["execution_id"])}, 60)
    result = found[str(request["execution_id"])]
    assert result.correlation_id == "trace-abc-123"
    # The header travels too, and the worker's log lines carry the id.
    await consumer.start()
    try:
        from aiokafka import TopicPartition

        parts = consumer.partitions_for_topic(settings.results_topic) or set()
        tps = [TopicPartition(settings.results_topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        header = None
        for _ in range(20):
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                for m in msgs:
                    if m.key == str(request["execution_id"]).encode():
                        header = dict(m.headers)[CORRELATION_HEADER]
            if header:
                break
    finally:
        await consumer.stop()
    assert header == b"trace-abc-123"
    # The worker logs the answer once it is sent, which may be after the result was read here
    # (seen under load): wait for the line, within a bound.
    deadline = asyncio.get_running_loop().time() + 30
    while "corr=trace-abc-123" not in stack.workers[0].log_path.read_text():
        assert asyncio.get_running_loop().time() < deadline, "no log line carries the id"
        await asyncio.sleep(0.1)


async def test_many_concurrent_jobs_all_answered(stack: Stack) -> None:
    requests = [
        job(
            "import json\nd = json.load(open('/input/data.json'))\n"
            "json.dump({'sq': d['n'] * d['n']}, open('/output/result.json', 'w'))",
            input_data={"n": n},
        )
        for n in range(40)
    ]
    found = await stack.run_jobs(requests, timeout=240)
    assert len(found) == 40
    for request in requests:
        result = found[str(request["execution_id"])]
        n = request["input_data"]["n"]  # type: ignore[index]
        assert result.success and result.output == {"sq": n * n}


async def test_large_requests_fetched_together_are_each_answered_with_their_own_input(
    stack: Stack,
) -> None:
    """More request bytes at once than the intake keeps decoded while they wait for a slot
    (``DECODED_AHEAD``): those past it wait as their bytes, decoded once they get a slot, and
    each is still answered with its own input."""
    pad = 300 * 1024
    assert 8 * pad > DECODED_AHEAD
    code = (
        "import json\nd = json.load(open('/input/data.json'))\n"
        "json.dump({'n': d['n'], 'ok': d['pad'] == str(d['n']) * len(d['pad'])},"
        " open('/output/result.json', 'w'))"
    )
    requests = [job(code, input_data={"n": n, "pad": str(n) * pad}) for n in range(8)]
    found = await stack.run_jobs(requests, timeout=240)
    for n, request in enumerate(requests):
        result = found[str(request["execution_id"])]
        assert result.success, (result.error, result.stderr)
        assert result.output == {"n": n, "ok": True}


async def test_reply_to_topic_also_gets_the_result(stack: Stack) -> None:
    settings = stack.settings
    reply_topic = f"{settings.results_topic}.replies"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:  # reply_to must name a topic that exists (the test runs warm and cold)
        if reply_topic not in await admin.list_topics():
            await admin.create_topics([NewTopic(reply_topic, 1, 1)])
    finally:
        await admin.close()
    request = job("print('hello')", reply_to=reply_topic)
    await stack.run_job(request)
    consumer = AIOKafkaConsumer(
        reply_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        keys: list[bytes | None] = []
        for _ in range(40):
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                keys += [m.key for m in msgs]
            if keys:
                break
    finally:
        await consumer.stop()
    # At least once (the delivery guarantee); never another job's result.
    assert keys and set(keys) == {str(request["execution_id"]).encode()}


async def test_cli_submit_wait_and_results(stack: Stack) -> None:
    code, out, _ = await stack.cli(
        "submit",
        "--code",
        "import json; json.dump({'ok': 1}, open('/output/result.json', 'w'))",
        "--wait",
        "--compact",
        "--execution-id",
        "cli-ok-" + stack.tag,
    )
    assert code == 0 and orjson.loads(out)["output"] == {"ok": 1}
    code, out, _ = await stack.cli("submit", "--code", "1/0", "--wait", "--compact")
    assert code == 1 and orjson.loads(out)["error"]["type"] == "division_error"
    code, out, _ = await stack.cli("results", "--execution-id", "cli-ok-" + stack.tag)
    assert code == 0 and orjson.loads(out.splitlines()[0])["execution_id"] == "cli-ok-" + stack.tag
    code, _, err = await stack.cli("submit", "--code", "1", "--input", "{nope")
    assert code == 2 and "--input is not valid JSON" in err
    code, _, err = await stack.cli(
        "submit", "--code", "1", TAKO_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1"
    )
    assert code == 4 and "cannot reach Kafka" in err
