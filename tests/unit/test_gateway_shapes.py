"""The gateway's pure parts: names shared with the worker, payload digests, response shapes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiohttp.test_utils import make_mocked_request
from pydantic import ValidationError

from tako_stream.core.errors import ErrorType, Status
from tako_stream.core.models import Artifact, ErrorInfo, ExecutionRequest, ExecutionResult
from tako_stream.gateway import app
from tako_stream.gateway.api import ROUTES
from tako_stream.gateway.openapi import document as openapi_document
from tako_stream.gateway.routes import wait_query
from tako_stream.gateway.shapes import execution_record, iso_ms, payload_digest, sync_response
from tako_stream.settings import Settings


def test_breaker_changelog_name_is_the_one_faust_uses() -> None:
    from tako_stream.worker.app import build

    settings = Settings(consumer_group="gname", worker_id="w-unit")
    app, _ = build(settings)
    (table,) = app.tables.values()
    assert table.changelog_topic.get_topic_name() == settings.breaker_changelog_topic


def test_payload_digest_ignores_key_order_and_the_idempotency_key() -> None:
    a = payload_digest({"code": "print(1)", "input_data": {"x": 1, "y": 2}, "idempotency_key": "k"})
    b = payload_digest({"input_data": {"y": 2, "x": 1}, "code": "print(1)"})
    c = payload_digest({"code": "print(2)", "input_data": {"x": 1, "y": 2}})
    assert a == b != c


def test_sync_response_has_tako_vm_fields_with_a_string_error() -> None:
    result = ExecutionResult(
        execution_id="e1",
        correlation_id="c1",
        status=Status.FAILED,
        success=False,
        stderr="Traceback ...\nZeroDivisionError: division by zero\n",
        exit_code=1,
        error=ErrorInfo(type=ErrorType.DIVISION_ERROR, message="division by zero"),
        execution_time=0.05,
        job_type="default",
        worker_id="w",
        finished_at=datetime.now(UTC),
    )
    body = sync_response(result).model_dump(mode="json")
    tako_vm = {"success", "output", "execution_time", "stdout", "stderr", "exit_code", "error"}
    assert tako_vm | {"job_type"} <= set(body)
    assert body["error"] == "division by zero" and body["error_type"] == "division_error"


def test_openapi_lists_every_route_and_resolves_its_refs() -> None:
    doc = openapi_document()
    assert {
        "/execute",
        "/execute/async",
        "/jobs/{id}",
        "/jobs/{id}/result",
        "/executions",
        "/executions/{id}",
        "/job-types",
        "/job-types/{name}",
        "/health",
        "/dlq",
        "/dlq/stats",
        "/dlq/{id}",
    } <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    refs = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    refs.add(v.rsplit("/", 1)[-1])
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs and refs <= set(schemas), refs - set(schemas)


def test_openapi_declares_the_store_s_503_and_the_protections_answers() -> None:
    doc = openapi_document()
    error = {"$ref": "#/components/schemas/ErrorBody"}  # what routes.error_response sends
    store_readers = set()
    for route in ROUTES:
        if not route.documented:
            continue
        answers = doc["paths"][route.path][route.method.lower()]["responses"]
        for code in ("413", "500"):
            assert answers[code]["content"]["application/json"]["schema"] == error
        assert ("401" in answers) is (route.path not in app.OPEN), route.path
        assert ("429" in answers) is (route.path not in app.UNLIMITED), route.path
        if "429" in answers:
            assert set(answers["429"]["headers"]) == {"Retry-After"}
        if route.reads is not None:
            store_readers.add(route.path)
            busy = answers["503"]
            assert busy["content"]["application/json"]["schema"] == error, route.path
            # Only a page waits for a page slot, and only that 503 carries a Retry-After.
            assert ("headers" in busy) is (route.reads == "page"), route.path
    assert {"/dlq", "/executions"} == {r.path for r in ROUTES if r.reads == "page"}
    assert {
        "/execute",
        "/execute/async",
        "/jobs/{id}",
        "/jobs/{id}/result",
        "/jobs/{id}/cancel",
        "/jobs/{id}/rerun",
        "/jobs/{id}/fork",
        "/jobs/{id}/artifacts/{name}",
        "/executions",
        "/executions/{id}",
        "/dlq",
        "/dlq/{id}",
    } == store_readers


def test_the_protections_spare_the_routes_they_spared() -> None:
    # The sets now come from the route table: the same routes as when they were literals.
    assert {"/openapi.json", "/metrics", "/ready"} == app.UNLIMITED
    assert {"/openapi.json", "/ready"} == app.OPEN


@pytest.mark.parametrize(
    ("key", "valid"),
    [
        ("order-12", True),
        ("A_b-9" * 51, True),  # 255 characters
        ("short-1", False),  # 7 characters
        ("x" * 256, False),
        ("order 1234", False),
        ("order/1234", False),
        ("ordér-1234", False),
        ("", False),
    ],
)
def test_idempotency_keys_follow_tako_vms_rule(key: str, valid: bool) -> None:
    """8-255 letters, digits, '-' and '_', as Tako VM accepts them; anything else is a 422."""
    body = {"code": "print(1)", "idempotency_key": key}
    if valid:
        assert ExecutionRequest.model_validate(body).idempotency_key == key
    else:
        with pytest.raises(ValidationError):
            ExecutionRequest.model_validate(body)


@pytest.mark.parametrize("produced_ms", [10**18, -(10**18), 2**63 - 1])
def test_a_timestamp_no_date_can_hold_is_no_created_at(produced_ms: int) -> None:
    assert iso_ms(produced_ms) is None  # any producer sets CreateTime: never a 500
    assert iso_ms(1_700_000_000_000) == "2023-11-14T22:13:20+00:00"


@pytest.mark.parametrize(
    "query", ["timeout=0", "timeout=301", "timeout=inf", "timeout=nan", "timeout=soon"]
)
def test_every_wait_is_bounded_as_tako_vm_bounds_it(query: str) -> None:
    request = make_mocked_request("GET", f"/jobs/x/cancel?wait=true&{query}")
    with pytest.raises(ValueError):
        wait_query(request)
    assert wait_query(make_mocked_request("GET", "/x?wait=true&timeout=300")) == (True, 300.0)
    assert wait_query(make_mocked_request("GET", "/x")) == (False, 30.0)


@pytest.mark.parametrize(
    "name", ['a"; filename*=x', "a\r\nSet-Cookie: x", "../etc", ".hidden", "", "x" * 129]
)
def test_an_artifact_listing_cannot_carry_a_name_headers_would_break_on(name: str) -> None:
    listing = {"name": name, "size_bytes": 1, "sha256": "0" * 64, "content_type": "text/plain"}
    with pytest.raises(ValidationError):
        Artifact.model_validate(listing)


@pytest.mark.parametrize("started_at", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
def test_a_created_at_utc_cannot_hold_is_given_as_the_result_says(started_at: str) -> None:
    result = ExecutionResult(
        execution_id="e1",
        correlation_id="c1",
        status=Status.SUCCEEDED,
        success=True,
        worker_id="w",
        started_at=datetime.fromisoformat(started_at),
        finished_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    # No request record to date it: started_at, the same instant, not an OverflowError.
    record = execution_record(result, created_at=None)
    assert record["created_at"] == record["started_at"] == started_at
    assert execution_record(result, created_at="2026-01-01T00:00:00+00:00")["created_at"] == (
        "2026-01-01T00:00:00+00:00"
    )
