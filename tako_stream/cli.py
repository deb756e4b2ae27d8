"""``tako-stream``: the one command-line entry point.

Exit codes a shell can rely on: 0 success (for ``submit --wait``: the job succeeded), 1 the job
failed (``health``: degraded; ``dlq replay``: some entries refused; ``dlq delete``: no such
entry; ``cancel``: refused, the job had finished), 2 usage error, 3 no result within
``--wait-timeout``, 4 Kafka (or, for ``health``, the worker) unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka.errors import KafkaConnectionError, KafkaError

from tako_stream import __version__, dlq
from tako_stream.client import Client, Producer, ResultReader
from tako_stream.core.errors import CancelRefused
from tako_stream.core.models import DLQRecord
from tako_stream.kafka import broker
from tako_stream.kafka.codec import new_id
from tako_stream.settings import Settings

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_NO_RESULT, EXIT_KAFKA = 0, 1, 2, 3, 4


def _print_json(value: Any, *, pretty: bool) -> None:
    option = orjson.OPT_INDENT_2 if pretty else 0
    sys.stdout.write(orjson.dumps(value, option=option).decode() + "\n")
    sys.stdout.flush()


def _usage(message: str) -> SystemExit:
    print(f"tako-stream: {message}", file=sys.stderr)
    return SystemExit(EXIT_USAGE)


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.file:
        try:
            code = Path(args.file).read_text()
        except OSError as exc:
            raise _usage(f"cannot read --file: {exc}") from None
    else:
        code = args.code
    try:
        input_data = orjson.loads(args.input) if args.input else {}
    except orjson.JSONDecodeError as exc:
        raise _usage(f"--input is not valid JSON: {exc}") from None
    request: dict[str, Any] = {
        "execution_id": args.execution_id or new_id(),
        "code": code,
        "input_data": input_data,
        "job_type": args.job_type,
    }
    if args.timeout is not None:
        request["timeout"] = args.timeout
    if args.memory_limit:
        request["memory_limit"] = args.memory_limit
    return request


async def _submit(settings: Settings, args: argparse.Namespace) -> int:
    request = _request_from_args(args)
    execution_id = request["execution_id"]
    async with Producer(settings) as producer:
        if not args.wait:
            await producer.submit(request, correlation_id=args.correlation_id)
            print(execution_id)
            return EXIT_OK
        async with ResultReader(settings) as reader:
            await producer.submit(request, correlation_id=args.correlation_id)
            found = await reader.wait_for({execution_id}, args.wait_timeout)
    result = found.get(execution_id)
    if result is None:
        print(
            f"tako-stream: no result for {execution_id} within {args.wait_timeout:g}s",
            file=sys.stderr,
        )
        return EXIT_NO_RESULT
    _print_json(result.model_dump(mode="json"), pretty=not args.compact)
    return EXIT_OK if result.success else EXIT_JOB_FAILED


async def _results(settings: Settings, args: argparse.Namespace) -> int:
    wanted = set(args.execution_id or [])
    seen: set[str] = set()
    async with ResultReader(settings, from_beginning=not args.new_only) as reader:
        iterator = reader.__aiter__()
        while True:
            try:
                result, raw = await asyncio.wait_for(
                    iterator.__anext__(), None if args.follow else args.idle_timeout
                )
            except TimeoutError:
                return EXIT_OK  # caught up with the topic
            if result is None:
                continue
            if wanted and result.execution_id not in wanted:
                continue
            _print_json(orjson.loads(raw), pretty=False)
            seen.add(result.execution_id)
            if wanted and not args.follow and seen >= wanted:
                return EXIT_OK


async def _cancel(settings: Settings, args: argparse.Namespace) -> int:
    async with Client(settings) as client:
        try:
            await client.cancel(
                args.execution_id, reason=args.reason, correlation_id=args.correlation_id
            )
        except CancelRefused as exc:
            print(f"tako-stream: refused: {exc}", file=sys.stderr)
            _print_json(exc.result.model_dump(mode="json"), pretty=not args.compact)
            return EXIT_JOB_FAILED
        if not args.wait:
            print(f"cancel requested for {args.execution_id}")
            return EXIT_OK
        try:
            result = await client.result(args.execution_id, timeout=args.wait_timeout)
        except TimeoutError:
            print(
                f"tako-stream: no result for {args.execution_id} within {args.wait_timeout:g}s",
                file=sys.stderr,
            )
            return EXIT_NO_RESULT
    _print_json(result.model_dump(mode="json"), pretty=not args.compact)
    return EXIT_OK


def _when(text: str | None) -> datetime | None:
    try:
        return dlq.parse_time(text)
    except ValueError as exc:
        raise _usage(str(exc)) from None


def _selected(store: dlq.DLQStore, args: argparse.Namespace) -> list[DLQRecord]:
    return store.select(
        ids=getattr(args, "ids", None) or None,
        error_type=args.error_type,
        since=_when(args.since),
        until=_when(args.until),
    )


async def _dlq_stats(settings: Settings, args: argparse.Namespace) -> int:
    _print_json((await dlq.read_store(settings)).stats(), pretty=True)
    return EXIT_OK


async def _dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    entries = _selected(await dlq.read_store(settings), args)
    if args.json:
        for entry in entries:
            _print_json(entry.model_dump(mode="json"), pretty=False)
        return EXIT_OK
    print(f"{'id':36} {'error':20} {'replays':>7}  {'last failure':25} execution_id")
    for e in entries:
        print(
            f"{e.dlq_id:36} {e.error.type.value:20} {e.replay_count:>7}  "
            f"{e.last_failure_at.isoformat(timespec='seconds'):25} {e.execution_id}"
        )
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}", file=sys.stderr)
    return EXIT_OK


async def _dlq_delete(settings: Settings, args: argparse.Namespace) -> int:
    store = await dlq.read_store(settings)
    missing = [i for i in args.ids if i not in store]
    if missing:
        print(f"tako-stream: no DLQ entry {', '.join(missing)}", file=sys.stderr)
        return EXIT_JOB_FAILED
    await dlq.delete(settings, store.select(ids=args.ids))
    for dlq_id in args.ids:
        print(f"deleted {dlq_id}")
    return EXIT_OK


async def _dlq_replay(settings: Settings, args: argparse.Namespace) -> int:
    if not (args.ids or args.all or args.error_type or args.since or args.until):
        raise _usage("dlq replay: name entries (IDS) or select them (--all, --error-type, ...)")
    entries = _selected(await dlq.read_store(settings), args)

    def progress(what: str, record: DLQRecord, n: int, total: int) -> None:
        print(f"[{n}/{total}] {what} {record.dlq_id} ({record.execution_id})", file=sys.stderr)

    outcome = await dlq.replay(
        settings,
        entries,
        max_replays=settings.dlq_max_replays if args.max_replays is None else args.max_replays,
        rate=args.rate,
        dry_run=args.dry_run,
        progress=progress,
    )
    verb = "would replay" if args.dry_run else "replayed"
    print(f"{verb} {len(outcome.replayed)}, refused {len(outcome.refused)}")
    for dlq_id, reason in outcome.refused:
        print(f"refused {dlq_id}: {reason}", file=sys.stderr)
    return EXIT_OK if not outcome.refused else EXIT_JOB_FAILED


def _health(settings: Settings, args: argparse.Namespace) -> int:
    url = args.url or f"http://127.0.0.1:{settings.web_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            health = orjson.loads(response.read())
    except (OSError, ValueError) as exc:
        print(f"tako-stream: no worker answers at {url}: {exc}", file=sys.stderr)
        return EXIT_KAFKA
    _print_json(health, pretty=True)
    return EXIT_OK if health.get("status") == "healthy" else EXIT_JOB_FAILED


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from tako_stream.worker.app import run_worker

    return run_worker(settings)


def _gateway(settings: Settings, args: argparse.Namespace) -> int:
    from tako_stream.gateway import app as gateway

    gateway.run(settings)
    return EXIT_OK


def _broker(settings: Settings, args: argparse.Namespace) -> int:
    broker.exec_broker(args.host, args.port)
    return EXIT_OK  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tako-stream",
        description="Run untrusted Python jobs from Kafka in locked-down Docker containers.",
    )
    parser.add_argument("--version", action="version", version=f"tako-stream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="run a worker (settings from TAKO_* variables)")
    w.set_defaults(run=_worker)

    g = sub.add_parser(
        "gateway", help="serve Tako VM's HTTP API over Kafka (port $TAKO_GATEWAY_PORT, 8000)"
    )
    g.set_defaults(run=_gateway)

    s = sub.add_parser("submit", help="produce a job to the requests topic")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--code", help="Python source to run")
    src.add_argument("--file", help="file holding the Python source")
    s.add_argument("--input", help="JSON object written to /input/data.json")
    s.add_argument("--job-type", default="default")
    s.add_argument("--timeout", type=float)
    s.add_argument("--memory-limit")
    s.add_argument("--execution-id")
    s.add_argument("--correlation-id")
    s.add_argument("--wait", action="store_true", help="wait for the result and print it")
    s.add_argument("--wait-timeout", type=float, default=120.0)
    s.add_argument("--compact", action="store_true", help="print the result on one line")
    s.set_defaults(run=_submit)

    c = sub.add_parser(
        "cancel", help="cancel a queued or running job (refused, exit 1, once it finished)"
    )
    c.add_argument("execution_id")
    c.add_argument("--reason")
    c.add_argument("--correlation-id")
    c.add_argument("--wait", action="store_true", help="wait for the job's result and print it")
    c.add_argument("--wait-timeout", type=float, default=120.0)
    c.add_argument("--compact", action="store_true", help="print the result on one line")
    c.set_defaults(run=_cancel)

    r = sub.add_parser("results", help="print results (JSON lines)")
    r.add_argument("--follow", "-f", action="store_true", help="keep waiting for new results")
    r.add_argument("--execution-id", action="append", help="only this id (repeatable)")
    r.add_argument("--new-only", action="store_true", help="skip results already on the topic")
    r.add_argument(
        "--idle-timeout",
        type=float,
        default=3.0,
        help="without --follow, stop after this many seconds with nothing new",
    )
    r.set_defaults(run=_results)

    h = sub.add_parser("health", help="print a worker's health (exit 1 when degraded)")
    h.add_argument("--url", help="default: http://127.0.0.1:$TAKO_WEB_PORT/health")
    h.set_defaults(run=_health)

    d = sub.add_parser("dlq", help="inspect, delete and replay dead-lettered requests")
    dsub = d.add_subparsers(dest="dlq_command", required=True)

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--error-type", help="only entries of this error type")
        p.add_argument("--since", help="only entries that last failed at or after (ISO 8601)")
        p.add_argument("--until", help="only entries that last failed at or before (ISO 8601)")

    ds = dsub.add_parser("stats", help="total and count by error type")
    ds.set_defaults(run=_dlq_stats)
    dl = dsub.add_parser("list", help="list entries")
    filters(dl)
    dl.add_argument("--json", action="store_true", help="one JSON object per line")
    dl.set_defaults(run=_dlq_list)
    dd = dsub.add_parser("delete", help="remove entries for good")
    dd.add_argument("ids", nargs="+", metavar="ID")
    dd.set_defaults(run=_dlq_delete)
    dr = dsub.add_parser("replay", help="re-produce original requests (same execution_id)")
    dr.add_argument("ids", nargs="*", metavar="ID")
    dr.add_argument("--all", action="store_true", help="every entry the filters select")
    filters(dr)
    dr.add_argument("--dry-run", action="store_true", help="show what would be replayed")
    dr.add_argument("--rate", type=float, help="at most this many replays per second")
    dr.add_argument("--max-replays", type=int, help="refuse entries replayed this often")
    dr.set_defaults(run=_dlq_replay)

    b = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (Tansu)")
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--port", type=int, default=9092)
    b.set_defaults(run=_broker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    run = args.run
    if asyncio.iscoroutinefunction(run):
        try:
            return int(asyncio.run(run(settings, args)))
        except KafkaConnectionError as exc:
            print(
                f"tako-stream: cannot reach Kafka at {settings.kafka_bootstrap_servers}: {exc}",
                file=sys.stderr,
            )
            return EXIT_KAFKA
        except (KafkaError, LookupError) as exc:
            print(f"tako-stream: {exc}", file=sys.stderr)
            return EXIT_KAFKA
        except KeyboardInterrupt:
            return 130
    return int(run(settings, args))


if __name__ == "__main__":
    sys.exit(main())
