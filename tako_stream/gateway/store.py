"""The gateway's state on disk: results, queued and running jobs and dead letters, in SQLite.

The store is a materialised view of four topics, as a Kafka Streams KTable or a faust table on
RocksDB is: every batch read from them is applied together with the positions it reached, in
one transaction, so a restart resumes where the store left off instead of reading the topics
again.  Lookups by execution id are point reads on a primary key, whatever partition (and so
whatever partitioner) a record came through; ``/executions`` pages through an index on
``finished_at``, picking a page's row ids at once and reading its bodies a batch at a time
(row ids are never used twice, so a picked one reads its row or nothing, never another).
Memory is SQLite's page cache and one batch, whatever the topics' size.

Connections are not shared between threads: the writer has its own, each reader thread its own
(WAL mode lets readers run while the writer writes).  Callers run these methods in threads
(``gateway.views``), never on the event loop.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from tako_stream.core.models import PAYLOAD_HEADER
from tako_stream.dlq import summarise
from tako_stream.kafka.codec import header, usable_id
from tako_stream.kafka.message import position_id
from tako_stream.kafka.reader import Record
from tako_stream.settings import Topics

log = logging.getLogger(__name__)

SCHEMA = """
-- AUTOINCREMENT: a row id is never used twice in a store (not after the row with the highest
-- id is deleted, not after a reset), so a page, which picks its row ids first and reads their
-- values later, never reads another row under a picked id: a row deleted or replaced since is
-- gone, not a stranger at that place that may not match the page's filter.
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    execution_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    job_type TEXT,
    finished_at TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS results_by_time ON results (finished_at DESC);
CREATE INDEX IF NOT EXISTS results_by_status ON results (status, finished_at DESC);
CREATE INDEX IF NOT EXISTS results_by_type ON results (job_type, finished_at DESC);
CREATE TABLE IF NOT EXISTS running (
    execution_id TEXT PRIMARY KEY,
    worker_id TEXT NOT NULL,
    started_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    execution_id TEXT PRIMARY KEY,
    digest TEXT,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    produced_ms INTEGER
);
-- Requests without a result yet, by their place in the requests topic: a job's queue position
-- is how many of them are ahead of it in its partition (the order workers take them in).
CREATE TABLE IF NOT EXISTS pending (
    execution_id TEXT PRIMARY KEY,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_by_place ON pending (partition, offset);
CREATE TABLE IF NOT EXISTS dead_letters (  -- AUTOINCREMENT: as results
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dlq_id TEXT NOT NULL UNIQUE,
    error_type TEXT NOT NULL,
    last_failure_at TEXT NOT NULL,
    summary BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_time ON dead_letters (last_failure_at);
CREATE TABLE IF NOT EXISTS positions (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    last_record TEXT NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""

#: The tables a reset empties (all of them: they are rebuilt from the topics).  Not
#: sqlite_sequence: row ids go on from where they were, never used twice (see SCHEMA).
TABLES = ("results", "running", "requests", "pending", "dead_letters", "positions")
#: Bumped whenever SCHEMA changes what a table holds: a store of another version is rebuilt
#: from the topics (it is only a view of them), not migrated.  4: the models bound numbers to
#: 64 bits and correlation ids to 256 characters, so a store may hold summaries they refuse.
#: 5: results and dead letters get AUTOINCREMENT row ids (a page's picked ids name its rows).
SCHEMA_VERSION = 5


@dataclass(frozen=True)
class Request:
    """The first request record seen for an execution id (the one workers run)."""

    digest: str | None
    partition: int
    offset: int
    produced_ms: int | None


@dataclass(frozen=True)
class Job:
    """What the store knows of one execution id."""

    result: bytes | None = None
    running: tuple[str, str] | None = None  # (worker_id, started_at)
    request: Request | None = None


class Store:
    """A SQLite database file; ``writer()`` and ``reader()`` give this thread's connection."""

    def __init__(self, path: Path, *, cache_mb: int) -> None:
        self.path = path
        self.cache_mb = cache_mb
        self._local = threading.local()
        #: Records skipped because the store cannot use them, per kind ("results", "dead
        #: letters"); only the first of each kind is logged (see ``_skip``).
        self.skipped: Counter[str] = Counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version != SCHEMA_VERSION:
                # Not SQLite's own (sqlite_sequence may not be dropped; a table dropped takes
                # its row there with it).
                for (table,) in db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
                ).fetchall():
                    db.execute(f'DROP TABLE IF EXISTS "{table}"')
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        finally:
            db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses at most the last batches,
        db.execute(f"PRAGMA cache_size=-{self.cache_mb * 1024}")  # which are read again
        db.execute("PRAGMA busy_timeout=5000")
        return db

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- writing (the materialiser's thread) --------------------------------------------------

    def apply(self, records: Iterable[Record], topics: Topics) -> list[str]:
        """Fold a batch in, with the positions it reached, atomically; the execution ids that
        got a result."""
        db = self._db()
        answered: list[str] = []
        reached: dict[tuple[str, int], tuple[int, str]] = {}
        db.execute("BEGIN")
        try:
            for record in records:
                reached[(record.topic, record.partition)] = (record.offset + 1, fingerprint(record))
                if record.topic == topics.results:
                    if self._result(db, record):
                        answered.append(record.key.decode("utf-8", "replace") if record.key else "")
                elif record.topic == topics.status:
                    self._status(db, record)
                elif record.topic == topics.requests:
                    self._request(db, record)
                elif record.topic == topics.dlq:
                    self._dead_letter(db, record)
            db.executemany(
                "INSERT OR REPLACE INTO positions VALUES (?, ?, ?, ?)",
                [(t, p, o, last) for (t, p), (o, last) in reached.items()],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return answered

    def _result(self, db: sqlite3.Connection, record: Record) -> bool:
        keyed = _keyed(db, record, "results", "execution_id")
        if keyed is None:
            return False
        execution_id, value = keyed
        try:
            body = orjson.loads(value)
            status, finished_at = str(body["status"]), sortable(body["finished_at"])
            # The job type's name, as Tako VM's job_type filter names it (a pin is not a type).
            job_type = str(body["job_type"]).partition("@")[0] if body.get("job_type") else None
        except Exception as exc:  # noise, or a time that is none or overflows in UTC: anyone
            self._skip("results", record, exc)  # may write here, and raised it would stop
            return False  # the store's reader (and again on every restart)
        db.execute(
            "INSERT OR REPLACE INTO results (execution_id, status, job_type, finished_at, body) "
            "VALUES (?, ?, ?, ?, ?)",
            (execution_id, status, job_type, finished_at, value),
        )
        # A finished job is not running any more, whatever the status topic says later.
        db.execute("DELETE FROM running WHERE execution_id = ?", (execution_id,))
        db.execute("DELETE FROM pending WHERE execution_id = ?", (execution_id,))
        return True

    def _status(self, db: sqlite3.Connection, record: Record) -> None:
        keyed = _keyed(db, record, "running", "execution_id")
        if keyed is None:
            return
        execution_id, value = keyed
        try:
            body = orjson.loads(value)
            worker_id, started_at = str(body["worker_id"]), str(body["at"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        db.execute(
            "INSERT OR REPLACE INTO running "
            "SELECT ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM results WHERE execution_id = ?)",
            (execution_id, worker_id, started_at, execution_id),
        )

    def _request(self, db: sqlite3.Connection, record: Record) -> None:
        execution_id = _request_id(record)
        digest = header(record.headers, PAYLOAD_HEADER)
        first = db.execute(  # the first record for an id is the one that counts
            "INSERT OR IGNORE INTO requests VALUES (?, ?, ?, ?, ?)",
            (
                execution_id,
                digest.decode("ascii", "replace") if digest else None,
                record.partition,
                record.offset,
                record.timestamp,
            ),
        )
        if first.rowcount:  # results and requests are separate topics: either may come first
            db.execute(
                "INSERT OR IGNORE INTO pending SELECT ?, ?, ? "
                "WHERE NOT EXISTS (SELECT 1 FROM results WHERE execution_id = ?)",
                (execution_id, record.partition, record.offset, execution_id),
            )

    def _dead_letter(self, db: sqlite3.Connection, record: Record) -> None:
        keyed = _keyed(db, record, "dead_letters", "dlq_id")
        if keyed is None:
            return
        dlq_id, value = keyed
        try:
            error_type, summary = summarise(value)
            last_failure_at = sortable(orjson.loads(summary)["last_failure_at"])
        except Exception as exc:  # as for results (a valid record may still overflow in UTC)
            self._skip("dead letters", record, exc)
            return
        db.execute(
            "INSERT OR REPLACE INTO dead_letters (dlq_id, error_type, last_failure_at, summary) "
            "VALUES (?, ?, ?, ?)",
            (dlq_id, error_type.value, last_failure_at, summary),
        )

    def _skip(self, kind: str, record: Record, exc: Exception) -> None:
        """Count a record the store cannot use; the first of each kind is logged (a line per
        record would let any producer flood the log)."""
        if not self.skipped[kind]:
            log.warning(
                "%s: skipped a record the store cannot use (%s[%d]@%d: %s); "
                "more like it are counted, not logged",
                kind,
                record.topic,
                record.partition,
                record.offset,
                repr(exc)[:300],
            )
        self.skipped[kind] += 1

    # -- reading (any thread) -----------------------------------------------------------------

    def positions(self) -> dict[tuple[str, int], int]:
        """Per partition, the next offset to read (saved with the batch that reached it)."""
        rows = self._db().execute("SELECT topic, partition, next_offset FROM positions")
        return {(t, p): o for t, p, o in rows}

    def last_records(self) -> dict[tuple[str, int], tuple[int, str]]:
        """Per partition: the offset and fingerprint of the last record read."""
        rows = self._db().execute(
            "SELECT topic, partition, next_offset, last_record FROM positions"
        )
        return {(t, p): (o - 1, f) for t, p, o, f in rows}

    def reset(self) -> None:
        """Forget everything: the topics were recreated (a broker that keeps nothing on disk,
        restarted), so the store is rebuilt from them."""
        db = self._db()
        db.execute("BEGIN")
        for table in TABLES:
            db.execute(f"DELETE FROM {table}")
        db.execute("COMMIT")

    def job(self, execution_id: str) -> Job:
        db = self._db()
        row = db.execute(
            "SELECT body FROM results WHERE execution_id = ?", (execution_id,)
        ).fetchone()
        if row is not None:
            return Job(result=row[0], request=self.request(execution_id))
        running = db.execute(
            "SELECT worker_id, started_at FROM running WHERE execution_id = ?", (execution_id,)
        ).fetchone()
        request = self.request(execution_id)
        return Job(running=(running[0], running[1]) if running else None, request=request)

    def request(self, execution_id: str) -> Request | None:
        query = "SELECT digest, partition, offset, produced_ms FROM requests WHERE execution_id = ?"
        row = self._db().execute(query, (execution_id,)).fetchone()
        return Request(*row) if row else None

    def execution_rows(
        self, *, limit: int, offset: int, status: str | None, job_type: str | None
    ) -> tuple[int, list[int]]:
        """(how many match, the row ids of the page's results, newest first), read in one
        transaction; their bodies are read in batches (``result_bodies``), so a page is picked
        at once while its bodies never all are.  ``status`` is Tako VM's: ``failed`` includes
        the ``rejected``."""
        clauses: list[str] = []
        args: list[str] = []
        if status is not None:
            statuses = ("failed", "rejected") if status == "failed" else (status,)
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(statuses)
        if job_type is not None:
            clauses.append("job_type = ?")
            args.append(job_type.partition("@")[0])
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        # Ties in time by row id: the order pages are cut in is the same on every request
        # (the indexes hold the row id after the time, so no sort is added for it).
        return self._page(
            f"SELECT COUNT(*) FROM results{where}",
            f"SELECT rowid FROM results{where} ORDER BY finished_at DESC, rowid LIMIT ? OFFSET ?",
            args,
            limit,
            offset,
        )

    def result_bodies(
        self, rowids: Sequence[int], *, budget: int
    ) -> list[tuple[bytes, int | None] | None]:
        """The result bodies (with their requests' produce times) of the first of ``rowids``
        whose bodies add up to ``budget`` bytes (at least one); None for a row gone since it
        was picked (deleted, or replaced by a later result for its id)."""
        return self._bodies(
            "SELECT body, requests.produced_ms FROM results LEFT JOIN requests "
            "USING (execution_id) WHERE results.rowid = ?",
            rowids,
            budget,
        )

    def _page(
        self, count: str, pick: str, args: Sequence[str], limit: int, offset: int
    ) -> tuple[int, list[int]]:
        """A page's total and row ids, read together (one snapshot: ``has_more`` and the
        rows agree)."""
        db = self._db()
        db.execute("BEGIN")
        try:
            (total,) = db.execute(count, args).fetchone()
            rowids = [rowid for (rowid,) in db.execute(pick, (*args, limit, offset))]
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return int(total), rowids

    def _bodies(self, query: str, rowids: Sequence[int], budget: int) -> list[Any]:
        """``query``'s row (a value first) for each of ``rowids`` in turn, until the values
        read add up to ``budget`` bytes: one row at a time, so no more is ever read than a
        batch keeps (a page's rows may each be as large as a message)."""
        db = self._db()
        rows: list[Any] = []
        size = 0
        for rowid in rowids:
            row = db.execute(query, (rowid,)).fetchone()
            rows.append(row)
            size += len(row[0]) if row is not None else 0
            if size >= budget:
                break
        return rows

    def queue_position(self, execution_id: str) -> int | None:
        """1 + the jobs ahead of this waiting one in its partition (neither running nor
        finished); None when it is not waiting."""
        db = self._db()
        row = db.execute(
            "SELECT partition, offset FROM pending WHERE execution_id = ? AND NOT EXISTS "
            "(SELECT 1 FROM running WHERE running.execution_id = pending.execution_id)",
            (execution_id,),
        ).fetchone()
        if row is None:
            return None
        (ahead,) = db.execute(
            "SELECT COUNT(*) FROM pending WHERE partition = ? AND offset < ? AND NOT EXISTS "
            "(SELECT 1 FROM running WHERE running.execution_id = pending.execution_id)",
            row,
        ).fetchone()
        return int(ahead) + 1

    def queue_counts(self) -> tuple[int, int]:
        """(jobs waiting, jobs running) across the cluster."""
        db = self._db()
        (waiting,) = db.execute(
            "SELECT COUNT(*) FROM pending WHERE NOT EXISTS "
            "(SELECT 1 FROM running WHERE running.execution_id = pending.execution_id)"
        ).fetchone()
        (running,) = db.execute("SELECT COUNT(*) FROM running").fetchone()
        return int(waiting), int(running)

    def known(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def dead_letter(self, dlq_id: str) -> bytes | None:
        row = (
            self._db()
            .execute("SELECT summary FROM dead_letters WHERE dlq_id = ?", (dlq_id,))
            .fetchone()
        )
        return bytes(row[0]) if row else None

    def dead_letter_rows(
        self,
        *,
        error_type: str | None,
        since: str | None,
        until: str | None,
        limit: int,
        offset: int = 0,
    ) -> tuple[int, list[int]]:
        """(how many match, the row ids of ``limit`` of them from the ``offset``-th oldest),
        as ``execution_rows``; their summaries are read by ``dead_letter_summaries``."""
        clauses, args = [], []
        for sql, value in (
            ("error_type = ?", error_type),
            ("last_failure_at >= ?", since),
            ("last_failure_at <= ?", until),
        ):
            if value is not None:
                clauses.append(sql)
                args.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        return self._page(
            f"SELECT COUNT(*) FROM dead_letters{where}",
            f"SELECT rowid FROM dead_letters{where} ORDER BY last_failure_at, rowid "
            "LIMIT ? OFFSET ?",
            args,
            limit,
            offset,
        )

    def dead_letter_summaries(self, rowids: Sequence[int], *, budget: int) -> list[bytes | None]:
        """The summaries of the first of ``rowids`` up to ``budget`` bytes, as
        ``result_bodies``."""
        rows = self._bodies("SELECT summary FROM dead_letters WHERE rowid = ?", rowids, budget)
        return [bytes(row[0]) if row is not None else None for row in rows]

    def dead_letter_total(self) -> int:
        (count,) = self._db().execute("SELECT COUNT(*) FROM dead_letters").fetchone()
        return int(count)

    def dead_letter_counts(self) -> dict[str, int]:
        rows = self._db().execute(
            "SELECT error_type, COUNT(*) FROM dead_letters GROUP BY error_type ORDER BY error_type"
        )
        return {t: int(n) for t, n in rows}


def _keyed(
    db: sqlite3.Connection, record: Record, table: str, column: str
) -> tuple[str, bytes] | None:
    """A keyed table's record as (key, value); None once nothing is left to do with it: no key
    (not ours), or a tombstone (the row for its key deleted here)."""
    if record.key is None:
        return None
    key = record.key.decode("utf-8", "replace")
    if record.value is None:
        db.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,))
        return None
    return key, record.value


def _request_id(record: Record) -> str:
    """A request's execution id, as a worker takes it: the body's, else the key, else its
    position; the body is parsed only when it names one (a cheap check first)."""
    if record.value is not None and b'"execution_id"' in record.value:
        try:
            found = usable_id(orjson.loads(record.value).get("execution_id"))
        except (orjson.JSONDecodeError, AttributeError):
            found = None
        if found is not None:
            return found
    return usable_id(record.key) or position_id(record.topic, record.partition, record.offset)


def fingerprint(record: Record) -> str:
    """What identifies a record at its offset: its timestamp and a digest of its key."""
    key = hashlib.sha1(record.key or b"", usedforsecurity=False).hexdigest()[:16]
    return f"{record.timestamp}:{key}"


def sortable(moment: str | datetime) -> str:
    """A time as text that sorts as the time does (fixed width, UTC, microseconds always)."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
