"""The gateway's API, declared once: each route, the handler serving it and what it answers.

``ROUTES`` is what the aiohttp application registers (``app``) and what the OpenAPI document is
generated from (``openapi``), so the two cannot drift apart.  A route's ``answers`` are every
status it can send: its handler's own (``responses``), the 503 of a route that waits for the
gateway's store (``reads``), and the middleware's (``app``: 401, 413, 429, 500), each declared
here once rather than repeated on every route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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

#: A response's description, body model (None: any JSON object) and, optionally, the names of
#: headers it carries (``HEADERS``).
Response = tuple[str, type[BaseModel] | None] | tuple[str, type[BaseModel] | None, tuple[str, ...]]
ERROR: Response = ("Error: {detail, correlation_id}", ErrorBody)
ANY: Response = ("A JSON object", None)

#: Headers a response may carry: their description and JSON type.
HEADERS: dict[str, tuple[str, str]] = {
    "Retry-After": ("Seconds to wait before asking again", "integer"),
    "WWW-Authenticate": ('The scheme a key is given in: Bearer realm="tako-stream"', "string"),
}

# The middleware's answers (``app.Gateway._correlation``), on any route it lets through; every
# one is ``routes.error_response``'s body.
INTERNAL: Response = ("Error: a failure nothing foresaw (logged)", ErrorBody)
TOO_LARGE: Response = ("Error: a body larger than TAKO_GATEWAY_MAX_PAYLOAD_BYTES", ErrorBody)
UNAUTHORIZED: Response = (
    "Error: no valid API key (only when TAKO_GATEWAY_API_KEYS is set)",
    ErrorBody,
    ("WWW-Authenticate",),
)
RATE_LIMITED: Response = (
    "Error: rate limit exceeded (only when TAKO_GATEWAY_RATE_LIMIT is set)",
    ErrorBody,
    ("Retry-After",),
)
# A route that waits for the store (``views.NotReady``) answers 503 while it has not caught up
# with the topics, or cannot tell where they end, or a topic the answer needs cannot be read
# now; a page also when every page slot stays busy (``views.Busy``: then with Retry-After).
NOT_READY: Response = (
    "Error: the gateway's store has not caught up with the topics (or a topic cannot be read "
    "now): retry",
    ErrorBody,
)
PAGE_NOT_READY: Response = (
    "Error: the gateway's store has not caught up with the topics, or every page slot is "
    "busy (then with Retry-After): retry",
    ErrorBody,
    ("Retry-After",),
)
#: Whether a route waits for the gateway's store: for lookups, or for a page (which also waits
#: for a page slot).
Reads = Literal["store", "page"]


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
    #: Whether its handler waits for the gateway's store (503 while it cannot).
    reads: Reads | None = None
    #: Whether the rate limit applies to it (``app.UNLIMITED`` are the routes it does not).
    limited: bool = True
    #: Whether it wants an API key when keys are configured (``app.OPEN`` are those it does not).
    keyed: bool = True

    def __post_init__(self) -> None:
        if self.reads is not None and 503 in self.responses:
            raise ValueError(f"{self.method} {self.path}: its 503 is the store's (reads=)")

    @property
    def answers(self) -> dict[int, Response]:
        """Every status the route can send, by code: its handler's, the store's, the
        middleware's."""
        answers: dict[int, Response] = {413: TOO_LARGE, 500: INTERNAL, **self.responses}
        if self.keyed:
            answers[401] = UNAUTHORIZED
        if self.limited:
            answers[429] = RATE_LIMITED
        if self.reads is not None:
            answers[503] = PAGE_NOT_READY if self.reads == "page" else NOT_READY
        return dict(sorted(answers.items()))


_WAIT = (("wait", "boolean"), ("timeout", "number"))

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/execute",
        "execute",
        "Run code and wait for its result",
        {
            200: ("Finished (successfully or not)", SyncResponse),
            # An idempotency key used before with another payload, as on /execute/async.
            409: ERROR,
            422: ERROR,
            504: ERROR,
        },
        body=ExecutionRequest,
        reads="store",
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
        reads="store",
    ),
    Route(
        "GET",
        "/jobs/{id}",
        "job",
        "A job's status: pending (queue_position), running, or finished",
        {200: ("The job", JobStatusBody), 404: ERROR},
        reads="store",
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
        reads="store",
    ),
    Route(
        "POST",
        "/jobs/{id}/cancel",
        "cancel",
        "Cancel a queued or running job; ours: wait=true&timeout=N waits for its result",
        {200: ("Cancel sent", Cancelled), 404: ERROR, 422: ERROR},
        query=_WAIT,
        reads="store",
    ),
    Route(
        "POST",
        "/jobs/{id}/rerun",
        "rerun",
        "A new job with a finished job's code and input (lineage: relationship 'rerun')",
        {200: ("Queued", DerivedJob), 400: ERROR, 404: ERROR, 422: ERROR},
        body=RerunBody,
        reads="store",
    ),
    Route(
        "POST",
        "/jobs/{id}/fork",
        "fork",
        "A new job with new code on a job's input (lineage: relationship 'fork')",
        {200: ("Queued", DerivedJob), 400: ERROR, 404: ERROR, 422: ERROR},
        body=ForkBody,
        reads="store",
    ),
    Route(
        "GET",
        "/jobs/{id}/artifacts/{name}",
        "artifact",
        "A file the job left in /output (ETag: its SHA-256; If-None-Match: 304)",
        {200: ("The file's bytes", None), 304: ANY, 404: ERROR},
        reads="store",
    ),
    Route(
        "HEAD",
        "/jobs/{id}/artifacts/{name}",
        "artifact",
        "An artifact's Content-Length, Content-Type and ETag",
        {200: ANY, 304: ANY, 404: ERROR},
        reads="store",
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
        reads="page",
    ),
    Route(
        "GET",
        "/executions/{id}",
        "execution",
        "One finished execution (view=full: the full record)",
        {200: ("It", None), 404: ERROR},
        query=(("view", "string"),),
        reads="store",
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
    Route(
        "GET",
        "/health",
        "health",
        "Gateway health",
        {200: ANY, 503: ("The same body: the broker did not answer", None)},
    ),
    Route(
        "GET",
        "/ready",
        "ready",
        "Readiness: 200 once the gateway's store has caught up with the topics",
        {200: ANY, 503: ANY},
        limited=False,
        keyed=False,
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
        reads="page",
    ),
    Route("GET", "/dlq/stats", "dlq_stats", "DLQ totals by error type", {200: ANY}),
    Route(
        "GET",
        "/dlq/{id}",
        "dlq_get",
        "One DLQ entry",
        {200: ("It", DLQRecord), 404: ERROR},
        reads="store",
    ),
    Route(
        "DELETE",
        "/dlq/{id}",
        "dlq_delete",
        "Delete a DLQ entry (a tombstone on the DLQ topic)",
        {200: ANY, 404: ERROR},
        reads="store",
    ),
    Route(
        "GET",
        "/openapi.json",
        "openapi",
        "This document",
        {200: ANY},
        documented=False,
        limited=False,
        keyed=False,
    ),
    Route(
        "GET",
        "/metrics",
        "serve_metrics",
        "Prometheus metrics",
        {200: ANY},
        documented=False,
        limited=False,
    ),
)
