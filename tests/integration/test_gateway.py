"""The HTTP gateway, black-box over HTTP, against a real worker and broker; and the seed guide's
Python snippets run as written against it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import orjson
import pytest
import requests

from tako_stream.client import Producer
from tako_stream.core.models import MAX_CORRELATION_CHARS
from tests.integration import seed_snippets
from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration]


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    stack: Stack

    async def call(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: Any
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method,
                self.url + path,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=180),
                **kw,
            ) as resp,
        ):
            return resp.status, await resp.json(), resp.headers

    async def raw(
        self, method: str, path: str, *, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, aiohttp.typedefs.LooseHeaders]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, self.url + path, headers=headers, timeout=aiohttp.ClientTimeout(total=60)
            ) as resp,
        ):
            return resp.status, await resp.read(), resp.headers


def start_gateway(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tako_stream", "gateway"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture(scope="module")
async def gw(
    bootstrap: str, docker: aiodocker.Docker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    workdir = tmp_path_factory.mktemp("gateway")
    stack = Stack(bootstrap=bootstrap, workdir=workdir)
    worker = stack.start_worker()
    port = 8000  # the seed guide's snippets hard-code localhost:8000; CI has it free
    env = {
        **os.environ,
        **{f"TAKO_{k.upper()}": str(v) for k, v in stack.env_settings().items()},
        "TAKO_GATEWAY_PORT": str(port),
        "TAKO_GATEWAY_HOST": "127.0.0.1",
        "TAKO_WORKER_ID": f"gateway-{stack.tag}",
        "TAKO_GATEWAY_STATE_DIR": str(workdir / "gateway-state"),
    }
    log = workdir / "gateway.log"
    proc = start_gateway(env, log)
    gateway = Gateway(f"http://127.0.0.1:{port}", proc, log, stack)
    try:
        await worker.wait_ready()
        for _ in range(120):
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{log.read_text()}")
            try:
                status, _, _ = await gateway.call("GET", "/health")
                if status == 200:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
        else:
            raise TimeoutError(f"gateway not up:\n{log.read_text()}")
        yield gateway
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        stack.stop_all()


async def test_execute_answers_tako_vm_sync_shape(gw: Gateway) -> None:
    code = (
        "import json\nwith open('/input/data.json') as f:\n    data = json.load(f)\n"
        "json.dump({'double': data['n'] * 2}, open('/output/result.json', 'w'))\nprint('hi')"
    )
    status, body, headers = await gw.call(
        "POST",
        "/execute",
        json={"code": code, "input_data": {"n": 21}},
        headers={"X-Correlation-ID": "gw-trace-1"},
    )
    assert status == 200, body
    assert headers["X-Correlation-ID"] == "gw-trace-1"
    assert body["success"] is True and body["output"] == {"double": 42}
    assert body["stdout"] == "hi\n" and body["exit_code"] == 0 and body["error"] is None
    assert body["job_type"] == "default" and body["execution_time"] > 0
    timing = body["timing"]  # Tako VM's phases
    assert timing["execution_ms"] >= 0 and timing["total_ms"] >= timing["execution_ms"]
    assert timing["phase_at_exit"] == "execution" and timing["dep_install_ms"] == 0

    # the correlation id reached the result on Kafka too
    status, record, _ = await gw.call("GET", f"/executions/{body['execution_id']}")
    assert status == 200 and record["correlation_id"] == "gw-trace-1"


async def test_execute_failures_are_http_200_with_the_error(gw: Gateway) -> None:
    status, body, _ = await gw.call(
        "POST", "/execute", json={"code": "x = 1 / 0", "input_data": {}}
    )
    assert status == 200
    assert body["success"] is False and body["exit_code"] == 1
    assert "ZeroDivisionError: division by zero" in body["stderr"]
    assert body["error_type"] == "division_error" and "division by zero" in body["error"]
    status, body, _ = await gw.call(
        "POST", "/execute", json={"code": "import time; time.sleep(60)", "timeout": 2}
    )
    assert status == 200 and body["error"] == "Execution timeout exceeded (2s)"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"code": "print(1)", "timeout": 999}, "timeout"),
        ({"code": ""}, "code"),
        ({"input_data": {}}, "code"),
        ({"code": "print(1)", "job_type": "no-such-type"}, "job_type"),
        ({"code": "print(1)", "memory_limit": "64g"}, "memory_limit"),
        ({"code": "print(1)", "surprise": 1}, "surprise"),
        # lineage is set by a rerun or a fork, never by a submit (Tako VM has no such field)
        ({"code": "print(1)", "parent_execution_id": "p", "relationship": "fork"}, "parent"),
    ],
)
async def test_invalid_requests_are_422_naming_the_field(
    gw: Gateway, payload: dict[str, Any], field: str
) -> None:
    for path in ("/execute", "/execute/async"):
        status, body, headers = await gw.call(
            "POST", path, json=payload, headers={"X-Correlation-ID": "bad-1"}
        )
        assert status == 422, body
        assert body["correlation_id"] == "bad-1" and headers["X-Correlation-ID"] == "bad-1"
        assert any(field in str(problem) for problem in body["detail"]), body


async def test_not_json_is_422(gw: Gateway) -> None:
    status, body, _ = await gw.call("POST", "/execute", data=b"\xff{not json")
    assert status == 422 and "correlation_id" in body


async def test_async_job_lifecycle(gw: Gateway) -> None:
    status, accepted, _ = await gw.call(
        "POST", "/execute/async", json={"code": "import time; time.sleep(1); print('later')"}
    )
    assert status == 200 and accepted == {"job_id": accepted["job_id"], "status": "queued"}
    job_id = accepted["job_id"]
    status, job, _ = await gw.call("GET", f"/jobs/{job_id}")
    assert status == 200 and job["job_id"] == job_id and job["created_at"]
    assert job["status"] in ("pending", "running", "succeeded")  # whatever it has reached by now
    status, record, _ = await gw.call("GET", f"/jobs/{job_id}/result?wait=true&timeout=120")
    assert status == 200 and record["status"] == "succeeded" and record["stdout"] == "later\n"
    status, job, _ = await gw.call("GET", f"/jobs/{job_id}")
    assert job["status"] == "succeeded" and job["duration_ms"] >= 1000
    assert job["queue_position"] is None
    status, listing, _ = await gw.call("GET", "/executions?limit=5")
    assert status == 200 and listing["limit"] == 5 and len(listing["items"]) <= 5
    assert listing["count"] == len(listing["items"]) and listing["offset"] == 0
    assert job_id in [item["execution_id"] for item in listing["items"]]
    status, page, _ = await gw.call("GET", "/executions?limit=1&offset=1&status=succeeded")
    assert status == 200 and len(page["items"]) == 1 and page["total"] >= 2
    assert page["has_more"] is (page["total"] > 2)
    status, default_page, _ = await gw.call("GET", "/executions")
    assert status == 200 and default_page["limit"] == 100  # Tako VM's default
    assert (await gw.call("GET", "/executions?limit=0"))[0] == 422


async def test_unknown_ids_are_404(gw: Gateway) -> None:
    missing = f"nothing-{uuid.uuid4()}"
    for path in (f"/jobs/{missing}", f"/jobs/{missing}/result", f"/executions/{missing}"):
        status, body, _ = await gw.call("GET", path)
        assert status == 404 and "detail" in body and "correlation_id" in body


async def test_idempotency_key(gw: Gateway) -> None:
    key = f"order-{uuid.uuid4()}"
    body = {"code": "print('once')", "idempotency_key": key}
    s1, first, _ = await gw.call("POST", "/execute/async", json=body)
    s2, second, _ = await gw.call("POST", "/execute/async", json=body)
    assert s1 == 200 and s2 == 200 and first["job_id"] == second["job_id"]
    assert first["status"] == "queued"
    s3, conflict, _ = await gw.call(
        "POST", "/execute/async", json={"code": "print('other')", "idempotency_key": key}
    )
    assert s3 == 409 and conflict["detail"] == "Idempotency key reused with different payload"
    assert conflict["existing_job_id"] == first["job_id"]
    status, record, _ = await gw.call(
        "GET", f"/jobs/{first['job_id']}/result?wait=true&timeout=120"
    )
    assert status == 200 and record["stdout"] == "once\n"
    # after it ran, the same key still names the same job, now finished
    s4, again, _ = await gw.call("POST", "/execute/async", json=body)
    assert s4 == 200 and again == {
        "job_id": first["job_id"],
        "status": "succeeded",
        "message": "Existing job returned (idempotent)",  # Tako VM's reference
    }


async def test_job_types(gw: Gateway) -> None:
    status, types, _ = await gw.call("GET", "/job-types")
    assert status == 200 and {"default", "data-processing"} <= {t["name"] for t in types}
    status, one, _ = await gw.call("GET", "/job-types/data-processing")
    assert status == 200 and one["name"] == "data-processing" and "image" in one
    # Tako VM's fields, then ours
    assert {
        "name",
        "requirements",
        "python_version",
        "memory_limit",
        "cpu_limit",
        "timeout",
        "session_enabled",
        "gpu_enabled",
        "gpu_vendor",
        "image_exists",
    } <= set(one)
    assert one["memory_limit"] == "512m" and one["timeout"] == 60 and one["cpu_limit"] == 1.0
    assert one["requirements"] == ["numpy==1.24.2", "pandas==1.5.3", "tabulate==0.8.9"]
    assert one["python_version"] == "3.11" and one["image_exists"] is True  # the worker says
    assert (await gw.call("GET", "/job-types/nope"))[0] == 404
    status, body, _ = await gw.call("POST", "/job-types/default/build")
    assert status == 501 and "scripts/build-images" in body["detail"], body
    assert (await gw.call("POST", "/job-types/nope/build"))[0] == 404


async def test_health_has_the_seed_shape(gw: Gateway) -> None:
    status, health, _ = await gw.call("GET", "/health")
    assert status == 200 and health["status"] == "healthy"
    assert health["docker_available"] is True
    assert set(health["circuit_breaker"]) == {
        "state",
        "failure_count",
        "success_count",
        "last_failure",
    }
    assert health["circuit_breaker"]["state"] == "closed"
    assert health["version"] and health["production_mode"] is False
    assert isinstance(health["gvisor_available"], bool) and health["workers"] >= 1
    stats = health["queue_stats"]
    assert set(stats) == {"pending", "running", "max_workers", "max_queue_size"}
    # the stack's worker is a member of the group: its pool's slots count
    assert stats["max_workers"] >= gw.stack.settings.pool_size
    status, pool, _ = await gw.call("GET", "/pool/stats")
    assert status == 200 and set(pool) == set(stats)


async def test_dlq_endpoints(gw: Gateway) -> None:
    async with Producer(gw.stack.settings) as producer:
        await producer.send_raw(b"\x00 not a request", key=None)
    for _ in range(120):
        status, listing, _ = await gw.call("GET", "/dlq")
        if listing["total"]:
            break
        await asyncio.sleep(0.5)
    assert status == 200 and listing["total"] >= 1
    assert listing["count"] == len(listing["items"]) and listing["limit"] == 100
    entry = listing["items"][0]
    assert entry["id"] == entry["dlq_id"] and entry["job_id"] == entry["execution_id"]  # Tako VM's
    assert entry["error_type"] == entry["error"]["type"] and entry["retry_count"] == 0
    status, stats, _ = await gw.call("GET", "/dlq/stats")
    assert stats["total"] == listing["total"]
    assert stats["by_error_type"].get("invalid_request", 0) >= 1
    status, one, _ = await gw.call("GET", f"/dlq/{entry['dlq_id']}")
    assert status == 200 and one["dlq_id"] == entry["dlq_id"]
    status, deleted, _ = await gw.call("DELETE", f"/dlq/{entry['dlq_id']}")
    assert status == 200 and deleted == {"status": "removed", "entry_id": entry["dlq_id"]}
    assert (await gw.call("GET", f"/dlq/{entry['dlq_id']}"))[0] == 404
    assert (await gw.call("DELETE", f"/dlq/{entry['dlq_id']}"))[0] == 404


async def test_openapi_document_is_served(gw: Gateway) -> None:
    status, doc, _ = await gw.call("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.") and "/execute" in doc["paths"]


async def test_seed_snippets_run_as_written(gw: Gateway) -> None:
    def run() -> dict[str, Any]:
        ok = seed_snippets.execute_safely("print(40 + 2)", {})
        broken = seed_snippets.execute_safely("def broken(", {})
        retried = seed_snippets.execute_with_retry("print(undefined)", {})
        handled: dict[str, str] = {}
        for name, code in (("syntax", "def broken("), ("timeout", "import time; time.sleep(9)")):
            result = seed_snippets.execute_safely(code, {}, timeout=2)
            # the guide hands handle_execution_result an async job's record (error by type)
            record = requests.get(
                f"{gw.url}/jobs/{result['execution_id']}/result", timeout=30
            ).json()
            try:
                seed_snippets.handle_execution_result(record)
            except Exception as exc:
                handled[name] = type(exc).__name__
        return {
            "ok": ok,
            "broken": broken,
            "retried": retried,
            "handled": handled,
            "issues": seed_snippets.check_system_health(),
        }

    out = await asyncio.to_thread(run)
    assert out["ok"]["success"] is True and out["ok"]["stdout"] == "42\n"
    assert out["broken"]["success"] is False and "SyntaxError" in out["broken"]["stderr"]
    assert out["retried"]["success"] is False and "NameError" in out["retried"]["stderr"]
    assert out["handled"] == {"syntax": "ValueError", "timeout": "ResourceError"}
    assert out["issues"] == []


async def test_gateway_metrics_count_requests_by_route(gw: Gateway) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    await gw.call("GET", "/job-types")
    await gw.call("GET", "/job-types/nope")
    # Other methods the HTTP parser takes (WebDAV's among them) are counted as one: "other".
    for method in ("PROPFIND", "PURGE", "MKCOL"):
        await gw.call(method, "/job-types")
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ok = frozenset({"method": "GET", "route": "/job-types", "code": "200"}.items())
    missing = frozenset({"method": "GET", "route": "/job-types/{name}", "code": "404"}.items())
    assert samples[("tako_http_requests_total", ok)] >= 1
    assert samples[("tako_http_requests_total", missing)] >= 1
    # aiohttp matches no route for a method it does not allow: "unmatched"
    other = frozenset({"method": "other", "route": "unmatched", "code": "405"}.items())
    assert samples[("tako_http_requests_total", other)] == 3
    assert "PROPFIND" not in text
    assert samples[("tako_breaker_state", frozenset())] == 0
    assert ("tako_dlq_size", frozenset()) in samples


async def test_every_answer_carries_tako_vms_security_headers_and_keys_are_checked(
    gw: Gateway,
) -> None:
    for method, path, kw in (
        ("GET", "/health", {}),
        ("GET", "/jobs/no-such-job", {}),
        ("POST", "/execute/async", {"json": {"code": "print(1)", "idempotency_key": "bad key!"}}),
    ):
        status, body, headers = await gw.call(method, path, **kw)
        assert headers["X-Content-Type-Options"] == "nosniff", (path, status)
        assert headers["X-Frame-Options"] == "DENY", (path, status)
        assert headers["X-XSS-Protection"] == "1; mode=block", (path, status)
    assert status == 422 and body["detail"][0]["loc"] == ["body", "idempotency_key"], body


async def test_a_job_type_pinned_to_its_version_runs_and_another_version_is_a_422(
    gw: Gateway,
) -> None:
    status, body, _ = await gw.call(
        "POST", "/execute", json={"code": "print('pinned')", "job_type": "default@1"}
    )
    assert status == 200 and body["success"] and body["stdout"] == "pinned\n", body
    assert body["job_type"] == "default@1"
    status, body, _ = await gw.call(
        "POST", "/execute", json={"code": "print(1)", "job_type": "default@2"}
    )
    assert status == 422 and "has no version '2'" in str(body["detail"]), body


FULL_VIEW = {
    "job_ref",
    "artifacts",
    "input_artifacts",
    "resource_usage",
    "code_hash",
    "input_hash",
    "parent_execution_id",
    "relationship",
    "stdout_truncated",
    "stderr_truncated",
    "idempotency_key",
}
RECORD = {
    "execution_id",
    "status",
    "job_type",
    "job_version",
    "created_at",
    "started_at",
    "ended_at",
    "duration_ms",
    "exit_code",
    "stdout",
    "stderr",
    "output",
    "error",
    "timing",
}


async def test_result_in_progress_is_200_and_a_wait_that_times_out_is_408(gw: Gateway) -> None:
    status, accepted, _ = await gw.call(
        "POST", "/execute/async", json={"code": "import time; time.sleep(30)", "timeout": 60}
    )
    job_id = accepted["job_id"]
    status, body, _ = await gw.call("GET", f"/jobs/{job_id}/result")
    assert status == 200 and body["job_id"] == job_id, body  # Tako VM: 200, not 202
    assert body["status"] in ("pending", "running") and body["message"] == "Job still in progress"
    status, body, _ = await gw.call("GET", f"/jobs/{job_id}/result?wait=true&timeout=1")
    assert status == 408 and body["detail"] == "Timeout waiting for job", body
    for bad in ("0", "301", "soon"):  # Tako VM: 1-300 s
        status, body, _ = await gw.call("GET", f"/jobs/{job_id}/result?wait=true&timeout={bad}")
        assert status == 422 and body["detail"][0]["loc"] == ["query", "timeout"], body
    status, body, _ = await gw.call("POST", f"/jobs/{job_id}/cancel?wait=true&timeout=inf")
    assert status == 422 and body["detail"][0]["loc"] == ["query", "timeout"], body  # bounded
    status, body, _ = await gw.call("POST", f"/jobs/{job_id}/cancel")
    assert status == 200 and body == {"status": "cancelled", "job_id": job_id}


async def test_records_have_tako_vms_shape_and_view_full(gw: Gateway) -> None:
    code = "import json; print(json.load(open('/input/data.json'))['n'] * 2)"
    status, body, _ = await gw.call("POST", "/execute", json={"code": code, "input_data": {"n": 4}})
    assert status == 200 and body["stdout"] == "8\n", body
    job_id = body["execution_id"]
    for path in (f"/jobs/{job_id}/result", f"/executions/{job_id}"):
        status, record, _ = await gw.call("GET", path)
        assert status == 200 and set(record) >= RECORD and not FULL_VIEW & set(record), record
        assert record["status"] == "succeeded" and record["job_type"] == "default"
        assert record["error"] is None and record["output"] is None
        assert record["timing"]["execution_ms"] == record["duration_ms"]
        assert record["timing"]["total_ms"] >= record["timing"]["execution_ms"]
        status, full, _ = await gw.call("GET", f"{path}?view=full")
        assert status == 200 and set(full) >= RECORD | FULL_VIEW, full
        assert full["relationship"] is None and full["artifacts"] == []
    status, page, _ = await gw.call("GET", "/executions?limit=3&view=full")
    assert status == 200 and all(set(item) >= RECORD | FULL_VIEW for item in page["items"])


async def test_rerun_and_fork_keep_the_input_and_record_the_lineage(gw: Gateway) -> None:
    code = "import json; print(json.load(open('/input/data.json'))['n'] * 2)"
    status, parent, _ = await gw.call(
        "POST", "/execute", json={"code": code, "input_data": {"n": 21}, "timeout": 20}
    )
    assert status == 200 and parent["stdout"] == "42\n", parent
    parent_id = parent["execution_id"]

    status, rerun, _ = await gw.call("POST", f"/jobs/{parent_id}/rerun", json={})
    assert status == 200 and rerun["status"] == "queued" and rerun["job_id"] != parent_id
    assert rerun["parent_execution_id"] == parent_id and rerun["relationship"] == "rerun"
    status, fork, _ = await gw.call(
        "POST",
        f"/jobs/{parent_id}/fork",
        json={"code": "import json; print(json.load(open('/input/data.json'))['n'] + 1)"},
    )
    assert status == 200 and fork["status"] == "queued", fork
    answers = {}
    for kind, job in (("rerun", rerun), ("fork", fork)):
        status, record, _ = await gw.call(
            "GET", f"/jobs/{job['job_id']}/result?wait=true&timeout=120&view=full"
        )
        assert status == 200 and record["parent_execution_id"] == parent_id, record
        assert record["relationship"] == kind
        answers[kind] = record
    assert answers["rerun"]["stdout"] == "42\n" and answers["fork"]["stdout"] == "22\n"
    status, original, _ = await gw.call("GET", f"/executions/{parent_id}?view=full")
    assert original["code_hash"] and original["input_hash"]
    # a rerun: the same code and input; a fork: new code, the same input
    assert answers["rerun"]["code_hash"] == original["code_hash"]
    assert answers["fork"]["code_hash"] != original["code_hash"]
    assert answers["rerun"]["input_hash"] == answers["fork"]["input_hash"] == original["input_hash"]

    # a rerun with no body at all, and one overriding the timeout
    status, again, _ = await gw.call("POST", f"/jobs/{parent_id}/rerun")
    assert status == 200, again
    status, again, _ = await gw.call("POST", f"/jobs/{parent_id}/rerun", json={"timeout": 5})
    assert status == 200, again

    # Tako VM's refusals
    status, body, _ = await gw.call("POST", f"/jobs/{parent_id}/fork", json={})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "code"], body
    status, body, _ = await gw.call("POST", f"/jobs/{parent_id}/rerun", json={"timeout": 0})
    assert status == 422, body
    status, body, _ = await gw.call("POST", f"/jobs/{parent_id}/rerun", json={"code": "x"})
    assert status == 422, body  # a rerun takes no code
    status, body, _ = await gw.call("POST", f"/jobs/nope-{uuid.uuid4()}/rerun", json={})
    assert status == 404 and body["detail"] == "Job not found", body
    status, running, _ = await gw.call(
        "POST", "/execute/async", json={"code": "import time; time.sleep(30)", "timeout": 60}
    )
    status, body, _ = await gw.call("POST", f"/jobs/{running['job_id']}/rerun", json={})
    assert status == 400 and body["detail"] == "Cannot rerun job that hasn't completed", body
    await gw.call("POST", f"/jobs/{running['job_id']}/cancel")


async def test_sync_execute_takes_an_idempotency_key(gw: Gateway) -> None:
    body = {"code": "import uuid; print(uuid.uuid4())", "idempotency_key": f"k-{uuid.uuid4()}"}
    status, first, _ = await gw.call("POST", "/execute", json=body)
    assert status == 200 and first["success"], first
    status, second, _ = await gw.call("POST", "/execute", json=body)
    # the same job: it ran once, so the random line is the same
    assert status == 200 and second["execution_id"] == first["execution_id"]
    assert second["stdout"] == first["stdout"]


async def test_artifacts_are_served_with_etags(gw: Gateway) -> None:
    code = (
        "open('/output/report.csv', 'w').write('a,b\\n1,2\\n')\n"
        "open('/output/notes.txt', 'w').write('hello')\n"
        "import os; os.symlink('/etc/passwd', '/output/passwd')"
    )
    status, body, _ = await gw.call("POST", "/execute", json={"code": code})
    assert status == 200 and body["success"], body
    job_id = body["execution_id"]
    status, full, _ = await gw.call("GET", f"/jobs/{job_id}/result?view=full")
    listed = {a["name"]: a for a in full["artifacts"]}
    assert set(listed) == {"report.csv", "notes.txt"}, full  # the link is not followed
    csv = listed["report.csv"]
    assert csv == {
        "name": "report.csv",
        "size_bytes": 8,
        "sha256": hashlib.sha256(b"a,b\n1,2\n").hexdigest(),
        "content_type": "text/csv",
    }
    path = f"/jobs/{job_id}/artifacts/report.csv"
    status, data, headers = await gw.raw("GET", path)
    assert status == 200 and data == b"a,b\n1,2\n"
    assert headers["ETag"] == f'"{csv["sha256"]}"' and headers["Content-Type"] == "text/csv"
    assert headers["Content-Disposition"] == 'attachment; filename="report.csv"'
    assert headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    status, data, headers = await gw.raw("HEAD", path)
    assert status == 200 and data == b"" and headers["Content-Length"] == "8"
    assert headers["ETag"] == f'"{csv["sha256"]}"'
    for method in ("GET", "HEAD"):
        status, data, _ = await gw.raw(method, path, headers={"If-None-Match": headers["ETag"]})
        assert status == 304 and data == b""
    status, data, _ = await gw.raw("GET", path, headers={"If-None-Match": '"other"'})
    assert status == 200 and data == b"a,b\n1,2\n"
    status, body, _ = await gw.call("GET", f"/jobs/{job_id}/artifacts/passwd")
    assert status == 404 and body["detail"] == "Artifact not found"
    status, body, _ = await gw.call("GET", f"/jobs/nope-{uuid.uuid4()}/artifacts/report.csv")
    assert status == 404 and body["detail"] == "Job not found"


@pytest.mark.parametrize(
    "code",
    [
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=5)",  # ENETUNREACH
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=5)",  # refused
        "import socket\nsocket.getaddrinfo('example.com', 80)",  # no name resolution
    ],
)
async def test_a_connect_to_the_outside_is_a_network_error(gw: Gateway, code: str) -> None:
    status, body, _ = await gw.call("POST", "/execute", json={"code": code})
    assert status == 200 and body["success"] is False, body
    assert body["error_type"] == "network_error", body  # Tako VM's type, not os_error


async def test_correlation_ids_that_are_not_printable_utf8_or_too_long_are_replaced(
    gw: Gateway,
) -> None:
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(  # bytes that are not UTF-8, as aiohttp's client cannot send them
        b"GET /job-types/nope HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        b"X-Correlation-ID: caf\xe9\r\n\r\n"
    )
    head, _, body = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 404"), head + body  # the handler's answer, not a bare 500
    fresh = uuid.UUID(orjson.loads(body)["correlation_id"])
    assert f"X-Correlation-ID: {fresh}".encode() in head

    # The longest id kept is also the longest a cancel carries: it reaches the worker.
    status, accepted, _ = await gw.call(
        "POST", "/execute/async", json={"code": "import time; time.sleep(30)", "timeout": 60}
    )
    assert status == 200, accepted
    longest = "c" * MAX_CORRELATION_CHARS
    status, body, headers = await gw.call(
        "POST",
        f"/jobs/{accepted['job_id']}/cancel?wait=true&timeout=120",
        headers={"X-Correlation-ID": longest},
    )
    assert status == 200 and headers["X-Correlation-ID"] == longest, body
    assert body["result"]["status"] == "cancelled", body


async def test_another_producers_result_no_answer_can_carry_is_no_result(gw: Gateway) -> None:
    """Anyone may write the results topic.  A result holding a number past 64 bits (pydantic
    reads it as an int, orjson cannot write it: a 500), in a field of ours or in the job's
    output or metadata, or a correlation id longer than a request's (served as is), was written
    by no worker: every route treats it as no result."""
    settings = gw.stack.settings
    tag = uuid.uuid4().hex[:8]
    huge = 123456789012345678901234567890
    base = {
        "correlation_id": "c",
        "status": "succeeded",
        "success": True,
        "exit_code": 0,
        "worker_id": "elsewhere",
        "finished_at": "2026-01-01T00:00:00+00:00",
    }
    forged = {
        f"exit-{tag}": {"exit_code": huge},
        f"usage-{tag}": {"resource_usage": {"cpu_time_ms": huge}},
        f"output-{tag}": {"output": {"n": [huge]}},
        f"metadata-{tag}": {"metadata": {"n": huge}},
        f"correlation-{tag}": {"correlation_id": "c" * (MAX_CORRELATION_CHARS + 1)},
    }
    fine = f"fine-{tag}"
    async with Producer(settings) as producer:
        for execution_id, fields in [*forged.items(), (fine, {})]:
            value = json.dumps({**base, "execution_id": execution_id, **fields}).encode()
            await producer.send_raw(value, key=execution_id.encode(), topic=settings.results_topic)
    # Another producer's result in our shape is served: the gateway has read the others too
    # (a lookup of an id it does not know first waits until it has read every topic's end).
    status, record, _ = await gw.call("GET", f"/executions/{fine}")
    assert status == 200 and record["status"] == "succeeded", record
    for execution_id in forged:
        for path in (
            f"/executions/{execution_id}",
            f"/executions/{execution_id}?view=full",
            f"/jobs/{execution_id}",
            f"/jobs/{execution_id}/result",
            f"/jobs/{execution_id}/result?view=full",
        ):
            status, body, _ = await gw.call("GET", path)
            assert status == 404, (path, body)
    status, page, _ = await gw.call("GET", "/executions?limit=1000")
    assert status == 200, page
    listed = {item["execution_id"] for item in page["items"]}
    assert fine in listed and not listed & set(forged)


async def test_query_values_no_store_can_take_are_422(gw: Gateway) -> None:
    for path in ("/executions", "/dlq"):
        status, body, _ = await gw.call("GET", f"{path}?offset=100000000000000000000")
        assert status == 422 and "offset" in body["detail"], body
    for name, when in (
        ("since", "0001-01-01T00:00:00+01:00"),
        ("until", "9999-12-31T23:59:59-01:00"),
    ):
        status, body, _ = await gw.call("GET", "/dlq", params={name: when})
        assert status == 422 and body["detail"].startswith(f"{name}: "), body
