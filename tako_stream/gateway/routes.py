"""The gateway's handlers: Tako VM's REST API over Kafka (the routes are in ``api``)."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.structs import RecordMetadata
from pydantic import BaseModel, ValidationError

from tako_stream import __version__, dlq
from tako_stream.core.errors import CancelRefused, InvalidRequestError
from tako_stream.core.jobtypes import JobTypes
from tako_stream.core.models import (
    CORRELATION_HEADER,
    PAYLOAD_HEADER,
    CancelRequest,
    DLQRecord,
    ExecutionRequest,
)
from tako_stream.gateway.api import Route
from tako_stream.gateway.shapes import (
    JobAccepted,
    job_record,
    payload_digest,
    sync_response,
)
from tako_stream.gateway.store import sortable
from tako_stream.gateway.views import ClusterView
from tako_stream.kafka.codec import dumps, new_id
from tako_stream.settings import Settings
from tako_stream.worker.breaker.state import State

log = logging.getLogger(__name__)

#: Idempotency keys map to execution ids in this namespace, so every gateway agrees on them.
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1b7a52-7f0e-4b8e-9f3c-1d2a3b4c5d6e")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(request: web.Request, status: int, detail: Any) -> web.Response:
    return json_response({"detail": detail, "correlation_id": request["correlation_id"]}, status)


def _wait_query(request: web.Request) -> tuple[bool, float]:
    """``?wait=true&timeout=N`` (30 s by default); ValueError when the timeout is no number."""
    wait = request.query.get("wait", "false").lower() in ("1", "true", "yes")
    return wait, max(0.0, float(request.query.get("timeout", "30")))


class Routes:
    """The handlers, over one view of the cluster shared by every HTTP request."""

    def __init__(
        self,
        settings: Settings,
        job_types: JobTypes,
        view: ClusterView,
        openapi: Callable[[], dict[str, Any]],
        metrics: Callable[[], web.Response],
    ) -> None:
        self.settings = settings
        self.job_types = job_types
        self.view = view
        self._openapi = openapi
        self._metrics = metrics

    # -- submitting ------------------------------------------------------------------------
    async def _body(
        self, request: web.Request, model: type[ExecutionRequest]
    ) -> tuple[ExecutionRequest, dict[str, Any]] | web.Response:
        """The validated body, or a 422 response naming every problem (FastAPI's shape)."""
        try:
            raw = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return error_response(request, 422, [{"loc": ["body"], "msg": f"invalid JSON: {exc}"}])
        if not isinstance(raw, dict):
            return error_response(request, 422, [{"loc": ["body"], "msg": "must be a JSON object"}])
        try:
            body = model.model_validate(raw)
            self.job_types.limits(body)
        except ValidationError as exc:
            problems = [
                {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
            return error_response(request, 422, problems)
        except InvalidRequestError as exc:
            problems = [{"loc": ["body", e.split(":")[0]], "msg": e} for e in exc.errors]
            return error_response(request, 422, problems)
        problem = await self.view.reply_to_problem(body.reply_to)
        if problem is not None:
            return error_response(request, 422, [{"loc": ["body", "reply_to"], "msg": problem}])
        return body, raw

    async def _produce(
        self, request: web.Request, body: ExecutionRequest, extra_headers: list[tuple[str, bytes]]
    ) -> tuple[str, RecordMetadata]:
        """Produce the request; its execution id and where it landed."""
        fields = body.model_dump(mode="json", exclude_none=True)
        fields.setdefault("execution_id", new_id())
        headers = [(CORRELATION_HEADER, request["correlation_id"].encode()), *extra_headers]
        landed = await self.view.producer.send_raw(
            orjson.dumps(fields), key=fields["execution_id"].encode(), headers=headers
        )
        return str(fields["execution_id"]), landed

    async def _read_back(self, landed: RecordMetadata) -> None:
        """Until this gateway's store has read a record it produced, so what it answers next
        (``GET /jobs/{id}`` right after a 202, say) knows of it; bounded."""
        tp = TopicPartition(landed.topic, landed.partition)
        with contextlib.suppress(TimeoutError):
            await self.view.wait_for_position(tp, landed.offset, self.settings.gateway_ready_wait)

    async def execute(self, request: web.Request) -> web.StreamResponse:
        """Run and wait: HTTP 200 whatever the code did; 504 if no result came in time."""
        parsed = await self._body(request, ExecutionRequest)
        if isinstance(parsed, web.Response):
            return parsed
        body, _ = parsed
        execution_id, _ = await self._produce(request, body, [])
        limits = self.job_types.limits(body)
        wait = limits.timeout + self.settings.timeout_grace + self.settings.gateway_wait_margin
        try:
            result = await self.view.result(execution_id, timeout=wait)
        except TimeoutError:
            return error_response(request, 504, f"no result for {execution_id} within {wait:g}s")
        return json_response(sync_response(result))

    async def execute_async(self, request: web.Request) -> web.StreamResponse:
        parsed = await self._body(request, ExecutionRequest)
        if isinstance(parsed, web.Response):
            return parsed
        body, raw = parsed
        if body.idempotency_key is None:
            execution_id, landed = await self._produce(request, body, [])
            await self._read_back(landed)
            return json_response(JobAccepted(job_id=execution_id, status="queued"), 202)
        digest = payload_digest(raw)
        execution_id = str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, body.idempotency_key))
        if body.execution_id not in (None, execution_id):
            return error_response(request, 422, "execution_id cannot be given with idempotency_key")
        known = await self.view.request(execution_id)
        if known is None:
            # Every gateway derives the same id from the key, so all their submits of one key
            # land in one partition: the first there is the job (workers skip the others), and
            # this gateway reads back which one that was.
            body = body.model_copy(update={"execution_id": execution_id})
            _, landed = await self._produce(request, body, [(PAYLOAD_HEADER, digest.encode())])
            await self._read_back(landed)
            known = await self.view.request(execution_id)
            ours = (landed.partition, landed.offset)
            if known is not None and (known.partition, known.offset) == ours:
                return json_response(JobAccepted(job_id=execution_id, status="queued"), 202)
        if known is None or known.digest != digest:
            return error_response(request, 409, "idempotency_key was used with another payload")
        state, result, _ = await self.view.find(execution_id)
        status = result.status.value if result is not None else state
        return json_response(JobAccepted(job_id=execution_id, status=status))

    # -- reading ---------------------------------------------------------------------------
    async def job(self, request: web.Request) -> web.StreamResponse:
        execution_id = request.match_info["id"]
        state, result, job = await self.view.find(execution_id)
        if result is not None:
            return json_response(job_record(result))
        if state in ("queued", "running"):
            return json_response(self.view.pending(execution_id, state, job))
        return error_response(request, 404, f"no job {execution_id}")

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """Cancel a queued or running job (202); 409 once it finished.  With ``wait=true``,
        answers with the job's result when it arrives (``timeout`` seconds at most)."""
        execution_id = request.match_info["id"]
        try:
            wait, timeout = _wait_query(request)
        except ValueError:
            return error_response(request, 422, "timeout must be a number of seconds")
        state, result, _ = await self.view.find(execution_id)
        if state == "unknown":
            return error_response(request, 404, f"no job {execution_id}")
        if result is not None:
            return error_response(request, 409, str(CancelRefused(execution_id, result)))
        cancel = CancelRequest(
            execution_id=execution_id,
            requested_at=datetime.now(UTC),
            correlation_id=request["correlation_id"],
        )
        await self.view.producer.send_raw(
            dumps(cancel),
            key=execution_id.encode(),
            headers=[(CORRELATION_HEADER, request["correlation_id"].encode())],
            topic=self.settings.control_topic,
        )
        log.info("cancel requested for %s (%s)", execution_id, state)
        if wait:
            with contextlib.suppress(TimeoutError):
                result = await self.view.result(execution_id, timeout=timeout)
            if result is not None:
                return json_response(job_record(result))
        return json_response({"job_id": execution_id, "status": "cancelling", "was": state}, 202)

    async def job_result(self, request: web.Request) -> web.StreamResponse:
        """The record once finished; with ``wait=true``, waits up to ``timeout`` seconds."""
        execution_id = request.match_info["id"]
        try:
            wait, timeout = _wait_query(request)
        except ValueError:
            return error_response(request, 422, "timeout must be a number of seconds")
        state, result, _ = await self.view.find(execution_id)
        if state == "unknown":
            return error_response(request, 404, f"no job {execution_id}")
        if result is None and wait:
            with contextlib.suppress(TimeoutError):
                result = await self.view.result(execution_id, timeout=timeout)
        if result is None:
            state, result, _ = await self.view.find(execution_id)
        if result is None:
            return json_response({"job_id": execution_id, "status": state}, 202)
        return json_response(job_record(result))

    async def execution(self, request: web.Request) -> web.StreamResponse:
        execution_id = request.match_info["id"]
        state, result, _ = await self.view.find(execution_id)
        if result is None:
            return error_response(request, 404, f"no finished execution {execution_id} ({state})")
        return json_response(result)

    async def executions(self, request: web.Request) -> web.StreamResponse:
        """Finished executions, newest first: ``limit`` (≤ 1000), ``offset``, ``status``,
        ``job_type``."""
        try:
            limit = min(int(request.query.get("limit", "50")), 1000)
            offset = int(request.query.get("offset", "0"))
            if limit < 1 or offset < 0:
                raise ValueError
        except ValueError:
            return error_response(request, 422, "limit must be 1..1000 and offset ≥ 0")
        total, page = await self.view.executions(
            limit=limit,
            offset=offset,
            status=request.query.get("status"),
            job_type=request.query.get("job_type"),
        )
        body = b'{"total":%d,"limit":%d,"offset":%d,"items":[%s]}' % (
            total,
            limit,
            offset,
            b",".join(page),  # the stored results, as the results topic holds them
        )
        return web.Response(body=body, content_type="application/json")

    async def list_job_types(self, request: web.Request) -> web.StreamResponse:
        return json_response([t.model_dump(mode="json") for t in self.job_types.values()])

    async def get_job_type(self, request: web.Request) -> web.StreamResponse:
        job_type = self.job_types.get(request.match_info["name"])
        if job_type is None:
            return error_response(request, 404, f"no job type {request.match_info['name']}")
        return json_response(job_type)

    async def health(self, request: web.Request) -> web.StreamResponse:
        """Tako VM's shape: the shared circuit breaker (read from its table's changelog, so
        every gateway agrees with every worker), and whether the broker answers."""
        broker = await self.view.broker_available()
        state = self.view.breakers.worst()
        ready = self.view.ready.is_set()
        healthy = broker and ready and state.state is State.CLOSED
        return json_response(
            {
                "status": "healthy" if healthy else "degraded",
                "docker_available": state.state is not State.OPEN,
                "circuit_breaker": {
                    "state": state.state.value,
                    "failure_count": state.failure_count,
                    "success_count": state.success_count,
                    "last_failure": state.last_failure.isoformat() if state.last_failure else None,
                },
                "broker_available": broker,
                "broker_unavailable_since": (
                    self.view.broker.since.isoformat() if self.view.broker.since else None
                ),
                "ready": ready,
                "version": __version__,
                "executions_known": await self.view.known(),
                "records_read": self.view.records_read,
                "dlq": await self.view.dead_letter_stats(),
            },
            200 if broker else 503,
        )

    # -- DLQ -------------------------------------------------------------------------------
    async def dlq_stats(self, request: web.Request) -> web.StreamResponse:
        return json_response(await self.view.dead_letter_stats())

    async def dlq_list(self, request: web.Request) -> web.StreamResponse:
        try:
            since = dlq.parse_time(request.query.get("since"))
            until = dlq.parse_time(request.query.get("until"))
            limit = min(int(request.query.get("limit", "1000")), 10_000)
        except ValueError as exc:
            return error_response(request, 422, str(exc))
        total, entries = await self.view.dead_letters(
            error_type=request.query.get("error_type"),
            since=sortable(since) if since else None,
            until=sortable(until) if until else None,
            limit=limit,
        )
        body = b'{"total":%d,"entries":[%s]}' % (total, b",".join(entries))
        return web.Response(body=body, content_type="application/json")

    async def dlq_get(self, request: web.Request) -> web.StreamResponse:
        entry = await self.view.dead_letter(request.match_info["id"])
        if entry is None:
            return error_response(request, 404, f"no DLQ entry {request.match_info['id']}")
        return web.Response(body=entry, content_type="application/json")

    async def dlq_delete(self, request: web.Request) -> web.StreamResponse:
        dlq_id = request.match_info["id"]
        entry = await self.view.dead_letter(dlq_id)
        if entry is None:
            return error_response(request, 404, f"no DLQ entry {dlq_id}")
        record = DLQRecord.model_validate_json(entry)
        landed = await self.view.producer.send_raw(
            None,
            key=dlq_id.encode(),
            headers=dlq.tombstone_headers(record),
            topic=self.settings.dlq_topic,
        )
        await self._read_back(landed)  # so a GET now agrees
        return json_response({"deleted": dlq_id})

    async def ready(self, request: web.Request) -> web.StreamResponse:
        """200 once the store has caught up with the topics, 503 before."""
        if self.view.ready.is_set():
            return json_response({"ready": True})
        return json_response({"ready": False}, 503)

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return json_response(self._openapi())

    async def serve_metrics(self, request: web.Request) -> web.StreamResponse:
        return self._metrics()

    def handler(self, route: Route) -> Handler:
        served: Handler = getattr(self, route.handler)
        return served
