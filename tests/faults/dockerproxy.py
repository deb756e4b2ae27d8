"""A fault-injecting Unix-socket proxy for the Docker Engine API (stdlib asyncio only).

Put it between a process and the real daemon socket, point the process at it with
``DOCKER_HOST=unix://<listen_path>``, and inject real faults at the HTTP level::

    async with DockerProxy("/tmp/t/docker.sock") as proxy:  # in the test's own event loop
        proxy.fail_next(1)            # the next POST .../containers/create gets a 500
        proxy.set_down(True)          # "daemon unreachable"
        proxy.set_down(False)

    with DockerProxy("/tmp/t/docker.sock") as proxy:  # in a background thread
        ...                                           # (start_in_thread / stop_thread)

    python -m tests.faults.dockerproxy /tmp/t/docker.sock [--upstream PATH] [--control PORT]

Forwarding
    Each client connection gets its own upstream connection (opened lazily, reopened after the
    daemon closes it), so keep-alive, connection reuse and connection counts look like the real
    thing.  Every request head is parsed (so faults can match every request on a keep-alive
    connection), the request body is relayed by Content-Length or chunked framing, and the
    response is relayed by its framing (Content-Length, chunked, none for HEAD/1xx/204/304).
    A ``101`` response (Docker's ``attach``/``exec start`` hijack with ``Upgrade: tcp``), or a
    response without any length framing (Docker's older ``200`` + raw-stream hijack), turns the
    connection into a raw bidirectional byte pipe until both sides have closed; half-closes are
    forwarded (``shutdown(SHUT_WR)``), so closing stdin of an attach works.  While waiting for a
    response (e.g. a long ``POST /containers/{id}/wait``), a client EOF is forwarded upstream as
    a half-close, which makes the daemon abandon the request just as it would on a direct
    connection.

Down (``set_down(True, style=...)``) -- existing connections are always cut (both sides
aborted; the client sees EOF), and then:

    ``"refuse"`` (default): the listening socket is closed and replaced by a bound but *not
        listening* socket at the same path: ``connect()`` fails with ECONNREFUSED, exactly like
        a crashed daemon that left its socket file behind.  aiohttp raises
        ``ClientConnectorError`` and aiodocker turns it into ``DockerError(900, "Cannot connect
        to Docker Engine via unix://... [... Connection refused]")``.
    ``"missing"``: the socket path is removed: ECONNREFUSED becomes ENOENT (a daemon that shut
        down cleanly); aiodocker raises ``DockerError(900, ...[No such file or directory])``.
    ``"hang"``: connections are still accepted but never answered (a wedged daemon, or systemd
        socket activation with the daemon not coming up): requests hang until the client's own
        timeout (aiodocker lets ``asyncio.TimeoutError`` through, it is *not* a DockerError).
        Held connections are closed when the proxy comes back up.

    ``set_down(False)`` re-creates the listening socket at the same path.

Faults -- ``fail_next(n, method="POST", path_regex=r"/containers/create", status=500,
message="injected fault", action="error", when="before")``, ``fail_always(...)`` (same
arguments without ``n``), ``clear()``.  Rules are checked in the order they were added; the
first active rule whose method (``None`` or ``"*"`` = any, case-insensitive) equals the
request's and whose regex ``re.search``-es the raw request target (path *and* query, including
the ``/v1.xx`` prefix, e.g. ``/v1.41/containers/create?name=x``) fires, and uses up one of its
``n``.  Non-matching requests are forwarded.

    ``action="error"``: answer ``status`` with the JSON body ``{"message": message}``,
        ``Content-Type: application/json`` and a proper Content-Length; the request body is
        read and discarded first, so the keep-alive connection stays usable (aiodocker raises
        ``DockerError(status, message)``).
    ``action="drop"``: read the request, then close the connection without any response (a
        daemon dying mid-request: aiohttp ``ServerDisconnectedError`` -> ``DockerError(900)``;
        note aiohttp silently retries *idempotent* methods once on a reused connection).
    ``when="before"``: the request never reaches the daemon.
    ``when="after"``: the request *is* forwarded and fully answered by the daemon, but the
        client gets the fault instead of the real response (the nasty case: the container was
        created, the client thinks it was not).

Counters -- ``stats()`` returns a :class:`ProxyStats` snapshot: ``requests`` (parsed from
clients), ``forwarded``, ``failed`` (faults injected: errors and drops), ``connections``
(accepted), ``active_connections``, ``upgrades`` (connections turned into raw pipes),
``chunked_responses``, ``cut`` (connections cut by down/stop) and ``seen``: the last
``max_seen`` ``(method, target)`` pairs.  Each rule returned by ``fail_next``/``fail_always``
counts its own ``matched``.  ``reset_stats()`` zeroes them.

Threads -- every public method may be called from any thread.  Rule and counter updates take a
lock; ``set_down`` is run on the proxy's loop (``call_soon_threadsafe``) and returns once it has
taken effect.  Called from the proxy's own loop, everything is synchronous and immediate.

Control interface (standalone process, ``--control PORT``; ``0`` picks a free port) -- a
line-based TCP protocol on 127.0.0.1.  The process prints ``CONTROL 127.0.0.1:<port>``,
``LISTENING <path>`` and finally ``READY`` on stdout.  Each request is one line,
``COMMAND [JSON-object]``; each answer is one JSON line, ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``; several commands may be sent on one connection:

    PING                            -> {"ok": true}
    STATS                           -> {"ok": true, "stats": {...ProxyStats fields...}}
    RESET_STATS
    DOWN [refuse|missing|hang]      (or DOWN {"style": "hang"})
    UP
    FAIL_NEXT {"n": 1, "method": "POST", "path_regex": "/containers/create", "status": 500,
               "message": "injected fault", "action": "error", "when": "before"}
                                    (every key optional, defaults as above)
    FAIL_ALWAYS {...same keys without n...}
    CLEAR                           (remove all fault rules)
    SHUTDOWN                        (answer, then stop the proxy and exit 0)

:class:`ProxyControl` is a tiny blocking client for it.  SIGINT/SIGTERM also stop the process
cleanly (the socket path is removed).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import stat
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from http import HTTPStatus
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, cast, get_args

__all__ = [
    "DEFAULT_UPSTREAM",
    "DockerProxy",
    "FaultRule",
    "ProxyControl",
    "ProxyStats",
    "main",
]

DEFAULT_UPSTREAM = "/var/run/docker.sock"

DownStyle = Literal["refuse", "missing", "hang"]
FaultAction = Literal["error", "drop"]
FaultWhen = Literal["before", "after"]

_T = TypeVar("_T")
_log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_MAX_HEAD = 1024 * 1024
_MAX_LINE = 64 * 1024
_STREAM_LIMIT = 256 * 1024


class _ProtocolError(Exception):
    """Malformed HTTP from either side: the connection is closed."""


# --------------------------------------------------------------------------------------------
# Fault rules and statistics


@dataclasses.dataclass(eq=False)
class FaultRule:
    """One fault: see the module docstring.  ``remaining is None`` means forever."""

    method: str | None
    path_regex: str
    status: int
    message: str
    remaining: int | None
    action: FaultAction = "error"
    when: FaultWhen = "before"
    matched: int = 0
    _rx: re.Pattern[str] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.method is not None:
            self.method = self.method.upper()
            if self.method == "*":
                self.method = None
        if not 400 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP error (400-599), not {self.status}")
        if self.remaining is not None and self.remaining < 0:
            raise ValueError("n must be >= 0")
        if self.action not in get_args(FaultAction):
            raise ValueError(f"action must be one of {get_args(FaultAction)}")
        if self.when not in get_args(FaultWhen):
            raise ValueError(f"when must be one of {get_args(FaultWhen)}")
        self._rx = re.compile(self.path_regex)

    @property
    def active(self) -> bool:
        return self.remaining is None or self.remaining > 0

    def matches(self, method: str, target: str) -> bool:
        if self.method is not None and method.upper() != self.method:
            return False
        return self._rx.search(target) is not None


@dataclasses.dataclass(frozen=True)
class ProxyStats:
    requests: int
    forwarded: int
    failed: int
    connections: int
    active_connections: int
    upgrades: int
    chunked_responses: int
    cut: int
    seen: tuple[tuple[str, str], ...]

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seen"] = [list(x) for x in self.seen]
        return d


# --------------------------------------------------------------------------------------------
# HTTP/1.1 plumbing


class _BufReader:
    """A StreamReader with our own buffer in front, so that reads are cancel-safe and data
    read "just to look for EOF" is never lost."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buf = bytearray()
        self.eof = False

    async def fill(self) -> bool:
        """Read more into the buffer; False on EOF."""
        if self.eof:
            return False
        data = await self._reader.read(_CHUNK)
        if not data:
            self.eof = True
            return False
        self._buf += data
        return True

    async def readuntil(self, sep: bytes, limit: int) -> bytes:
        start = 0
        while True:
            i = self._buf.find(sep, start)
            if i >= 0:
                end = i + len(sep)
                out = bytes(self._buf[:end])
                del self._buf[:end]
                return out
            if len(self._buf) > limit:
                raise _ProtocolError(f"line or head longer than {limit} bytes")
            start = max(0, len(self._buf) - len(sep) + 1)
            if not await self.fill():
                raise asyncio.IncompleteReadError(bytes(self._buf), None)

    def at_eof(self) -> bool:
        """EOF seen (or pending) and nothing buffered."""
        return not self._buf and (self.eof or self._reader.at_eof())

    async def read_some(self, n: int = _CHUNK) -> bytes:
        """Up to n bytes; b"" on EOF."""
        if not self._buf and not await self.fill():
            return b""
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not await self.fill():
                raise asyncio.IncompleteReadError(bytes(self._buf), n)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


@dataclasses.dataclass
class _Head:
    raw: bytes
    start: list[str]  # request: method, target, version; response: version, status, reason
    headers: list[tuple[str, str]]

    def get_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()}

    def content_length(self) -> int | None:
        values = {v.strip() for v in self.get_all("content-length")}
        if not values:
            return None
        if len(values) != 1:
            raise _ProtocolError("conflicting Content-Length headers")
        value = values.pop()
        if not value.isdigit():
            raise _ProtocolError(f"bad Content-Length {value!r}")
        return int(value)

    def is_chunked(self) -> bool:
        codings = [
            t.strip().lower() for v in self.get_all("transfer-encoding") for t in v.split(",")
        ]
        return bool(codings) and codings[-1] == "chunked"

    def wants_close(self, version: str) -> bool:
        conn = self.tokens("connection")
        if "close" in conn:
            return True
        return version == "HTTP/1.0" and "keep-alive" not in conn

    def without(self, name: str) -> bytes:
        lname = name.lower()
        lines = [" ".join(self.start)]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() != lname]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _parse_head(raw: bytes, *, response: bool) -> _Head:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < (2 if response else 3):
        raise _ProtocolError(f"bad start line {lines[0]!r}")
    if response:
        parts += [""] * (3 - len(parts))
        if not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise _ProtocolError(f"bad status line {lines[0]!r}")
    elif not parts[2].startswith("HTTP/"):
        raise _ProtocolError(f"bad request line {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise _ProtocolError(f"bad header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return _Head(raw=raw, start=parts, headers=headers)


async def _write(dst: asyncio.StreamWriter | None, data: bytes) -> None:
    if dst is not None and data:
        dst.write(data)
        await dst.drain()


async def _copy_exact(src: _BufReader, dst: asyncio.StreamWriter | None, n: int) -> None:
    while n > 0:
        data = await src.read_some(min(n, _CHUNK))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(data)
        await _write(dst, data)


async def _copy_chunked(src: _BufReader, dst: asyncio.StreamWriter | None) -> None:
    while True:
        line = await src.readuntil(b"\r\n", _MAX_LINE)
        await _write(dst, line)
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _ProtocolError(f"bad chunk size {size_text!r}") from None
        if size == 0:
            while True:  # trailers, up to the empty line
                trailer = await src.readuntil(b"\r\n", _MAX_LINE)
                await _write(dst, trailer)
                if trailer == b"\r\n":
                    return
        await _copy_exact(src, dst, size)
        crlf = await src.readexactly(2)
        if crlf != b"\r\n":
            raise _ProtocolError("chunk not followed by CRLF")
        await _write(dst, crlf)


async def _copy_body(
    src: _BufReader, dst: asyncio.StreamWriter | None, framing: str, length: int
) -> None:
    if framing == "chunked":
        await _copy_chunked(src, dst)
    elif framing == "length":
        await _copy_exact(src, dst, length)


def _request_framing(head: _Head) -> tuple[str, int]:
    if head.is_chunked():
        return "chunked", 0
    length = head.content_length()
    if length:
        return "length", length
    return "none", 0


def _response_framing(req: _Head, resp: _Head) -> tuple[str, int]:
    status = int(resp.start[1])
    if status == 101 or (req.start[0] == "CONNECT" and 200 <= status < 300):
        return "tunnel", 0
    if req.start[0] == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return "none", 0
    if resp.is_chunked():
        return "chunked", 0
    length = resp.content_length()
    if length is not None:
        return "length", length
    # No framing at all: body until EOF.  Docker's pre-Upgrade hijack (200 OK with a raw
    # stream) looks exactly like this and is bidirectional, so treat it as a tunnel.
    return "tunnel", 0


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel a helper task and wait for it, without swallowing our own cancellation."""
    if not task.done():
        task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: never "Task exception was never retrieved"


def _error_response(status: int, message: str, close: bool) -> bytes:
    body = json.dumps({"message": message}).encode() + b"\n"
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Injected Fault"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "X-Tako-Injected-Fault: 1",
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------------------------
# Connections


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.task: asyncio.Task[None] | None = None
        self.reader: _BufReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.up_reader: _BufReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        """Abort both sides now (the peers see EOF / a reset)."""
        if self.writer is not None:
            self.writer.transport.abort()
        else:
            self.sock.close()
        self.abort_upstream()

    def abort_upstream(self) -> None:
        if self.up_writer is not None:
            self.up_writer.transport.abort()
        self.up_reader = self.up_writer = None

    def close_upstream(self) -> None:
        if self.up_writer is not None:
            self.up_writer.close()
        self.up_reader = self.up_writer = None

    def client_eof(self) -> bool:
        return self.reader is not None and self.reader.eof

    def cut(self) -> None:
        self.abort()
        if self.task is not None:
            self.task.cancel()


class DockerProxy:
    """See the module docstring."""

    def __init__(
        self,
        listen_path: str,
        upstream_path: str = DEFAULT_UPSTREAM,
        *,
        max_seen: int = 1000,
        backlog: int = 128,
        sync_timeout: float = 10.0,
    ) -> None:
        self.listen_path = os.fspath(listen_path)
        self.upstream_path = os.fspath(upstream_path)
        self._backlog = backlog
        self._sync_timeout = sync_timeout
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._seen: deque[tuple[str, str]] = deque(maxlen=max_seen)
        self._counts = dict.fromkeys(
            ("requests", "forwarded", "failed", "connections", "upgrades", "chunked", "cut"), 0
        )
        self._down = False
        self._down_style: DownStyle = "refuse"
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._lsock: socket.socket | None = None
        self._placeholder: socket.socket | None = None
        self._conns: set[_Conn] = set()
        self._up_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    @property
    def docker_host(self) -> str:
        """The value for DOCKER_HOST (or ``aiodocker.Docker(url=...)``)."""
        return f"unix://{self.listen_path}"

    @property
    def running(self) -> bool:
        return self._running

    async def start(self) -> None:
        if self._running:
            raise RuntimeError("proxy already running")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._up_event = asyncio.Event()
        self._running = True
        try:
            self._sync_listener()
        except BaseException:
            self._running = False
            raise

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self._sync_listener()
        conns = list(self._conns)
        self._cut_all()
        if self._up_event is not None:
            self._up_event.set()
        tasks = [c.task for c in conns if c.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def start_in_thread(self, timeout: float = 10.0) -> Self:
        """Run the proxy on its own event loop in a daemon thread; returns once listening."""
        if self._thread is not None or self._running:
            raise RuntimeError("proxy already running")
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                try:
                    loop.run_until_complete(self.start())
                except BaseException as exc:
                    started.set_exception(exc)
                    return
                started.set_result(None)
                loop.run_forever()
                loop.run_until_complete(self.stop())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

        self._thread_loop = loop
        self._thread = threading.Thread(target=run, name=f"DockerProxy({self.listen_path})")
        self._thread.daemon = True
        self._thread.start()
        try:
            started.result(timeout)
        except BaseException:
            self._thread.join(timeout)
            self._thread = self._thread_loop = None
            raise
        return self

    def stop_thread(self, timeout: float = 10.0) -> None:
        thread, loop = self._thread, self._thread_loop
        if thread is None or loop is None:
            return
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already closing
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = self._thread_loop = None

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_thread()

    # ---- controls -----------------------------------------------------------------------

    def set_down(self, down: bool = True, *, style: DownStyle = "refuse") -> None:
        """Simulate an unreachable daemon (see module docstring); False brings it back."""
        if style not in get_args(DownStyle):
            raise ValueError(f"style must be one of {get_args(DownStyle)}")
        self._call(lambda: self._apply_down(down, style))

    @property
    def down(self) -> bool:
        return self._down

    def fail_next(
        self,
        n: int = 1,
        method: str | None = "POST",
        path_regex: str = r"/containers/create",
        status: int = 500,
        message: str = "injected fault",
        *,
        action: FaultAction = "error",
        when: FaultWhen = "before",
    ) -> FaultRule:
        """Fail the next ``n`` requests matching ``method`` and ``path_regex``."""
        return self._add_rule(FaultRule(method, path_regex, status, message, n, action, when))

    def fail_always(
        self,
        method: str | None = "POST",
        path_regex: str = r"/containers/create",
        status: int = 500,
        message: str = "injected fault",
        *,
        action: FaultAction = "error",
        when: FaultWhen = "before",
    ) -> FaultRule:
        """Fail every matching request until :meth:`clear`."""
        return self._add_rule(FaultRule(method, path_regex, status, message, None, action, when))

    def clear(self) -> None:
        """Remove every fault rule (does not change the down state or the counters)."""
        with self._lock:
            self._rules.clear()

    def rules(self) -> list[FaultRule]:
        with self._lock:
            return list(self._rules)

    def stats(self) -> ProxyStats:
        with self._lock:
            c = self._counts
            return ProxyStats(
                requests=c["requests"],
                forwarded=c["forwarded"],
                failed=c["failed"],
                connections=c["connections"],
                active_connections=len(self._conns),
                upgrades=c["upgrades"],
                chunked_responses=c["chunked"],
                cut=c["cut"],
                seen=tuple(self._seen),
            )

    def reset_stats(self) -> None:
        with self._lock:
            for k in self._counts:
                self._counts[k] = 0
            self._seen.clear()

    # ---- internals: state ---------------------------------------------------------------

    def _add_rule(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _note_request(self, head: _Head) -> FaultRule | None:
        method, target = head.start[0], head.start[1]
        with self._lock:
            self._counts["requests"] += 1
            self._seen.append((method, target))
            for rule in self._rules:
                if rule.active and rule.matches(method, target):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    rule.matched += 1
                    self._counts["failed"] += 1
                    return rule
        return None

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run fn on the proxy's loop (directly when already there or not started)."""
        loop = self._loop
        if (
            loop is None
            or not self._running
            or loop.is_closed()
            or threading.get_ident() == self._loop_thread
        ):
            return fn()
        fut: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return fut.result(self._sync_timeout)

    def _apply_down(self, down: bool, style: DownStyle) -> None:
        self._down, self._down_style = down, style
        if not self._running:
            return
        assert self._up_event is not None
        if down:
            self._up_event.clear()
            self._cut_all()
        else:
            self._up_event.set()
        self._sync_listener()

    def _cut_all(self) -> None:
        conns = list(self._conns)
        for conn in conns:
            conn.cut()
        self._count("cut", len(conns))

    # ---- internals: the listening socket ------------------------------------------------

    def _sync_listener(self) -> None:
        """Make the socket path match the state: listening, refusing, or absent."""
        want_listen = self._running and (not self._down or self._down_style == "hang")
        want_placeholder = self._running and self._down and self._down_style == "refuse"
        if not want_listen and self._lsock is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._lsock.fileno())
            self._lsock.close()
            self._lsock = None
        if not want_placeholder and self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        if self._lsock is None and self._placeholder is None:
            self._unlink_path()
        if want_listen and self._lsock is None:
            assert self._loop is not None
            sock = self._bind()
            sock.listen(self._backlog)
            self._lsock = sock
            self._loop.add_reader(sock.fileno(), self._on_acceptable, sock)
        if want_placeholder and self._placeholder is None:
            self._placeholder = self._bind()  # bound, never listening: ECONNREFUSED

    def _bind(self) -> socket.socket:
        self._unlink_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.listen_path)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _unlink_path(self) -> None:
        try:
            st = os.lstat(self.listen_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{self.listen_path} exists and is not a socket")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.listen_path)

    def _on_acceptable(self, lsock: socket.socket) -> None:
        assert self._loop is not None
        for _ in range(self._backlog):
            try:
                csock, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and friends: try again on the next readiness event
            csock.setblocking(False)
            conn = _Conn(csock)
            with self._lock:
                self._conns.add(conn)
                self._counts["connections"] += 1
            conn.task = self._loop.create_task(self._serve(conn))

    # ---- internals: serving a connection ------------------------------------------------

    async def _serve(self, conn: _Conn) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn.sock, limit=_STREAM_LIMIT)
            conn.reader, conn.writer = _BufReader(reader), writer
            if self._down and self._down_style == "hang":
                assert self._up_event is not None
                await self._up_event.wait()
                return
            while await self._one_request(conn):
                pass
        except (OSError, EOFError, _ProtocolError, asyncio.IncompleteReadError, ValueError):
            pass
        except Exception:
            _log.exception("dockerproxy: unexpected error on a connection")
        finally:
            with self._lock:
                self._conns.discard(conn)
            if conn.writer is not None:
                conn.writer.close()
            else:
                conn.sock.close()
            conn.close_upstream()

    async def _one_request(self, conn: _Conn) -> bool:
        """Handle one request; True to keep the client connection for another one."""
        assert conn.reader is not None and conn.writer is not None
        try:
            raw = await conn.reader.readuntil(b"\r\n\r\n", _MAX_HEAD)
        except asyncio.IncompleteReadError:
            return False  # the client closed (between requests, or mid-head)
        req = _parse_head(raw, response=False)
        version = req.start[2]
        req_close = req.wants_close(version)
        framing, length = _request_framing(req)
        expect_continue = "100-continue" in req.tokens("expect")
        rule = self._note_request(req)

        if rule is not None and rule.when == "before":
            if expect_continue:  # the client waits before sending its body: do not read it
                await _write(conn.writer, _error_response(rule.status, rule.message, True))
                return False
            await _copy_body(conn.reader, None, framing, length)
            if rule.action == "drop":
                return False
            await _write(conn.writer, _error_response(rule.status, rule.message, req_close))
            return not req_close

        if conn.up_writer is not None and (
            conn.up_writer.transport.is_closing()
            or (conn.up_reader is not None and conn.up_reader.at_eof())
        ):
            conn.close_upstream()  # the daemon closed the idle connection: open a new one
        if conn.up_writer is None:
            try:
                up_r, up_w = await asyncio.open_unix_connection(
                    self.upstream_path, limit=_STREAM_LIMIT
                )
            except OSError:
                return False  # the real daemon is unreachable: so are we
            conn.up_reader, conn.up_writer = _BufReader(up_r), up_w
        up_reader, up_writer = conn.up_reader, conn.up_writer
        assert up_reader is not None

        if expect_continue:  # answer 100 ourselves, the daemon gets a plain request
            await _write(conn.writer, b"HTTP/1.1 100 Continue\r\n\r\n")
            await _write(up_writer, req.without("expect"))
        else:
            await _write(up_writer, req.raw)
        await _copy_body(conn.reader, up_writer, framing, length)
        self._count("forwarded")

        watcher = asyncio.create_task(self._watch_client(conn, up_writer))
        try:
            return await self._relay_response(conn, req, req_close, rule, watcher)
        finally:
            await _cancel_and_wait(watcher)

    async def _watch_client(self, conn: _Conn, up_writer: asyncio.StreamWriter) -> None:
        """While a response is pending: forward a client EOF upstream as a half-close."""
        assert conn.reader is not None
        try:
            if not await conn.reader.fill() and up_writer.can_write_eof():
                up_writer.write_eof()
        except OSError:
            conn.abort()

    async def _relay_response(
        self,
        conn: _Conn,
        req: _Head,
        req_close: bool,
        rule: FaultRule | None,
        watcher: asyncio.Task[None],
    ) -> bool:
        assert conn.writer is not None and conn.up_reader is not None
        client = None if rule is not None else conn.writer  # "after" faults swallow it all
        while True:
            try:
                raw = await conn.up_reader.readuntil(b"\r\n\r\n", _MAX_HEAD)
            except asyncio.IncompleteReadError:
                return False  # the daemon closed without answering: so do we
            resp = _parse_head(raw, response=True)
            status = int(resp.start[1])
            if 100 <= status < 200 and status != 101:
                await _write(client, raw)  # interim response
                continue
            break
        framing, length = _response_framing(req, resp)

        if rule is not None:  # when == "after": the daemon did it, the client hears otherwise
            if framing == "tunnel":
                conn.abort_upstream()
                keep = False
            else:
                await _copy_body(conn.up_reader, None, framing, length)
                if resp.wants_close(resp.start[0]):
                    conn.close_upstream()  # a fresh one is opened for the next request
                keep = not req_close
            if rule.action == "drop":
                return False
            await _write(conn.writer, _error_response(rule.status, rule.message, not keep))
            return keep

        await _write(conn.writer, raw)
        if framing == "tunnel":
            await _cancel_and_wait(watcher)
            self._count("upgrades")
            await self._tunnel(conn)
            return False
        if framing == "chunked":
            self._count("chunked")
        try:
            await _copy_body(conn.up_reader, conn.writer, framing, length)
        except (asyncio.IncompleteReadError, _ProtocolError):
            conn.abort()  # truncated body: make sure the client notices
            return False
        if resp.wants_close(resp.start[0]):
            return False
        return not req_close and not conn.client_eof()

    async def _tunnel(self, conn: _Conn) -> None:
        assert conn.reader is not None and conn.writer is not None
        assert conn.up_reader is not None and conn.up_writer is not None

        async def pump(src: _BufReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read_some():
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except OSError:
                conn.abort()

        await asyncio.gather(pump(conn.reader, conn.up_writer), pump(conn.up_reader, conn.writer))


# --------------------------------------------------------------------------------------------
# Control interface


_RULE_KEYS = {"n", "method", "path_regex", "status", "message", "action", "when"}


def _control_command(proxy: DockerProxy, line: str) -> tuple[dict[str, Any], bool]:
    """Execute one control line; returns (answer, shutdown?)."""
    cmd, _, rest = line.strip().partition(" ")
    cmd = cmd.upper()
    rest = rest.strip()
    args: dict[str, Any] = {}
    if rest.startswith("{"):
        loaded = json.loads(rest)
        if not isinstance(loaded, dict):
            raise ValueError("arguments must be a JSON object")
        args = loaded
    elif rest:
        args = {"_word": rest}
    if cmd == "PING":
        return {"ok": True}, False
    if cmd == "STATS":
        return {"ok": True, "stats": proxy.stats().as_dict()}, False
    if cmd == "RESET_STATS":
        proxy.reset_stats()
        return {"ok": True}, False
    if cmd == "DOWN":
        style = args.get("style", args.get("_word", "refuse"))
        proxy.set_down(True, style=cast(DownStyle, style))
        return {"ok": True}, False
    if cmd == "UP":
        proxy.set_down(False)
        return {"ok": True}, False
    if cmd in ("FAIL_NEXT", "FAIL_ALWAYS"):
        unknown = set(args) - _RULE_KEYS
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        kwargs = dict(args)
        if cmd == "FAIL_ALWAYS":
            if "n" in kwargs:
                raise ValueError("FAIL_ALWAYS takes no n")
            proxy.fail_always(**kwargs)
        else:
            proxy.fail_next(**kwargs)
        return {"ok": True}, False
    if cmd == "CLEAR":
        proxy.clear()
        return {"ok": True}, False
    if cmd == "SHUTDOWN":
        return {"ok": True}, True
    raise ValueError(f"unknown command {cmd!r}")


async def start_control_server(
    proxy: DockerProxy, port: int, on_shutdown: Callable[[], None]
) -> asyncio.Server:
    """Serve the line protocol on 127.0.0.1:port (0 = any free port)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if not line.strip():
                    continue
                shutdown = False
                try:
                    answer, shutdown = _control_command(proxy, line.decode())
                except (ValueError, TypeError, re.error) as exc:
                    answer = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
                if shutdown:
                    on_shutdown()
                    break
        except OSError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


class ProxyControl:
    """Blocking client for the control interface of ``python -m tests.faults.dockerproxy``."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout

    def command(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        line = cmd if args is None else f"{cmd} {json.dumps(args)}"
        with socket.create_connection((self.host, self.port), self.timeout) as s:
            s.sendall(line.encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                data = s.recv(65536)
                if not data:
                    break
                buf += data
        answer = cast(dict[str, Any], json.loads(buf))
        if not answer.get("ok"):
            raise RuntimeError(f"{cmd}: {answer.get('error')}")
        return answer

    def ping(self) -> None:
        self.command("PING")

    def set_down(self, down: bool = True, style: DownStyle = "refuse") -> None:
        if down:
            self.command("DOWN", {"style": style})
        else:
            self.command("UP")

    def fail_next(self, n: int = 1, **kwargs: Any) -> None:
        self.command("FAIL_NEXT", {"n": n, **kwargs})

    def fail_always(self, **kwargs: Any) -> None:
        self.command("FAIL_ALWAYS", kwargs)

    def clear(self) -> None:
        self.command("CLEAR")

    def stats(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.command("STATS")["stats"])

    def reset_stats(self) -> None:
        self.command("RESET_STATS")

    def shutdown(self) -> None:
        self.command("SHUTDOWN")


# --------------------------------------------------------------------------------------------
# Standalone process


async def _amain(args: argparse.Namespace) -> int:
    proxy = DockerProxy(args.listen_path, args.upstream)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server: asyncio.Server | None = None
    try:
        if args.control is not None:
            server = await start_control_server(proxy, args.control, stop.set)
            port = server.sockets[0].getsockname()[1]
            print(f"CONTROL 127.0.0.1:{port}", flush=True)
        print(f"LISTENING {proxy.listen_path}", flush=True)
        print("READY", flush=True)
        await stop.wait()
    finally:
        if server is not None:
            server.close()
        await proxy.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.dockerproxy",
        description="Fault-injecting proxy for the Docker Engine API (see module docstring).",
    )
    parser.add_argument("listen_path", help="Unix socket path to listen on")
    parser.add_argument("--upstream", default=DEFAULT_UPSTREAM, help="the real daemon socket")
    parser.add_argument(
        "--control",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the line-based control protocol on 127.0.0.1:PORT (0 = any free port)",
    )
    args = parser.parse_args(argv)
    return asyncio.run(_amain(args))


if __name__ == "__main__":
    sys.exit(main())
