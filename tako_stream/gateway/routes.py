"""The gateway's handlers: Tako VM's REST API over Kafka (the routes are in ``api``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata
from pydantic import BaseModel, ValidationError

from tako_stream import __version__, dlq
from tako_stream.core.errors import InvalidRequestError
from tako_stream.core.jobtypes import JobTypes, versions
from tako_stream.core.models import (
    CORRELATION_HEADER,
    PAYLOAD_HEADER,
    Artifact,
    CancelRequest,
    DLQRecord,
    ExecutionRequest,
    ExecutionResult,
    JobType,
    Relationship,
)
from tako_stream.gateway import pages
from tako_stream.gateway.api import Route
from tako_stream.gateway.shapes import (
    Cancelled,
    DerivedJob,
    ExistingJob,
    ForkBody,
    InProgress,
    JobAccepted,
    JobStatusBody,
    RerunBody,
    execution_record,
    iso_ms,
    payload_digest,
    sync_response,
    tako_status,
)
from tako_stream.gateway.store import sortable
from tako_stream.gateway.views import ClusterView, NotReady
from tako_stream.kafka.artifacts import content_type, read_artifact
from tako_stream.kafka.codec import dumps, new_id
from tako_stream.settings import Settings
from tako_stream.worker.breaker.state import State

log = logging.getLogger(__name__)

#: Idempotency keys map to execution ids in this namespace, so every gateway agrees on them.
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1b7a52-7f0e-4b8e-9f3c-1d2a3b4c5d6e")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)

#: Records read from a topic at once (an artifact, a rerun's or fork's original request), each
#: by a consumer of its own: a connection and a fetch buffer of up to 8 MiB.
RECORD_READS = 8
#: Tako VM's bounds: a result is waited for 1-300 s; a page holds up to 1000 items.
MIN_WAIT, MAX_WAIT = 1.0, 300.0
MAX_PAGE = 1000
#: Ours: past any store's rows (SQLite's OFFSET walks every row it skips), and an integer
#: SQLite holds (a larger one raised out of the handler: a 500).
MAX_OFFSET = 1_000_000_000


def json_response(data: Any, status: int = 200) -> web.Response:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(request: web.Request, status: int, detail: Any, **more: Any) -> web.Response:
    body = {"detail": detail, "correlation_id": request["correlation_id"], **more}
    return json_response(body, status)


def job_type_body(job_type: JobType, image_exists: bool | None) -> dict[str, Any]:
    """Tako VM's job type, then ours; ``image_exists`` as the live workers report it (None
    while none does)."""
    return {
        "name": job_type.name,
        "requirements": list(job_type.requirements),
        "python_version": job_type.python_version,
        "memory_limit": job_type.memory,
        "cpu_limit": job_type.cpus,
        "timeout": round(job_type.timeout),
        "session_enabled": False,
        "gpu_enabled": False,
        "gpu_vendor": None,
        "image_exists": image_exists,
        "versions": list(versions(job_type)),
        # Ours after Tako VM's, never over them (its timeout is whole seconds).
        **job_type.model_dump(
            mode="json", exclude={"name", "python_version", "requirements", "timeout"}
        ),
    }


def _etag_matches(request: web.Request, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (or is ``*``)."""
    wanted = request.headers.get("If-None-Match")
    if wanted is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in wanted.split(",")}
    return "*" in tags or etag in tags


def _invalid(exc: InvalidRequestError) -> list[dict[str, Any]]:
    """An ``InvalidRequestError``'s problems in FastAPI's shape, as ``_problems``."""
    return [{"loc": ["body", e.split(":")[0]], "msg": e} for e in exc.errors]


def _problems(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


def _pending_status(state: str) -> str:
    """Tako VM's name for a job not finished: ``pending`` while queued, else ``running``."""
    return "pending" if state == "queued" else state


def _page_query(request: web.Request) -> tuple[int, int] | web.Response:
    """``limit`` (1-1000, 100 by default) and ``offset`` (0-``MAX_OFFSET``), else a 422."""
    try:
        limit = int(request.query.get("limit", "100"))
        offset = int(request.query.get("offset", "0"))
        if not 1 <= limit <= MAX_PAGE or not 0 <= offset <= MAX_OFFSET:
            raise ValueError
    except ValueError:
        detail = f"limit must be 1..{MAX_PAGE} and offset 0..{MAX_OFFSET}"
        return error_response(request, 422, detail)
    return limit, offset


def _time_query(request: web.Request, name: str) -> str | None:
    """The ``name`` parameter as the store's sortable UTC text (ISO 8601; no zone: UTC);
    ValueError naming it when it is no time, or one UTC cannot hold (year 1 at +01:00)."""
    when = dlq.parse_time(request.query.get(name))
    if when is None:
        return None
    try:
        return sortable(when)
    except OverflowError:
        raise ValueError(f"{name}: {when.isoformat()} is out of range in UTC") from None


def wait_query(request: web.Request) -> tuple[bool, float]:
    """``?wait=true&timeout=N``: 30 s by default, 1-300 s as Tako VM bounds every wait (a
    wait is a held connection); ValueError otherwise."""
    wait = request.query.get("wait", "false").lower() in ("1", "true", "yes")
    timeout = float(request.query.get("timeout", "30"))
    if not MIN_WAIT <= timeout <= MAX_WAIT:  # NaN and infinities too
        raise ValueError(f"timeout must be {MIN_WAIT:g}-{MAX_WAIT:g} seconds")
    return wait, timeout


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
        self._record_reads = asyncio.Semaphore(RECORD_READS)

    # -- submitting ------------------------------------------------------------------------
    async def _body(
        self, request: web.Request, model: type[M], *, empty: bool = False
    ) -> tuple[M, dict[str, Any]] | web.Response:
        """The validated body, or a 422 response naming every problem (FastAPI's shape);
        ``empty``: no body at all counts as ``{}``."""
        data = await request.read()
        try:
            raw = orjson.loads(data) if data.strip() or not empty else {}
        except orjson.JSONDecodeError as exc:
            return error_response(request, 422, [{"loc": ["body"], "msg": f"invalid JSON: {exc}"}])
        if not isinstance(raw, dict):
            return error_response(request, 422, [{"loc": ["body"], "msg": "must be a JSON object"}])
        try:
            body = model.model_validate(raw)
            if isinstance(body, ExecutionRequest):
                self.job_types.limits(body)
        except ValidationError as exc:
            return error_response(request, 422, _problems(exc))
        except InvalidRequestError as exc:
            return error_response(request, 422, _invalid(exc))
        if isinstance(body, ExecutionRequest) and not empty:
            # Lineage is the gateway's to set, by a rerun or a fork (Tako VM's submit has no
            # such fields); a Kafka producer may still set it on its own requests.
            lineage = [f for f in ("parent_execution_id", "relationship") if f in raw]
            if lineage:
                problems = [
                    {"loc": ["body", f], "msg": "set by POST /jobs/{id}/rerun or /fork"}
                    for f in lineage
                ]
                return error_response(request, 422, problems)
        if isinstance(body, ExecutionRequest):
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

    async def _read_back(self, landed: RecordMetadata) -> bool:
        """Until this gateway's store has read a record it produced, so what it answers next
        (``GET /jobs/{id}`` right after a submit, say) knows of it; bounded: whether it has."""
        tp = TopicPartition(landed.topic, landed.partition)
        try:
            await self.view.wait_for_position(tp, landed.offset, self.settings.gateway_ready_wait)
        except TimeoutError:
            return False
        return True

    async def _submit(
        self, request: web.Request, body: ExecutionRequest, raw: dict[str, Any]
    ) -> JobAccepted | web.Response:
        """Produce a request: ``queued``, or, for an idempotency key already used with this
        payload, that job and its status now (409 for another payload)."""
        if body.idempotency_key is None:
            execution_id, landed = await self._produce(request, body, [])
            await self._read_back(landed)
            return JobAccepted(job_id=execution_id, status="queued")
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
            read_back = await self._read_back(landed)
            known = await self.view.request(execution_id)
            if known is None and not read_back:
                # The store lags: the job is queued, but whose it is cannot be told yet.  A 409
                # would have the client retry under another key and run it twice; a 503 has it
                # retry this one, which then finds the job.
                raise NotReady(
                    "the gateway's store has not read the job back yet: retry with the same "
                    "idempotency key"
                )
            ours = (landed.partition, landed.offset)
            if known is not None and (known.partition, known.offset) == ours:
                return JobAccepted(job_id=execution_id, status="queued")
        if known is None or known.digest != digest:
            # Tako VM's words, and the job the key names (its REST reference).
            return error_response(
                request,
                409,
                "Idempotency key reused with different payload",
                existing_job_id=execution_id,
            )
        state, result, _ = await self.view.find(execution_id)
        status = tako_status(result) if result is not None else _pending_status(state)
        log.info("idempotency hit: returning existing job %s", execution_id)
        return ExistingJob(job_id=execution_id, status=status)

    async def execute(self, request: web.Request) -> web.StreamResponse:
        """Run and wait: HTTP 200 whatever the code did; 504 if no result came in time."""
        parsed = await self._body(request, ExecutionRequest)
        if isinstance(parsed, web.Response):
            return parsed
        body, raw = parsed
        accepted = await self._submit(request, body, raw)
        if isinstance(accepted, web.Response):
            return accepted
        limits = self.job_types.limits(body)
        wait = limits.timeout + self.settings.timeout_grace + self.settings.gateway_wait_margin
        try:
            result = await self.view.result(accepted.job_id, timeout=wait)
        except TimeoutError:
            return error_response(request, 504, f"no result for {accepted.job_id} within {wait:g}s")
        return json_response(sync_response(result))

    async def execute_async(self, request: web.Request) -> web.StreamResponse:
        """Queue a job: 200 ``{job_id, status: "queued"}`` (Tako VM's answer); an idempotency
        key seen before with the same payload answers that job and its status."""
        parsed = await self._body(request, ExecutionRequest)
        if isinstance(parsed, web.Response):
            return parsed
        accepted = await self._submit(request, *parsed)
        return accepted if isinstance(accepted, web.Response) else json_response(accepted)

    async def rerun(self, request: web.Request) -> web.StreamResponse:
        """A new job with a finished one's code and input (and limits, unless overridden)."""
        return await self._derive(request, RerunBody, "rerun")

    async def fork(self, request: web.Request) -> web.StreamResponse:
        """A new job with new code on a job's input (and limits, unless overridden)."""
        return await self._derive(request, ForkBody, "fork")

    async def _derive(
        self, request: web.Request, model: type[RerunBody], relationship: Relationship
    ) -> web.StreamResponse:
        parsed = await self._body(request, model, empty=True)
        if isinstance(parsed, web.Response):
            return parsed
        overrides, _ = parsed
        parent_id = request.match_info["id"]
        state, result, job = await self.view.find(parent_id)
        if state == "unknown":
            return error_response(request, 404, "Job not found")
        if relationship == "rerun" and result is None:
            return error_response(request, 400, "Cannot rerun job that hasn't completed")
        original = None
        if job.request:
            async with self._record_reads:  # a consumer of its own: a few at once
                original = await self.view.original_request(job.request)
        if original is None:
            return error_response(request, 400, "Original code not available for replay")
        # The parent's request as produced, minus what names or routes that one job.
        for field in ("execution_id", "idempotency_key", "reply_to"):
            original.pop(field, None)
        fields = {
            **original,
            **overrides.model_dump(exclude_none=True),
            "parent_execution_id": parent_id,
            "relationship": relationship,
        }
        try:
            body = ExecutionRequest.model_validate(fields)
            self.job_types.limits(body)
        except ValidationError as exc:
            return error_response(request, 422, _problems(exc))
        except InvalidRequestError as exc:
            return error_response(request, 422, _invalid(exc))
        execution_id, landed = await self._produce(request, body, [])
        await self._read_back(landed)
        log.info("job %s created as %s of %s", execution_id, relationship, parent_id)
        derived = DerivedJob(
            job_id=execution_id,
            status="queued",
            parent_execution_id=parent_id,
            relationship=relationship,
        )
        return json_response(derived)

    # -- reading ---------------------------------------------------------------------------
    async def job(self, request: web.Request) -> web.StreamResponse:
        """Tako VM's job status: pending (with its queue position), running, or finished."""
        execution_id = request.match_info["id"]
        state, result, job = await self.view.find(execution_id)
        if state == "unknown":
            return error_response(request, 404, "Job not found")
        created = iso_ms(job.request.produced_ms) if job.request else None
        if result is not None:
            record = execution_record(result, created_at=created)
            body = JobStatusBody(
                job_id=execution_id,
                status=record["status"],
                created_at=record["created_at"],
                duration_ms=record["duration_ms"],
                queue_position=None,
                started_at=record["started_at"],
            )
        else:
            position = await self.view.queue_position(execution_id)
            body = JobStatusBody(
                job_id=execution_id,
                status=_pending_status(state),
                created_at=created,
                duration_ms=None,
                queue_position=position if state == "queued" else None,
                started_at=job.running[1] if job.running else None,
            )
        return json_response(body)

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """Cancel a queued or running job: 200 ``{status: "cancelled", job_id}``; 404 when it
        is unknown or already finished (Tako VM's answers).  Ours: with ``wait=true``, waits
        up to ``timeout`` seconds for the job's result and adds its record as ``result``."""
        execution_id = request.match_info["id"]
        try:
            wait, timeout = wait_query(request)
        except ValueError:
            problem = {"loc": ["query", "timeout"], "msg": f"from {MIN_WAIT:g} to {MAX_WAIT:g} s"}
            return error_response(request, 422, [problem])
        state, result, _ = await self.view.find(execution_id)
        if state == "unknown" or result is not None:
            return error_response(request, 404, "Job not found or already completed")
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
        answer = Cancelled(job_id=execution_id)
        if wait:
            with contextlib.suppress(TimeoutError):
                result = await self.view.result(execution_id, timeout=timeout)
            if result is not None:
                answer.result = await self._record(result, full=False)
        return json_response(answer.model_dump(mode="json", exclude_none=True))

    async def _record(self, result: ExecutionResult, *, full: bool) -> dict[str, Any]:
        job = await self.view.job(result.execution_id)
        created = iso_ms(job.request.produced_ms) if job.request else None
        return execution_record(result, created_at=created, full=full)

    async def job_result(self, request: web.Request) -> web.StreamResponse:
        """The execution record once finished (``view=full``: the full one); 200 with
        ``{status, message, queue_position}`` while it is not; with ``wait=true``, waits up to
        ``timeout`` seconds (1-300), then 408."""
        execution_id = request.match_info["id"]
        try:
            wait, timeout = wait_query(request)
        except ValueError:
            problem = {"loc": ["query", "timeout"], "msg": f"from {MIN_WAIT:g} to {MAX_WAIT:g} s"}
            return error_response(request, 422, [problem])
        full = request.query.get("view") == "full"
        state, result, _ = await self.view.find(execution_id)
        if state == "unknown":
            return error_response(request, 404, "Job not found")
        if result is None and wait:
            try:
                result = await self.view.result(execution_id, timeout=timeout)
            except TimeoutError:
                return error_response(request, 408, "Timeout waiting for job")
        if result is None and wait:  # the wait ended: the store may have the result now
            state, result, _ = await self.view.find(execution_id)
        if result is None and state == "unknown":  # gone meanwhile: the store was rebuilt
            return error_response(request, 404, "Job not found")
        if result is None:
            position = await self.view.queue_position(execution_id)
            body = InProgress(
                job_id=execution_id,
                status=_pending_status(state),
                queue_position=position if state == "queued" else None,
            )
            return json_response(body)
        return json_response(await self._record(result, full=full))

    async def execution(self, request: web.Request) -> web.StreamResponse:
        execution_id = request.match_info["id"]
        _, result, _ = await self.view.find(execution_id)
        if result is None:
            return error_response(request, 404, "Execution not found")
        return json_response(await self._record(result, full=request.query.get("view") == "full"))

    async def executions(self, request: web.Request) -> web.StreamResponse:
        """Finished executions, newest first, as Tako VM's page: ``limit`` (1-1000, 100 by
        default), ``offset``, ``status``, ``job_type``, ``view=full``."""
        page = _page_query(request)
        if isinstance(page, web.Response):
            return page
        limit, offset = page
        listing = pages.executions(
            limit=limit,
            offset=offset,
            status=request.query.get("status"),
            job_type=request.query.get("job_type"),
            full=request.query.get("view") == "full",
        )
        return await pages.serve(request, self.view, listing, limit=limit, offset=offset)

    async def artifact(self, request: web.Request) -> web.StreamResponse:
        """A job's artifact from the artifacts topic, with Tako VM's ETag (its SHA-256); 304
        when ``If-None-Match`` names it.  HEAD answers from the result's listing alone."""
        found = await self._artifact(request)
        if isinstance(found, web.Response):
            return found
        execution_id, listed, headers = found
        if _etag_matches(request, headers["ETag"]):
            return web.Response(status=304, headers={"ETag": headers["ETag"]})
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(listed.size_bytes)})
        async with self._record_reads:  # each read is a consumer of its own: a few at once
            try:
                data = await read_artifact(
                    self.settings, execution_id, listed, timeout=self.settings.gateway_ready_wait
                )
            except (KafkaError, OSError, LookupError) as exc:
                raise NotReady(f"the artifacts topic cannot be read now ({exc!r})") from exc
        if data is None:  # the topic does not hold it (any more): Tako VM's words
            return error_response(request, 404, "Artifact file not found")
        return web.Response(body=data, headers=headers)

    async def _artifact(
        self, request: web.Request
    ) -> tuple[str, Artifact, dict[str, str]] | web.Response:
        execution_id, name = request.match_info["id"], request.match_info["name"]
        _, result, _ = await self.view.find(execution_id)
        if result is None:
            return error_response(request, 404, "Job not found")
        listed = next((a for a in result.artifacts if a.name == name), None)
        if listed is None:
            return error_response(request, 404, "Artifact not found")
        headers = {
            # From the name (a listing's own content type is the producer's word, and a result
            # on the topic may be anyone's); never rendered inline: the bytes are the job's,
            # and the job is untrusted, so a browser gets no script or style of it either.
            "Content-Type": content_type(listed.name),
            "ETag": f'"{listed.sha256}"',
            "Content-Disposition": f'attachment; filename="{listed.name}"',
            "Content-Security-Policy": "sandbox; default-src 'none'",
        }
        return execution_id, listed, headers

    async def pool_stats(self, request: web.Request) -> web.StreamResponse:
        return json_response(await self._queue_stats())

    async def _queue_stats(self) -> dict[str, int]:
        """Tako VM's queue figures for the whole cluster: jobs from the store, slots from the
        live workers' reports."""
        waiting, running = await self.view.queue_counts()
        return {
            "pending": waiting,
            "running": running,
            "max_workers": self.view.workers.slots(),
            "max_queue_size": 0,
        }

    async def list_job_types(self, request: web.Request) -> web.StreamResponse:
        exists = self.view.workers.image_exists
        return json_response([job_type_body(t, exists(t.image)) for t in self.job_types.values()])

    async def get_job_type(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        job_type = self.job_types.get(name)
        if job_type is None:
            return error_response(request, 404, f"Job type '{name}' not found")
        return json_response(
            job_type_body(job_type, self.view.workers.image_exists(job_type.image))
        )

    async def build_job_type(self, request: web.Request) -> web.StreamResponse:
        """Tako VM builds images on its one host; here the images live on every worker's
        engine, which the gateway never reaches: 501, naming the way they are built."""
        name = request.match_info["name"]
        if name not in self.job_types:
            return error_response(request, 404, f"Job type '{name}' not found")
        detail = (
            f"Images are built on each worker's host (scripts/build-images), not through the "
            f"gateway; {name!r} uses {self.job_types[name].image}"
        )
        return error_response(request, 501, detail)

    async def health(self, request: web.Request) -> web.StreamResponse:
        """Tako VM's shape: the shared circuit breaker (read from its table's changelog, so
        every gateway agrees with every worker), the cluster's queue; ours: the broker and the
        store."""
        broker = await self.view.broker_available()
        state = self.view.breakers.worst()
        ready = self.view.ready.is_set()
        # The gateway does not see the engines: the workers' reports say what theirs do.
        engines = self.view.workers.docker_available()
        docker = state.state is not State.OPEN and engines is not False
        healthy = broker and ready and docker and state.state is State.CLOSED
        return json_response(
            {
                "status": "healthy" if healthy else "degraded",
                "docker_available": docker,
                "gvisor_available": self.view.workers.has_runtime("runsc"),
                "circuit_breaker": {
                    "state": state.state.value,
                    "failure_count": state.failure_count,
                    "success_count": state.success_count,
                    # Tako VM's number: seconds since the epoch.
                    "last_failure": state.last_failure.timestamp() if state.last_failure else None,
                },
                "version": __version__,
                # Tako VM's development/production switch has no counterpart here: every
                # container is locked down the same way, whatever the deployment.
                "production_mode": False,
                "queue_stats": await self._queue_stats(),
                "broker_available": broker,
                "workers": len(self.view.workers.live()),
                "broker_unavailable_since": (
                    self.view.broker.since.isoformat() if self.view.broker.since else None
                ),
                "ready": ready,
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
        """DLQ entries, oldest first, as Tako VM's page (``error_type``, ``limit`` 1-1000 and
        100 by default, ``offset``; ours: ``since`` and ``until``)."""
        page = _page_query(request)
        if isinstance(page, web.Response):
            return page
        limit, offset = page
        try:
            since = _time_query(request, "since")
            until = _time_query(request, "until")
        except ValueError as exc:
            return error_response(request, 422, str(exc))
        listing = pages.dead_letters(
            error_type=request.query.get("error_type"),
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )
        return await pages.serve(request, self.view, listing, limit=limit, offset=offset)

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
        return json_response({"status": "removed", "entry_id": dlq_id})

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
