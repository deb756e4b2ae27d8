"""Pages of the gateway's lists (``/executions``, ``/dlq``), served in bounded memory and
event-loop time whatever the size of the values listed.

A page holds up to 1000 stored values, and one result may be as large as a message (its output
alone up to 1 MiB).  Read, validated and encoded at once on the event loop, a page was
gigabytes held and seconds during which the gateway answered nothing else, ``/health``
included.  Here a page's rows are picked in one read (their count and row ids: a few bytes
each), then their values are read ``BATCH_BYTES`` at a time in a reader thread, where each is
validated and encoded too; the event loop only writes bytes.  A page whose values fit one
batch is answered as before, with a Content-Length; a longer one is streamed (chunked), each
batch written before the next is read: a slow client slows its own page and holds one batch,
never the page, and one that takes nothing for ``WRITE_WAIT`` seconds is dropped.

Pages are bounded together too.  At most ``views.PAGES`` are in flight (from picking their
rows to their last byte); one more waits ``PAGE_WAIT`` seconds for a slot, then is answered
503 with a Retry-After, before it has sent anything.  Their batches are read in their own
threads (``views.PAGE_READERS``), not the store's reader threads: lookups and ``/health`` never
queue behind a page's validation and encoding.  A streamed page not done within
``PAGE_DEADLINE`` seconds of its start is aborted as a stalled one is: a client that takes a
few bytes now and then cannot hold a slot and a batch for ever.

Tako VM's shape is kept byte for byte: ``items`` first (so ``count``, known only once they are
made, still comes after them), then ``limit``, ``offset``, ``has_more``, ``count``, ``total``.
``has_more`` counts the rows read, not the items served: a row left out (a value no item can
be made of) does not make the last page look unfinished to a client that pages by ``count``.

Once the headers are sent, a failure can no longer be a status code: it is logged and the
connection aborted, so the client sees a broken answer (no chunked terminator) rather than a
short page that looks whole.  Everything that can fail before (the query, the store not
ready, the first batch) still answers with a status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import orjson
from aiohttp import web

from tako_stream.gateway.shapes import execution_record, iso_ms, tako_dlq_item
from tako_stream.gateway.store import Store
from tako_stream.gateway.views import ClusterView, servable

log = logging.getLogger(__name__)

V = TypeVar("V")

#: Stored bytes read, validated and encoded per trip to a reader thread: what a page holds at
#: once (with the items made of them; a batch has at least one row, whatever its size).
BATCH_BYTES = 1 << 20
#: Bytes gathered before a write: small items go out together, not a chunk each.
WRITE_BYTES = 1 << 16
#: Seconds one write of a page may wait for the client to take it (aiohttp waits while the
#: client is behind): past it the client is dropped, and the batch held for it let go.
WRITE_WAIT = 60.0
#: Seconds a page may take from start to last byte: past it a streamed page is aborted as a
#: stalled one is.  ``WRITE_WAIT`` drops a client that takes nothing, not one that takes a
#: few bytes a minute, which would hold its slot (``views.PAGES``) and its batch for as long
#: as it liked.  The largest page (1000 results, up to a GiB) goes out in well under this at
#: 5 MB/s; a client slower than that pages with a smaller ``limit``.
PAGE_DEADLINE = 300.0
#: Seconds a page waits for a slot when ``views.PAGES`` are in flight, then 503 (Retry-After).
PAGE_WAIT = 5.0

_HEAD = b'{"items":['


@dataclass(frozen=True)
class Listing(Generic[V]):
    """How a list's page is read: its rows (a store's ``*_rows`` method), their stored values
    for the first of some row ids up to a byte budget, and each value's item as JSON (None:
    a value no item can be made of, left out of the page)."""

    rows: Callable[[Store], tuple[int, list[int]]]
    values: Callable[[Store, Sequence[int], int], list[V | None]]
    item: Callable[[V], bytes | None]


def _encoded(item: object) -> bytes | None:
    """``item`` as JSON, in bytes of its own size: orjson's output keeps the working buffer it
    was written in allocated, 16 to 34 times the length of the item's longest string
    (measured), and a batch holds its items until they are written."""
    try:
        return bytes(memoryview(orjson.dumps(item)))
    except orjson.JSONEncodeError:
        # A number past 64 bits in another producer's record (pydantic reads it as an int,
        # orjson cannot write it): the rows that encode, not a 500 for every reader.
        log.debug("left out a stored value whose item cannot be encoded", exc_info=True)
        return None


def executions(
    *, limit: int, offset: int, status: str | None, job_type: str | None, full: bool
) -> Listing[tuple[bytes, int | None]]:
    """Finished executions, newest first, as Tako VM's records (``full``: its full ones)."""

    def item(row: tuple[bytes, int | None]) -> bytes | None:
        body, produced_ms = row
        result = servable(body)  # another producer's record: one row, never the whole page
        if result is None:
            return None
        try:
            record = execution_record(result, created_at=iso_ms(produced_ms), full=full)
        except (ValueError, OverflowError):
            # a value no answer holds that nothing foresaw
            log.debug("left out a stored result that cannot be served", exc_info=True)
            return None
        return _encoded(record)

    return Listing(
        rows=lambda store: store.execution_rows(
            limit=limit, offset=offset, status=status, job_type=job_type
        ),
        values=lambda store, rowids, budget: store.result_bodies(rowids, budget=budget),
        item=item,
    )


def dead_letters(
    *, error_type: str | None, since: str | None, until: str | None, limit: int, offset: int
) -> Listing[bytes]:
    """DLQ entries, oldest first, as Tako VM lists them."""

    def item(summary: bytes) -> bytes | None:
        try:
            entry = tako_dlq_item(summary)
        except ValueError:  # the store keeps only summaries it made; as for results
            log.debug("left out a stored DLQ summary that cannot be served", exc_info=True)
            return None
        return _encoded(entry)

    return Listing(
        rows=lambda store: store.dead_letter_rows(
            error_type=error_type, since=since, until=until, limit=limit, offset=offset
        ),
        values=lambda store, rowids, budget: store.dead_letter_summaries(rowids, budget=budget),
        item=item,
    )


def _tail(*, limit: int, offset: int, has_more: bool, count: int, total: int) -> bytes:
    """What follows the items: ``],`` and the page's other keys, as one object's would."""
    rest = {"limit": limit, "offset": offset, "has_more": has_more, "count": count, "total": total}
    return b"]," + orjson.dumps(rest)[1:]


class _Batches(Generic[V]):
    """A page's items, a batch at a time (each made in a reader thread)."""

    def __init__(self, view: ClusterView, listing: Listing[V], rowids: list[int]) -> None:
        self._view = view
        self._listing = listing
        self._rowids = rowids
        self._at = 0  # rows read so far

    @property
    def done(self) -> bool:
        return self._at >= len(self._rowids)

    async def next(self) -> list[bytes]:
        if self.done:
            return []
        values = self._listing.values
        read, items = await self._view.page_items(
            lambda store, rowids: values(store, rowids, BATCH_BYTES),
            self._rowids[self._at :],
            self._listing.item,
        )
        if read <= 0:  # a store that read nothing of what is left would loop here forever
            raise RuntimeError("a page's batch read no row")
        self._at += read
        return items


class _Out:
    """Bytes to a streamed page: small pieces gathered up to ``WRITE_BYTES`` a write, each
    write waited for at most ``WRITE_WAIT`` seconds (ConnectionAbortedError past it)."""

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response
        self._pending: list[bytes] = []
        self._size = 0

    async def add(self, data: bytes) -> None:
        self._pending.append(data)
        self._size += len(data)
        if self._size >= WRITE_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending, self._size = [], 0
        try:
            async with asyncio.timeout(WRITE_WAIT):
                await self._response.write(data)
        except TimeoutError:
            raise ConnectionAbortedError(
                f"the client took no part of a write for {WRITE_WAIT:g} s"
            ) from None


async def serve(
    request: web.Request, view: ClusterView, listing: Listing[V], *, limit: int, offset: int
) -> web.StreamResponse:
    """The page of ``listing`` from ``offset``, ``limit`` rows at most (a query already
    checked: nothing after the headers can answer 422), in one of the view's page slots
    (``Busy``, a 503, when none is free within ``PAGE_WAIT``), done within ``PAGE_DEADLINE``."""
    async with view.page_slots.slot(PAGE_WAIT):
        deadline = asyncio.get_running_loop().time() + PAGE_DEADLINE
        return await _serve(request, view, listing, limit=limit, offset=offset, deadline=deadline)


async def _serve(
    request: web.Request,
    view: ClusterView,
    listing: Listing[V],
    *,
    limit: int,
    offset: int,
    deadline: float,
) -> web.StreamResponse:
    total, rowids = await view.page_rows(listing.rows)
    has_more = offset + len(rowids) < total
    batches = _Batches(view, listing, rowids)
    items = await batches.next()
    if batches.done:  # one batch: the whole page at once, with a Content-Length, as before
        tail = _tail(limit=limit, offset=offset, has_more=has_more, count=len(items), total=total)
        return web.Response(
            body=b"".join((_HEAD, b",".join(items), tail)), content_type="application/json"
        )
    response = web.StreamResponse()
    response.content_type = "application/json"
    await response.prepare(request)
    if request.method == "HEAD":  # headers only (aiohttp sends no body for HEAD)
        return response
    out = _Out(response)
    count = 0
    finished = False
    try:
        async with asyncio.timeout_at(deadline):
            await out.add(_HEAD)
            while True:
                for n, item in enumerate(items):
                    items[n] = b""  # let each go once written: one batch held, less as it goes
                    await out.add(b"," + item if count else item)
                    count += 1
                if batches.done:
                    break
                items = await batches.next()
            tail = _tail(limit=limit, offset=offset, has_more=has_more, count=count, total=total)
            await out.add(tail)
            await out.flush()
            finished = True
    except ConnectionError as exc:  # aiohttp's ClientConnectionResetError is one
        log.info("a page of %s was cut short by its client (%s)", request.path, exc)
    except TimeoutError:  # the deadline's (a write's own wait is a ConnectionAbortedError)
        log.info(
            "a page of %s was not done within %g s: its connection is aborted",
            request.path,
            PAGE_DEADLINE,
        )
    except Exception:
        log.exception(
            "a page of %s failed after its headers were sent: its connection is aborted, so "
            "the client sees a broken answer rather than a short one",
            request.path,
        )
    finally:
        if not finished and request.transport is not None:
            request.transport.abort()
    return response
