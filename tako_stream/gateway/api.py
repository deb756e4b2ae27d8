"""The gateway's API, declared once: each route, the handler serving it and what it answers.

``ROUTES`` is what the aiohttp application registers (``app``) and what the OpenAPI document is
generated from (``openapi``), so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from tako_stream.core.models import DLQRecord, ExecutionRequest
from tako_stream.gateway.shapes import (
    Cancelled,
    DerivedJob,
    ErrorBody,
    ForkBody,
    JobAccepted,
    JobStatusBody,
    Page,
    RerunBody,
    SyncResponse,
)

#: A response's description and body model (None: any JSON object).
Response = tuple[str, type[BaseModel] | None]
ERROR: Response = ("Error: {detail, correlation_id}", ErrorBody)
ANY: Response = ("A JSON object", None)


@dataclass(frozen=True)
class Route:
    """One operation: where it is, which ``Routes`` method serves it, and what it answers."""

    method: str
    path: str
    handler: str
    summary: str
    responses: dict[int, Response]
    body: type[BaseModel] | None = None
    #: Query parameters: name and JSON type.
    query: tuple[tuple[str, str], ...] = ()
    documented: bool = True


_WAIT = (("wait", "boolean"), ("timeout", "number"))

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/execute",
        "execute",
        "Run code and wait for its result",
        {200: ("Finished (successfully or not)", SyncResponse), 422: ERROR, 504: ERROR},
        body=ExecutionRequest,
    ),
    Route(
        "POST",
        "/execute/async",
        "execute_async",
        "Queue code; idempotent with idempotency_key",
        {
            200: ("Queued, or the job an idempotency key already names", JobAccepted),
            409: ERROR,
            422: ERROR,
        },
        body=ExecutionRequest,
    ),
    Route(
        "GET",
        "/jobs/{id}",
        "job",
        "A job's status: pending (queue_position), running, or finished",
        {200: ("The job", JobStatusBody), 404: ERROR},
    ),
    Route(
        "GET",
        "/jobs/{id}/result",
        "job_result",
        "A job's execution record; wait=true&timeout=N (1-300) waits for it",
        {
            200: ("The record (view=full: the full one), or the job still in progress", None),
            404: ERROR,
            408: ERROR,
            422: ERROR,
        },
        query=(*_WAIT, ("view", "string")),
    ),
    Route(
        "POST",
        "/jobs/{id}/cancel",
        "cancel",
        "Cancel a queued or running job; ours: wait=true&timeout=N waits for its result",
        {200: ("Cancel sent", Cancelled), 404: ERROR},
        query=_WAIT,
    ),
    Route(
        "POST",
        "/jobs/{id}/rerun",
        "rerun",
        "A new job with a finished job's code and input (lineage: relationship 'rerun')",
        {200: ("Queued", DerivedJob), 400: ERROR, 404: ERROR, 422: ERROR},
        body=RerunBody,
    ),
    Route(
        "POST",
        "/jobs/{id}/fork",
        "fork",
        "A new job with new code on a job's input (lineage: relationship 'fork')",
        {200: ("Queued", DerivedJob), 400: ERROR, 404: ERROR, 422: ERROR},
        body=ForkBody,
    ),
    Route(
        "GET",
        "/jobs/{id}/artifacts/{name}",
        "artifact",
        "A file the job left in /output (ETag: its SHA-256; If-None-Match: 304)",
        {200: ("The file's bytes", None), 304: ANY, 404: ERROR},
    ),
    Route(
        "HEAD",
        "/jobs/{id}/artifacts/{name}",
        "artifact",
        "An artifact's Content-Length, Content-Type and ETag",
        {200: ANY, 304: ANY, 404: ERROR},
    ),
    Route(
        "GET",
        "/executions",
        "executions",
        "Finished executions, newest first",
        {200: ("A page", Page), 422: ERROR},
        query=(
            ("limit", "integer"),
            ("offset", "integer"),
            ("status", "string"),
            ("job_type", "string"),
            ("view", "string"),
        ),
    ),
    Route(
        "GET",
        "/executions/{id}",
        "execution",
        "One finished execution (view=full: the full record)",
        {200: ("It", None), 404: ERROR},
        query=(("view", "string"),),
    ),
    Route("GET", "/pool/stats", "pool_stats", "The cluster's queue", {200: ANY}),
    Route("GET", "/job-types", "list_job_types", "Job types", {200: ANY}),
    Route(
        "GET",
        "/job-types/{name}",
        "get_job_type",
        "One job type",
        {200: ANY, 404: ERROR},
    ),
    Route(
        "POST",
        "/job-types/{name}/build",
        "build_job_type",
        "Tako VM's image build: images are built on the workers' hosts (501)",
        {501: ERROR, 404: ERROR},
    ),
    Route("GET", "/health", "health", "Gateway health", {200: ANY}),
    Route(
        "GET",
        "/ready",
        "ready",
        "Readiness: 200 once the gateway's store has caught up with the topics",
        {200: ANY, 503: ANY},
    ),
    Route(
        "GET",
        "/dlq",
        "dlq_list",
        "DLQ entries, oldest first",
        {200: ("A page", Page), 422: ERROR},
        query=(
            ("error_type", "string"),
            ("limit", "integer"),
            ("offset", "integer"),
            ("since", "string"),
            ("until", "string"),
        ),
    ),
    Route("GET", "/dlq/stats", "dlq_stats", "DLQ totals by error type", {200: ANY}),
    Route("GET", "/dlq/{id}", "dlq_get", "One DLQ entry", {200: ("It", DLQRecord), 404: ERROR}),
    Route(
        "DELETE",
        "/dlq/{id}",
        "dlq_delete",
        "Delete a DLQ entry (a tombstone on the DLQ topic)",
        {200: ANY, 404: ERROR},
    ),
    Route("GET", "/openapi.json", "openapi", "This document", {200: ANY}, documented=False),
    Route("GET", "/metrics", "serve_metrics", "Prometheus metrics", {200: ANY}, documented=False),
)
