"""The error taxonomy: Tako VM's three error tables, and the service's own exceptions.

Every failure a job can have ends as one ``ErrorType`` so that clients can branch on a stable
string (``"division_error"``) instead of parsing messages. The tables follow Tako VM's error guide
(``tako_stream.core.classify`` applies them to what a job left behind):

Signal exit codes (``SIGNAL_EXIT_CODES``, 128 + signal number, as a shell reports them)::

    137 oom (SIGKILL, only when Docker says OOMKilled; else killed)   143 cancelled (SIGTERM)
    139 segfault (SIGSEGV)   134 abort (SIGABRT)   136 arithmetic_error (SIGFPE)
    135 bus_error (SIGBUS)   141 pipe_error (SIGPIPE)

Python exceptions (``EXCEPTION_TABLE``, walked along the exception's MRO)::

    syntax_error  import_error  type_error  value_error  key_error  index_error  attribute_error
    name_error  file_not_found  recursion_error  division_error  encoding_error  json_error
    and, for OS-level exceptions: permission  os_error  network_error  network_timeout  oom
    and, from Tako VM's classifier: assertion_error  overflow_error  file_error

System errors: permission, os_error, network_error, network_timeout, timeout, killed,
service_unavailable, internal_error; Tako VM's startup_timeout, dependency_error and
docker_error; and ours: runtime_error, invalid_request, invalid_output,
nonzero_exit.

The service's own exceptions form one tree, each naming the ``ErrorType`` it becomes; library
errors (aiodocker's, aiokafka's) are mapped into it where they are raised, at the I/O boundary::

    TakoError(Exception)                        internal_error
    ├── InvalidRequestError                     invalid_request  (.errors: one line per bad field)
    ├── SandboxError                            internal_error
    │   ├── SandboxUnavailableError             service_unavailable  (transient, breaker counts it)
    │   ├── SandboxSetupError                   internal_error       (fail closed, never run)
    │   │   └── ImageMissingError               docker_error         (the job type's image)
    │   └── StartupTimeoutError                 startup_timeout      (create+start too slow)
    ├── CancelledBeforeStart                    cancelled  (cancelled while waiting for a slot)
    ├── CancelRefused                           -          (the job had finished: .result)
    └── BrokerError                             internal_error  (Kafka did not answer: retried)
        └── PublishRefusedError                 internal_error  (refused for good: too large...)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from tako_stream.core.models import ExecutionResult

__all__ = [
    "EXCEPTION_TABLE",
    "RETRYABLE",
    "SIGNAL_EXIT_CODES",
    "USER_ERRORS",
    "BrokerError",
    "CancelRefused",
    "CancelledBeforeStart",
    "ErrorType",
    "ImageMissingError",
    "InvalidRequestError",
    "PublishRefusedError",
    "SandboxError",
    "SandboxSetupError",
    "SandboxUnavailableError",
    "StartupTimeoutError",
    "Status",
    "TakoError",
    "default_message",
    "is_user_error",
]


class Status(StrEnum):
    """A job's terminal state; ``failed`` covers every error that is not a resource limit."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    OOM = "oom"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


class ErrorType(StrEnum):
    """Why a job failed: the seed's three tables, the rows of Tako VM's classifier its guide leaves
    out, and the four types only we produce."""

    # Signal exit codes.
    OOM = "oom"
    CANCELLED = "cancelled"
    SEGFAULT = "segfault"
    ABORT = "abort"
    ARITHMETIC_ERROR = "arithmetic_error"
    BUS_ERROR = "bus_error"
    PIPE_ERROR = "pipe_error"
    # Python exceptions.
    SYNTAX_ERROR = "syntax_error"
    IMPORT_ERROR = "import_error"
    TYPE_ERROR = "type_error"
    VALUE_ERROR = "value_error"
    KEY_ERROR = "key_error"
    INDEX_ERROR = "index_error"
    ATTRIBUTE_ERROR = "attribute_error"
    NAME_ERROR = "name_error"
    FILE_NOT_FOUND = "file_not_found"
    RECURSION_ERROR = "recursion_error"
    DIVISION_ERROR = "division_error"
    ENCODING_ERROR = "encoding_error"
    JSON_ERROR = "json_error"
    # Tako VM's classifier has these rows too (its error guide does not list them).
    ASSERTION_ERROR = "assertion_error"
    OVERFLOW_ERROR = "overflow_error"
    FILE_ERROR = "file_error"  # a directory where a file was expected, or the reverse
    # System errors.
    PERMISSION = "permission"
    OS_ERROR = "os_error"
    NETWORK_ERROR = "network_error"
    NETWORK_TIMEOUT = "network_timeout"
    TIMEOUT = "timeout"
    KILLED = "killed"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL_ERROR = "internal_error"
    # Tako VM's further system errors (from its classifier, not its guide).
    STARTUP_TIMEOUT = "startup_timeout"  # the container did not start within startup_timeout
    DEPENDENCY_ERROR = "dependency_error"  # the image lacks a requested requirement
    DOCKER_ERROR = "docker_error"  # the job type's image is not on the engine
    # Ours: failures the seed's tables have no row for.
    RUNTIME_ERROR = "runtime_error"  # an uncaught exception of a type no row names
    INVALID_REQUEST = "invalid_request"  # the message could not be decoded or validated
    INVALID_OUTPUT = "invalid_output"  # result.json not JSON, not an object, or too big
    NONZERO_EXIT = "nonzero_exit"  # e.g. sys.exit(3): a failure with no signal and no exception


# --- Exit codes ---------------------------------------------------------------------------------

#: 128 + signal number → type, as in the seed's table. 137 needs Docker's OOMKilled flag to be
#: ``oom``: a SIGKILL without it came from someone else (``classify_exit`` says ``killed``).
SIGNAL_EXIT_CODES: Mapping[int, ErrorType] = MappingProxyType(
    {
        137: ErrorType.OOM,  # SIGKILL
        143: ErrorType.CANCELLED,  # SIGTERM
        139: ErrorType.SEGFAULT,  # SIGSEGV
        134: ErrorType.ABORT,  # SIGABRT
        136: ErrorType.ARITHMETIC_ERROR,  # SIGFPE
        135: ErrorType.BUS_ERROR,  # SIGBUS
        141: ErrorType.PIPE_ERROR,  # SIGPIPE
    }
)


# --- Exceptions ---------------------------------------------------------------------------------

#: Exception names → type, most specific first; the first row naming a class wins. Qualified
#: names are for classes outside builtins; unqualified ones also match any module's class of that
#: name (see ``classify_exception``).
EXCEPTION_TABLE: Sequence[tuple[tuple[str, ...], ErrorType]] = (
    (("SyntaxError", "IndentationError", "TabError"), ErrorType.SYNTAX_ERROR),
    (("ModuleNotFoundError", "ImportError"), ErrorType.IMPORT_ERROR),
    (
        ("json.decoder.JSONDecodeError", "json.JSONDecodeError", "JSONDecodeError"),
        ErrorType.JSON_ERROR,
    ),
    (
        ("UnicodeError", "UnicodeDecodeError", "UnicodeEncodeError", "UnicodeTranslateError"),
        ErrorType.ENCODING_ERROR,
    ),
    (("FileNotFoundError",), ErrorType.FILE_NOT_FOUND),
    # Tako VM's file_error: OSErrors about a path's kind, listed before OSError's own row.
    (("IsADirectoryError", "NotADirectoryError"), ErrorType.FILE_ERROR),
    (("PermissionError",), ErrorType.PERMISSION),
    (("socket.timeout", "TimeoutError"), ErrorType.NETWORK_TIMEOUT),
    (
        (
            "ConnectionError",
            "ConnectionRefusedError",
            "ConnectionResetError",
            "ConnectionAbortedError",
            "BrokenPipeError",
            "socket.gaierror",
            "socket.herror",
            "urllib.error.URLError",
        ),
        ErrorType.NETWORK_ERROR,
    ),
    (
        (
            "OSError",
            "IOError",
            "EnvironmentError",
            "FileExistsError",
            "BlockingIOError",
            "ChildProcessError",
            "InterruptedError",
            "ProcessLookupError",
        ),
        ErrorType.OS_ERROR,
    ),
    (("RecursionError",), ErrorType.RECURSION_ERROR),
    (("ZeroDivisionError",), ErrorType.DIVISION_ERROR),
    (("KeyError",), ErrorType.KEY_ERROR),
    (("IndexError",), ErrorType.INDEX_ERROR),
    (("AttributeError",), ErrorType.ATTRIBUTE_ERROR),
    (("NameError", "UnboundLocalError"), ErrorType.NAME_ERROR),
    (("TypeError",), ErrorType.TYPE_ERROR),
    (("ValueError",), ErrorType.VALUE_ERROR),
    (("MemoryError",), ErrorType.OOM),
    (("AssertionError",), ErrorType.ASSERTION_ERROR),
    (("OverflowError",), ErrorType.OVERFLOW_ERROR),
)


# --- Messages and policy ------------------------------------------------------------------------

_MESSAGES: Mapping[ErrorType, str] = MappingProxyType(
    {
        ErrorType.OOM: "Execution exceeded memory limit",
        ErrorType.CANCELLED: "Execution cancelled",
        ErrorType.SEGFAULT: "Segmentation fault (SIGSEGV)",
        ErrorType.ABORT: "Process aborted (SIGABRT)",
        ErrorType.ARITHMETIC_ERROR: "Floating point exception (SIGFPE)",
        ErrorType.BUS_ERROR: "Bus error (SIGBUS)",
        ErrorType.PIPE_ERROR: "Broken pipe (SIGPIPE)",
        ErrorType.SYNTAX_ERROR: "Invalid Python syntax",
        ErrorType.IMPORT_ERROR: "Missing module",
        ErrorType.TYPE_ERROR: "Type mismatch",
        ErrorType.VALUE_ERROR: "Invalid value",
        ErrorType.KEY_ERROR: "Missing dictionary key",
        ErrorType.INDEX_ERROR: "Index out of range",
        ErrorType.ATTRIBUTE_ERROR: "Missing attribute",
        ErrorType.NAME_ERROR: "Undefined variable",
        ErrorType.FILE_NOT_FOUND: "File not found",
        ErrorType.RECURSION_ERROR: "Maximum recursion depth exceeded",
        ErrorType.DIVISION_ERROR: "Division by zero",
        ErrorType.ENCODING_ERROR: "Encoding or decoding failure",
        ErrorType.JSON_ERROR: "Invalid JSON",
        ErrorType.PERMISSION: "Permission denied",
        ErrorType.OS_ERROR: "OS or I/O error",
        ErrorType.NETWORK_ERROR: "Connection failed",
        ErrorType.NETWORK_TIMEOUT: "Network request timed out",
        ErrorType.TIMEOUT: "Execution timeout exceeded",
        ErrorType.KILLED: "Process killed by system",
        ErrorType.SERVICE_UNAVAILABLE: "Service temporarily unavailable",
        ErrorType.INTERNAL_ERROR: "Internal error",
        ErrorType.ASSERTION_ERROR: "Assertion failed",
        ErrorType.OVERFLOW_ERROR: "Numeric overflow",
        ErrorType.FILE_ERROR: "Expected a file but found a directory, or the reverse",
        ErrorType.STARTUP_TIMEOUT: "Container startup exceeded the startup timeout",
        ErrorType.DEPENDENCY_ERROR: "A required package is not installed in the image",
        ErrorType.DOCKER_ERROR: "Docker image not found",
        ErrorType.RUNTIME_ERROR: "Uncaught exception",
        ErrorType.INVALID_REQUEST: "Invalid request",
        ErrorType.INVALID_OUTPUT: "Output is not a JSON object within the size limit",
        ErrorType.NONZERO_EXIT: "Process exited with a non-zero code",
    }
)


def default_message(error_type: ErrorType, *, timeout: float | None = None) -> str:
    """A human message for a type, for when nothing more precise (an exception line) is known."""
    if error_type is ErrorType.TIMEOUT and timeout is not None:
        return f"Execution timeout exceeded ({timeout:g}s)"
    return _MESSAGES[error_type]


#: Worth retrying from the client's side, as in the seed's ``execute_with_retry``.
RETRYABLE: frozenset[ErrorType] = frozenset(
    {ErrorType.SERVICE_UNAVAILABLE, ErrorType.NETWORK_ERROR, ErrorType.NETWORK_TIMEOUT}
)

#: Caused by what the user sent (code or request) while the service worked: the service never
#: retries these, never dead-letters them, and never counts them against the sandbox's health.
#: Left out: cancelled and killed (someone else ended the job), service_unavailable,
#: internal_error and docker_error (our fault: the engine or a job type's missing image), and
#: startup_timeout (a slow engine, not the code: the code never started).
USER_ERRORS: frozenset[ErrorType] = frozenset(ErrorType) - {
    ErrorType.CANCELLED,
    ErrorType.KILLED,
    ErrorType.SERVICE_UNAVAILABLE,
    ErrorType.INTERNAL_ERROR,
    ErrorType.DOCKER_ERROR,
    ErrorType.STARTUP_TIMEOUT,
}


def is_user_error(error_type: ErrorType) -> bool:
    """Whether the failure is the user's doing, so retrying or alerting on it would not help."""
    return error_type in USER_ERRORS


# --- The service's own exceptions ---------------------------------------------------------------


class TakoError(Exception):
    """Root of the service's exceptions, so callers can catch ours and nothing else."""

    error_type: ClassVar[ErrorType] = ErrorType.INTERNAL_ERROR


class InvalidRequestError(TakoError):
    """A request that cannot be run as sent; answered with ``invalid_request``, never retried."""

    error_type: ClassVar[ErrorType] = ErrorType.INVALID_REQUEST

    def __init__(self, errors: Iterable[str], execution_id: str | None = None) -> None:
        # A lone string is one error, not one error per character.
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        self.execution_id = execution_id
        super().__init__(self.errors, execution_id)

    def __str__(self) -> str:
        return "Invalid request: " + ("; ".join(self.errors) or "no detail given")


class SandboxError(TakoError):
    """The sandbox failed around the job (not the job itself): the job's fate is not its fault."""


class SandboxUnavailableError(SandboxError):
    """Docker's daemon is unreachable or erring: transient, retried and counted by the breaker."""

    error_type: ClassVar[ErrorType] = ErrorType.SERVICE_UNAVAILABLE


class SandboxSetupError(SandboxError):
    """A container could not get the required isolation settings: fail closed, never run it."""


class ImageMissingError(SandboxSetupError):
    """The job type's image is not on the engine (Tako VM's docker_error): never retried."""

    error_type: ClassVar[ErrorType] = ErrorType.DOCKER_ERROR


class StartupTimeoutError(SandboxError):
    """The container was not created and started within the request's ``startup_timeout``."""

    error_type: ClassVar[ErrorType] = ErrorType.STARTUP_TIMEOUT


class CancelledBeforeStart(TakoError):
    """The job was cancelled while it waited for a container slot: it never ran."""

    error_type: ClassVar[ErrorType] = ErrorType.CANCELLED


class CancelRefused(TakoError):
    """A finished job cannot be cancelled; ``result`` is how it ended."""

    def __init__(self, execution_id: str, result: ExecutionResult) -> None:
        super().__init__(f"job {execution_id} already finished ({result.status.value})")
        self.execution_id = execution_id
        self.result = result


class BrokerError(TakoError):
    """Kafka did not do what was asked (unreachable, leader moving, rebalancing): retried."""


class PublishRefusedError(BrokerError):
    """The broker refused a message for good (too large for the topic, say): never retried."""
