"""The HTTP gateway: Tako VM's REST API, served over Kafka.

Clients written for Tako VM (``requests.post("http://localhost:8000/execute", json=...)``) run
unchanged. The gateway keeps nothing Kafka does not hold: a request is produced to the requests
topic, results come from the results topic (read from the beginning into a bounded local view),
a running job is one a worker announced on the status topic, a queued one has its request on
the requests topic and neither, a cancel is a record on the control topic, and the DLQ is the
DLQ topic. Any number of gateways can run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tako_stream import __version__, dlq
from tako_stream.client import CancelRefused, Client, latest_record
from tako_stream.core.errors import InvalidRequestError
from tako_stream.core.jobtypes import JobTypes
from tako_stream.core.models import CORRELATION_HEADER, ExecutionRequest, ExecutionResult, JobStatus
from tako_stream.kafka.codec import new_id
from tako_stream.kafka.topics import ensure_topics, tail
from tako_stream.logs import configure, job_context
from tako_stream.metrics import BREAKER_VALUES, CONTENT_TYPE, Metric, Metrics, gauge
from tako_stream.settings import Settings
from tako_stream.worker.breaker.state import BreakerConfig, BreakerState, State, changelog_topic
from tako_stream.worker.execute import resolve_limits

log = logging.getLogger(__name__)

CORRELATION_HTTP_HEADER = "X-Correlation-ID"
PAYLOAD_HEADER = "x-tako-payload-sha256"
#: Idempotency keys map to execution ids in this namespace, so every gateway agrees on them.
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1b7a52-7f0e-4b8e-9f3c-1d2a3b4c5d6e")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AsyncExecuteBody(ExecutionRequest):
    """``POST /execute/async``: a request, and optionally the key that makes it idempotent."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"title": "AsyncExecuteBody"})

    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Same key and payload: the same job. Same key, another payload: 409.",
    )


class SyncResponse(BaseModel):
    """Tako VM's synchronous answer (``error`` is a message string, as in its guide)."""

    success: bool
    output: Any = None
    execution_time: float
    stdout: str
    stderr: str
    exit_code: int | None
    error: str | None
    job_type: str | None
    execution_id: str
    error_type: str | None = Field(description="The classified error type, when it failed.")


class JobAccepted(BaseModel):
    job_id: str
    status: str


def sync_response(result: ExecutionResult) -> SyncResponse:
    return SyncResponse(
        success=result.success,
        output=result.output,
        execution_time=result.execution_time,
        stdout=result.stdout,
        stderr=result.stderr,
        exit_code=result.exit_code,
        error=result.error.message if result.error else None,
        job_type=result.job_type,
        execution_id=result.execution_id,
        error_type=result.error.type.value if result.error else None,
    )


def job_record(result: ExecutionResult) -> dict[str, Any]:
    """An execution record: the full result, with ``job_id`` as Tako VM's clients expect."""
    return {"job_id": result.execution_id, **result.model_dump(mode="json")}


def payload_digest(body: dict[str, Any]) -> str:
    """The request as submitted, minus its idempotency key, hashed in canonical JSON."""
    content = {k: v for k, v in body.items() if k != "idempotency_key"}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _json(data: Any, status: int = 200) -> web.Response:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(request: web.Request, status: int, detail: Any) -> web.Response:
    return _json({"detail": detail, "correlation_id": request["correlation_id"]}, status)


def _wait_query(request: web.Request) -> tuple[bool, float]:
    """``?wait=true&timeout=N`` (30 s by default); ValueError when the timeout is no number."""
    wait = request.query.get("wait", "false").lower() in ("1", "true", "yes")
    return wait, max(0.0, float(request.query.get("timeout", "30")))


class Gateway:
    """The routes, over one Kafka client shared by every HTTP request."""

    def __init__(self, settings: Settings, job_types: JobTypes) -> None:
        self.settings = settings
        self.job_types = job_types
        self.client = Client(settings, keep=settings.gateway_keep, history=True)
        self.dlq = dlq.DLQStore(keep_originals=False)
        #: Jobs a worker said it is running (the status topic), the newest ``gateway_keep``.
        self.running: OrderedDict[str, JobStatus] = OrderedDict()
        self.breakers: dict[str, BreakerState] = {}  # endpoint -> state, from the changelog
        self._breaker_config = BreakerConfig(
            failure_threshold=settings.breaker_failure_threshold,
            reset_timeout=settings.breaker_reset_timeout,
            success_threshold=settings.breaker_success_threshold,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics = Metrics()
        self.metrics.add_gauges(self._gauges)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await ensure_topics(self.settings)
        await self.client.start()
        self._tasks.append(asyncio.create_task(dlq.follow(self.settings, self.dlq)))
        topic = changelog_topic(self.settings.consumer_group)
        self._tasks.append(asyncio.create_task(tail(self.settings, topic, self._apply_breaker)))
        self._tasks.append(
            asyncio.create_task(tail(self.settings, self.settings.status_topic, self._apply_status))
        )

    def _apply_status(self, key: bytes | None, value: bytes | None) -> None:
        if value is None:
            if key is not None:
                self.running.pop(key.decode("utf-8", "replace"), None)
            return
        try:
            status = JobStatus.model_validate_json(value)
        except ValueError:
            return
        self.running[status.execution_id] = status
        self.running.move_to_end(status.execution_id)
        while len(self.running) > self.settings.gateway_keep:
            self.running.popitem(last=False)

    def _apply_breaker(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        endpoint = key.decode("utf-8", "replace")
        try:
            if value is None:
                self.breakers.pop(endpoint, None)
            else:
                self.breakers[endpoint] = BreakerState.model_validate_json(value)
        except ValueError:
            log.warning("unreadable breaker state for %s", endpoint)

    def breaker(self) -> BreakerState:
        """The worst breaker of the Docker engines the workers use (closed when none failed)."""
        now = datetime.now(UTC)
        states = [s.effective(now, self._breaker_config) for s in self.breakers.values()]
        rank = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}
        worst = max(states, key=lambda s: rank[s.state], default=None)
        return worst or BreakerState(endpoint="-")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.client.close()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._correlation], client_max_size=4 << 20)
        routes = [
            web.post("/execute", self.execute),
            web.post("/execute/async", self.execute_async),
            web.get("/jobs/{id}", self.job),
            web.get("/jobs/{id}/result", self.job_result),
            web.post("/jobs/{id}/cancel", self.cancel),
            web.get("/executions", self.executions),
            web.get("/executions/{id}", self.execution),
            web.get("/job-types", self.list_job_types),
            web.get("/job-types/{name}", self.get_job_type),
            web.get("/health", self.health),
            web.get("/dlq", self.dlq_list),
            web.get("/dlq/stats", self.dlq_stats),
            web.get("/dlq/{id}", self.dlq_get),
            web.delete("/dlq/{id}", self.dlq_delete),
            web.get("/openapi.json", self.openapi),
            web.get("/metrics", self.serve_metrics),
        ]
        app.add_routes(routes)

        async def on_startup(_: web.Application) -> None:
            await self.start()

        async def on_cleanup(_: web.Application) -> None:
            await self.stop()

        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        return app

    @web.middleware
    async def _correlation(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every request gets a correlation id (the caller's, or a new one), echoed back."""
        correlation_id = request.headers.get(CORRELATION_HTTP_HEADER) or new_id()
        request["correlation_id"] = correlation_id[:256]
        with job_context("-", request["correlation_id"]):
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = _error(request, exc.status, exc.reason)
            except Exception:
                log.exception("gateway error on %s %s", request.method, request.path)
                response = _error(request, 500, "internal error")
        response.headers[CORRELATION_HTTP_HEADER] = request["correlation_id"]
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "unmatched"
        self.metrics.http.labels(request.method, path, str(response.status)).inc()
        return response

    def _gauges(self) -> Iterable[Metric]:
        state = self.breaker()
        yield gauge(
            "tako_breaker_state",
            "The shared Docker circuit breaker, worst endpoint: 0 closed, 1 half-open, 2 open.",
            {(): BREAKER_VALUES[state.state]},
            [],
        )
        yield gauge(
            "tako_dlq_size", "Entries in the DLQ topic now.", {(): len(self.dlq.entries)}, []
        )
        yield gauge(
            "tako_executions_known",
            "Finished executions in this gateway's view of the results topic.",
            {(): len(self.client._recent)},
            [],
        )

    async def serve_metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # -- submitting ------------------------------------------------------------------------
    async def _body(self, request: web.Request, model: type[ExecutionRequest]) -> Any:
        """The validated body, or a 422 response naming every problem (FastAPI's shape)."""
        try:
            raw = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _error(request, 422, [{"loc": ["body"], "msg": f"invalid JSON: {exc}"}])
        if not isinstance(raw, dict):
            return _error(request, 422, [{"loc": ["body"], "msg": "must be a JSON object"}])
        try:
            body = model.model_validate(raw)
            resolve_limits(body, self.job_types)
        except ValidationError as exc:
            problems = [
                {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
            return _error(request, 422, problems)
        except InvalidRequestError as exc:
            problems = [{"loc": ["body", e.split(":")[0]], "msg": e} for e in exc.errors]
            return _error(request, 422, problems)
        return body, raw

    async def _produce(
        self, request: web.Request, body: ExecutionRequest, extra_headers: list[tuple[str, bytes]]
    ) -> str:
        fields = body.model_dump(mode="json", exclude_none=True)
        fields.pop("idempotency_key", None)
        fields.setdefault("execution_id", new_id())
        headers = [(CORRELATION_HEADER, request["correlation_id"].encode()), *extra_headers]
        await self.client._producer.send_raw(
            orjson.dumps(fields), key=fields["execution_id"].encode(), headers=headers
        )
        return str(fields["execution_id"])

    async def execute(self, request: web.Request) -> web.StreamResponse:
        """Run and wait: HTTP 200 whatever the code did; 504 if no result came in time."""
        parsed = await self._body(request, ExecutionRequest)
        if isinstance(parsed, web.Response):
            return parsed
        body, _ = parsed
        execution_id = await self._produce(request, body, [])
        limits = resolve_limits(body, self.job_types)
        wait = limits.timeout + self.settings.timeout_grace + self.settings.gateway_wait_margin
        try:
            result = await self.client.result(execution_id, timeout=wait)
        except TimeoutError:
            return _error(request, 504, f"no result for {execution_id} within {wait:g}s")
        return _json(sync_response(result))

    async def execute_async(self, request: web.Request) -> web.StreamResponse:
        parsed = await self._body(request, AsyncExecuteBody)
        if isinstance(parsed, web.Response):
            return parsed
        body, raw = parsed
        assert isinstance(body, AsyncExecuteBody)
        headers: list[tuple[str, bytes]] = []
        if body.idempotency_key is not None:
            digest = payload_digest(raw)
            execution_id = str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, body.idempotency_key))
            if body.execution_id not in (None, execution_id):
                return _error(request, 422, "execution_id cannot be given with idempotency_key")
            earlier = await latest_record(self.settings, self.settings.requests_topic, execution_id)
            if earlier is not None:
                seen = dict(earlier.headers or ()).get(PAYLOAD_HEADER, b"").decode()
                if seen != digest:
                    return _error(
                        request, 409, "idempotency_key was used before with another payload"
                    )
                return _json(JobAccepted(job_id=execution_id, status=self._status(execution_id)))
            body = body.model_copy(update={"execution_id": execution_id})
            headers.append((PAYLOAD_HEADER, digest.encode()))
        execution_id = await self._produce(request, body, headers)
        return _json(JobAccepted(job_id=execution_id, status="queued"), 202)

    # -- reading ---------------------------------------------------------------------------
    def _status(self, execution_id: str) -> str:
        result = self.client._recent.get(execution_id)
        if result is not None:
            return result.status.value
        return "running" if execution_id in self.running else "queued"

    async def _find(self, execution_id: str) -> tuple[str, ExecutionResult | None]:
        """("done", result), ("running" | "queued", None) or ("unknown", None)."""
        result = self.client._recent.get(execution_id)
        if result is not None:
            return "done", result
        with contextlib.suppress(TimeoutError):
            return "done", await self.client.result(execution_id, timeout=0.05)
        if execution_id in self.running:
            return "running", None
        req = await latest_record(self.settings, self.settings.requests_topic, execution_id)
        return ("queued", None) if req is not None else ("unknown", None)

    def _pending(self, execution_id: str, state: str) -> dict[str, Any]:
        record: dict[str, Any] = {"job_id": execution_id, "execution_id": execution_id}
        record["status"] = state
        if state == "running":
            status = self.running[execution_id]
            record |= {"worker_id": status.worker_id, "started_at": status.at.isoformat()}
        return record

    async def job(self, request: web.Request) -> web.StreamResponse:
        execution_id = request.match_info["id"]
        state, result = await self._find(execution_id)
        if result is not None:
            return _json(job_record(result))
        if state in ("queued", "running"):
            return _json(self._pending(execution_id, state))
        return _error(request, 404, f"no job {execution_id}")

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """Cancel a queued or running job (202); 409 once it finished.  With ``wait=true``,
        answers with the job's result when it arrives (``timeout`` seconds at most)."""
        execution_id = request.match_info["id"]
        try:
            wait, timeout = _wait_query(request)
        except ValueError:
            return _error(request, 422, "timeout must be a number of seconds")
        state, result = await self._find(execution_id)
        if state == "unknown":
            return _error(request, 404, f"no job {execution_id}")
        try:
            if result is not None:
                raise CancelRefused(execution_id, result)
            await self.client.cancel(execution_id, correlation_id=request["correlation_id"])
        except CancelRefused as exc:
            return _error(request, 409, str(exc))
        log.info("cancel requested for %s (%s)", execution_id, state)
        if wait:
            with contextlib.suppress(TimeoutError):
                result = await self.client.result(execution_id, timeout=timeout)
            if result is not None:
                return _json(job_record(result))
        return _json({"job_id": execution_id, "status": "cancelling", "was": state}, 202)

    async def job_result(self, request: web.Request) -> web.StreamResponse:
        """The record once finished; with ``wait=true``, waits up to ``timeout`` seconds."""
        execution_id = request.match_info["id"]
        try:
            wait, timeout = _wait_query(request)
        except ValueError:
            return _error(request, 422, "timeout must be a number of seconds")
        state, result = await self._find(execution_id)
        if state == "unknown":
            return _error(request, 404, f"no job {execution_id}")
        if result is None and wait:
            with contextlib.suppress(TimeoutError):
                result = await self.client.result(execution_id, timeout=timeout)
        if result is None:
            return _json({"job_id": execution_id, "status": self._status(execution_id)}, 202)
        return _json(job_record(result))

    async def execution(self, request: web.Request) -> web.StreamResponse:
        execution_id = request.match_info["id"]
        state, result = await self._find(execution_id)
        if result is None:
            return _error(request, 404, f"no finished execution {execution_id} ({state})")
        return _json(result)

    async def executions(self, request: web.Request) -> web.StreamResponse:
        """Finished executions, newest first: ``limit`` (≤ 1000), ``offset``, ``status``,
        ``job_type``."""
        try:
            limit = min(int(request.query.get("limit", "50")), 1000)
            offset = int(request.query.get("offset", "0"))
            if limit < 1 or offset < 0:
                raise ValueError
        except ValueError:
            return _error(request, 422, "limit must be 1..1000 and offset ≥ 0")
        status = request.query.get("status")
        job_type = request.query.get("job_type")
        items = [
            r
            for r in reversed(self.client.seen())
            if (status is None or r.status.value == status)
            and (job_type is None or r.job_type == job_type)
        ]
        page = items[offset : offset + limit]
        return _json(
            {
                "total": len(items),
                "limit": limit,
                "offset": offset,
                "items": [r.model_dump(mode="json") for r in page],
            }
        )

    async def list_job_types(self, request: web.Request) -> web.StreamResponse:
        return _json([t.model_dump(mode="json") for t in self.job_types.values()])

    async def get_job_type(self, request: web.Request) -> web.StreamResponse:
        job_type = self.job_types.get(request.match_info["name"])
        if job_type is None:
            return _error(request, 404, f"no job type {request.match_info['name']}")
        return _json(job_type)

    async def health(self, request: web.Request) -> web.StreamResponse:
        """Tako VM's shape: the shared circuit breaker (read from its table's changelog, so
        every gateway agrees with every worker), and whether the broker answers."""
        try:
            client = self.client._consumer
            assert client is not None
            await asyncio.wait_for(client._client.force_metadata_update(), 5)
            broker = True
        except Exception:
            broker = False
        state = self.breaker()
        docker_available = state.state is not State.OPEN
        healthy = broker and state.state is State.CLOSED
        return _json(
            {
                "status": "healthy" if healthy else "degraded",
                "docker_available": docker_available,
                "circuit_breaker": {
                    "state": state.state.value,
                    "failure_count": state.failure_count,
                    "success_count": state.success_count,
                    "last_failure": state.last_failure.isoformat() if state.last_failure else None,
                },
                "broker_available": broker,
                "version": __version__,
                "executions_known": len(self.client._recent),
                "dlq": self.dlq.stats(),
            },
            200 if broker else 503,
        )

    # -- DLQ -------------------------------------------------------------------------------
    async def dlq_stats(self, request: web.Request) -> web.StreamResponse:
        return _json(self.dlq.stats())

    async def dlq_list(self, request: web.Request) -> web.StreamResponse:
        try:
            since = dlq.parse_time(request.query.get("since"))
            until = dlq.parse_time(request.query.get("until"))
        except ValueError as exc:
            return _error(request, 422, str(exc))
        entries = self.dlq.select(
            error_type=request.query.get("error_type"), since=since, until=until
        )
        return _json(
            {"total": len(entries), "entries": [e.model_dump(mode="json") for e in entries]}
        )

    async def dlq_get(self, request: web.Request) -> web.StreamResponse:
        entry = self.dlq.entries.get(request.match_info["id"])
        if entry is None:
            return _error(request, 404, f"no DLQ entry {request.match_info['id']}")
        return _json(entry)

    async def dlq_delete(self, request: web.Request) -> web.StreamResponse:
        dlq_id = request.match_info["id"]
        if dlq_id not in self.dlq.entries:
            return _error(request, 404, f"no DLQ entry {dlq_id}")
        await dlq.delete(self.settings, [dlq_id])
        self.dlq.apply(dlq_id.encode(), None)
        return _json({"deleted": dlq_id})

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return _json(openapi_document())


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1, its schemas generated from the same pydantic models as the messages."""
    from pydantic.json_schema import models_json_schema

    from tako_stream.core.models import DLQRecord, JobType

    _, defs = models_json_schema(
        [
            (m, "validation" if m in (ExecutionRequest, AsyncExecuteBody) else "serialization")
            for m in (
                ExecutionRequest,
                AsyncExecuteBody,
                ExecutionResult,
                SyncResponse,
                JobAccepted,
                DLQRecord,
                JobType,
            )
        ],
        ref_template="#/components/schemas/{model}",
    )

    def ref(name: str) -> dict[str, Any]:
        return {
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}
        }

    error = {"description": "Error: {detail, correlation_id}"}
    any_json = {"content": {"application/json": {"schema": {"type": "object"}}}}
    job_id = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths: dict[str, Any] = {
        "/execute": {
            "post": {
                "summary": "Run code and wait for its result",
                "requestBody": {"required": True, **ref("ExecutionRequest")},
                "responses": {
                    "200": {"description": "Finished (successfully or not)", **ref("SyncResponse")},
                    "422": error,
                    "504": error,
                },
            }
        },
        "/execute/async": {
            "post": {
                "summary": "Queue code; idempotent with idempotency_key",
                "requestBody": {"required": True, **ref("AsyncExecuteBody")},
                "responses": {
                    "202": {"description": "Queued", **ref("JobAccepted")},
                    "200": {"description": "Known idempotency key", **ref("JobAccepted")},
                    "409": error,
                    "422": error,
                },
            }
        },
        "/jobs/{id}": {
            "get": {
                "summary": "A job's status, with its result once finished",
                "parameters": job_id,
                "responses": {"200": {"description": "The job", **any_json}, "404": error},
            }
        },
        "/jobs/{id}/result": {
            "get": {
                "summary": "A job's result; wait=true&timeout=N waits for it",
                "parameters": [
                    *job_id,
                    {"name": "wait", "in": "query", "schema": {"type": "boolean"}},
                    {"name": "timeout", "in": "query", "schema": {"type": "number"}},
                ],
                "responses": {
                    "200": {"description": "Finished", **ref("ExecutionResult")},
                    "202": {"description": "Not finished yet", **any_json},
                    "404": error,
                },
            }
        },
        "/jobs/{id}/cancel": {
            "post": {
                "summary": "Cancel a queued or running job; wait=true&timeout=N waits for it",
                "parameters": [
                    *job_id,
                    {"name": "wait", "in": "query", "schema": {"type": "boolean"}},
                    {"name": "timeout", "in": "query", "schema": {"type": "number"}},
                ],
                "responses": {
                    "202": {"description": "Cancel requested", **any_json},
                    "200": {"description": "Ended (with wait=true)", **ref("ExecutionResult")},
                    "404": error,
                    "409": {"description": "Already finished: {detail, correlation_id}"},
                },
            }
        },
        "/executions": {
            "get": {
                "summary": "Finished executions, newest first",
                "parameters": [
                    {"name": n, "in": "query", "schema": {"type": t}}
                    for n, t in (
                        ("limit", "integer"),
                        ("offset", "integer"),
                        ("status", "string"),
                        ("job_type", "string"),
                    )
                ],
                "responses": {"200": {"description": "A page", **any_json}, "422": error},
            }
        },
        "/executions/{id}": {
            "get": {
                "summary": "One finished execution",
                "parameters": job_id,
                "responses": {"200": {"description": "It", **ref("ExecutionResult")}, "404": error},
            }
        },
        "/job-types": {"get": {"summary": "Job types", "responses": {"200": any_json}}},
        "/job-types/{name}": {
            "get": {
                "summary": "One job type",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "It", **ref("JobType")}, "404": error},
            }
        },
        "/health": {"get": {"summary": "Gateway health", "responses": {"200": any_json}}},
        "/dlq": {"get": {"summary": "DLQ entries", "responses": {"200": any_json}}},
        "/dlq/stats": {
            "get": {"summary": "DLQ totals by error type", "responses": {"200": any_json}}
        },
        "/dlq/{id}": {
            "get": {
                "summary": "One DLQ entry",
                "parameters": job_id,
                "responses": {"200": {"description": "It", **ref("DLQRecord")}, "404": error},
            },
            "delete": {
                "summary": "Delete a DLQ entry (a tombstone on the DLQ topic)",
                "parameters": job_id,
                "responses": {"200": any_json, "404": error},
            },
        },
    }
    for path in paths.values():
        for op in path.values():
            op["responses"] = {
                code: ({"description": code, **body} if "description" not in body else body)
                for code, body in op["responses"].items()
            }
    return {
        "openapi": "3.1.0",
        "info": {"title": "tako-stream gateway", "version": __version__},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }


def run(settings: Settings) -> None:
    """Serve until interrupted (``tako-stream gateway``)."""
    configure(settings.log_level, settings.log_format)
    gateway = Gateway(settings, JobTypes.load(settings.job_types_file))
    web.run_app(
        gateway.app(),
        host=settings.gateway_host,
        port=settings.gateway_port,
        print=lambda msg: log.info("%s", msg),
        access_log=None,
    )
