"""tako-stream: run untrusted Python code from Kafka in locked-down Docker containers.

``Client`` (async) and ``SyncClient`` submit jobs and wait for results; ``ExecutionResult``,
``Status`` and ``ErrorType`` are what comes back.
"""

from tako_stream.client import Client, SyncClient
from tako_stream.core.errors import RETRYABLE, CancelRefused, ErrorType, Status, TakoError
from tako_stream.core.models import ExecutionRequest, ExecutionResult
from tako_stream.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "RETRYABLE",
    "CancelRefused",
    "Client",
    "ErrorType",
    "ExecutionRequest",
    "ExecutionResult",
    "Settings",
    "Status",
    "SyncClient",
    "TakoError",
]
