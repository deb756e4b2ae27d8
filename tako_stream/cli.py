"""``tako-stream``: the one command-line entry point.

Exit codes a shell can rely on: 0 success (for ``submit --wait``: the job succeeded), 1 the job
failed, 2 usage error, 3 no result within ``--wait-timeout``, 4 Kafka unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from aiokafka.errors import KafkaConnectionError, KafkaError

from tako_stream import __version__, broker
from tako_stream.client import Producer, ResultReader
from tako_stream.codec import new_id
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


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from tako_stream.app import run_worker

    return run_worker(settings)


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
