"""The HTTP gateway: Tako VM's REST API, served over Kafka.

Clients written for Tako VM (``requests.post("http://localhost:8000/execute", json=...)``) run
unchanged.  The routes are in ``routes``, what the gateway knows of the cluster in ``views``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from collections.abc import Iterable

from aiohttp import web

from tako_stream.core.jobtypes import JobTypes
from tako_stream.gateway import openapi
from tako_stream.gateway.api import ROUTES
from tako_stream.gateway.limits import FixedWindow
from tako_stream.gateway.routes import Handler, Routes, error_response
from tako_stream.gateway.views import Busy, ClusterView, NotReady
from tako_stream.kafka.codec import clean_correlation_id
from tako_stream.logs import configure, job_context
from tako_stream.metrics import BREAKER_VALUES, CONTENT_TYPE, Metric, Metrics, gauge
from tako_stream.settings import Settings

log = logging.getLogger(__name__)

CORRELATION_HTTP_HEADER = "X-Correlation-ID"


#: On every answer, as Tako VM sends them: no MIME sniffing of job output, no framing.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "X-XSS-Protection": "1; mode=block",
}


#: Never rate limited: the API document, and what probes and scrapers poll.  Declared in the
#: route table (``limited``, ``keyed``), where the OpenAPI document reads which routes may
#: answer 429 and 401.
UNLIMITED = frozenset(r.path for r in ROUTES if not r.limited)
#: Served without an API key: the API document, and the readiness probe (which says nothing
#: but 200 or 503).
OPEN = frozenset(r.path for r in ROUTES if not r.keyed)


class Gateway:
    """The aiohttp application: the routes, correlation ids, metrics and the view's lifecycle."""

    def __init__(self, settings: Settings, job_types: JobTypes) -> None:
        self.settings = settings
        self.view = ClusterView(settings)
        self.metrics = Metrics()
        self.metrics.add_gauges(self._gauges)
        self.api_keys = settings.api_key_digests
        self.limiter = (
            FixedWindow(settings.gateway_rate_limit, settings.gateway_rate_window)
            if settings.gateway_rate_limit
            else None
        )
        self.routes = Routes(
            settings,
            job_types,
            self.view,
            openapi=functools.cache(openapi.document),
            metrics=lambda: web.Response(
                body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE}
            ),
        )

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._correlation],
            client_max_size=self.settings.gateway_max_payload_bytes,
        )
        # aiohttp serves HEAD with every GET route's handler: a HEAD route is declared in the
        # table for the OpenAPI document only.
        app.add_routes(
            [
                web.route(r.method, r.path, self.routes.handler(r))
                for r in ROUTES
                if r.method != "HEAD"
            ]
        )

        async def on_startup(_: web.Application) -> None:
            await self.view.start()

        async def on_cleanup(_: web.Application) -> None:
            await self.view.stop()

        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        app.on_response_prepare.append(self._stamp)
        return app

    @staticmethod
    async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
        """The correlation id and security headers, as the headers are sent: a streamed page
        sends its own before its handler returns, where the middleware could still add them."""
        correlation = request.get("correlation_id")
        if correlation is not None:
            response.headers[CORRELATION_HTTP_HEADER] = correlation
        response.headers.update(SECURITY_HEADERS)

    @web.middleware
    async def _correlation(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every request gets a correlation id (the caller's, or a new one), echoed back."""
        # Cleaned as a Kafka header's is: one that is not printable UTF-8 (aiohttp hands such
        # bytes over as surrogate escapes, which no JSON body or header can carry) or is too
        # long for a CancelRequest is replaced, never an error outside every handler.
        request["correlation_id"] = clean_correlation_id(
            request.headers.get(CORRELATION_HTTP_HEADER)
        )
        with job_context("-", request["correlation_id"]):
            try:
                response = await self._protected(request, handler)
            except web.HTTPRequestEntityTooLarge:
                response = error_response(request, 413, self._too_large)
            except web.HTTPException as exc:
                response = error_response(request, exc.status, exc.reason)
            except NotReady as exc:
                response = error_response(request, 503, str(exc))
                if isinstance(exc, Busy):
                    response.headers["Retry-After"] = str(exc.retry_after)
            except Exception:
                log.exception("gateway error on %s %s", request.method, request.path)
                response = error_response(request, 500, "internal error")
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "unmatched"
        self.metrics.count_http(request.method, path, response.status)
        return response

    @property
    def _too_large(self) -> str:
        limit = self.settings.gateway_max_payload_bytes
        return f"Payload too large. Maximum allowed size is {limit} bytes."  # Tako VM's words

    async def _protected(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Tako VM's API protections first: the rate limit (429 with Retry-After; keys are
        guessed no faster than anything else is asked), the API key when keys are configured
        (401), then the declared body size (413; a body that turns out longer is refused when
        read)."""
        if self.limiter is not None and request.path not in UNLIMITED:
            allowed, retry_after = self.limiter.allow(request.remote or "unknown")
            if not allowed:
                response = error_response(request, 429, "Rate limit exceeded. Try again later.")
                response.headers["Retry-After"] = str(retry_after)
                return response
        if self.api_keys and request.path not in OPEN and not self._key_accepted(request):
            response = error_response(request, 401, "Invalid or missing API key")
            response.headers["WWW-Authenticate"] = 'Bearer realm="tako-stream"'
            return response
        length = request.content_length
        if length is not None and length > self.settings.gateway_max_payload_bytes:
            return error_response(request, 413, self._too_large)
        return await handler(request)

    def _key_accepted(self, request: web.Request) -> bool:
        """Whether the request carries a configured key (``X-API-Key``, or ``Authorization:
        Bearer``), compared by digest in constant time."""
        key = request.headers.get("X-API-Key")
        if key is None:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        if not key:
            return False
        digest = hashlib.sha256(key.encode()).hexdigest()
        return any(hmac.compare_digest(digest, known) for known in self.api_keys)

    def _gauges(self) -> Iterable[Metric]:
        state = self.view.breakers.worst()
        yield gauge(
            "tako_breaker_state",
            "The shared Docker circuit breaker, worst endpoint: 0 closed, 1 half-open, 2 open.",
            {(): BREAKER_VALUES[state.state]},
            [],
        )
        yield gauge("tako_dlq_size", "Entries in the DLQ topic now.", {(): self.view.dlq_size}, [])
        yield gauge(
            "tako_gateway_ready",
            "1 once the gateway's store has caught up with the topics.",
            {(): int(self.view.ready.is_set())},
            [],
        )


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
