"""The error taxonomy: Tako VM's three error tables, how failures are classified, our exceptions.

Every failure a job can have ends as one ``ErrorType`` so that clients can branch on a stable
string (``"division_error"``) instead of parsing messages. The tables follow Tako VM's error guide:

Signal exit codes (``SIGNAL_EXIT_CODES``, 128 + signal number, as a shell reports them)::

    137 oom (SIGKILL, only when Docker says OOMKilled; else killed)   143 cancelled (SIGTERM)
    139 segfault (SIGSEGV)   134 abort (SIGABRT)   136 arithmetic_error (SIGFPE)
    135 bus_error (SIGBUS)   141 pipe_error (SIGPIPE)

Python exceptions (``EXCEPTION_TABLE``, walked along the exception's MRO)::

    syntax_error  import_error  type_error  value_error  key_error  index_error  attribute_error
    name_error  file_not_found  recursion_error  division_error  encoding_error  json_error
    and, for OS-level exceptions: permission  os_error  network_error  network_timeout  oom

System errors: permission, os_error, network_error, network_timeout, timeout, killed,
service_unavailable, internal_error; and ours: runtime_error, invalid_request, invalid_output,
nonzero_exit.

The service's own exceptions form one tree, each naming the ``ErrorType`` it becomes::

    TakoError(Exception)                        internal_error
    ├── InvalidRequestError                     invalid_request  (.errors: one line per bad field)
    └── SandboxError                            internal_error
        ├── SandboxUnavailableError             service_unavailable  (transient, breaker counts it)
        └── SandboxSetupError                   internal_error       (fail closed, never run)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from types import MappingProxyType
from typing import ClassVar

__all__ = [
    "EXCEPTION_TABLE",
    "RETRYABLE",
    "SIGNAL_EXIT_CODES",
    "USER_ERRORS",
    "ErrorType",
    "InvalidRequestError",
    "SandboxError",
    "SandboxSetupError",
    "SandboxUnavailableError",
    "Status",
    "TakoError",
    "classify_exception",
    "classify_exit",
    "default_message",
    "exception_message",
    "exception_names",
    "is_user_error",
    "parse_traceback",
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
    """Why a job failed: the seed's three tables plus the four types only we produce."""

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
    # System errors.
    PERMISSION = "permission"
    OS_ERROR = "os_error"
    NETWORK_ERROR = "network_error"
    NETWORK_TIMEOUT = "network_timeout"
    TIMEOUT = "timeout"
    KILLED = "killed"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL_ERROR = "internal_error"
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


def classify_exit(exit_code: int, *, oom_killed: bool) -> ErrorType | None:
    """The type an exit code alone proves, or None (success, or look at the exception instead).

    Negative codes are ``subprocess``'s way of saying "killed by signal N" and mean 128 + N.
    A timeout is not decided here: the caller's own clock knows it, whatever the code was.
    """
    if exit_code < 0:
        exit_code = 128 - exit_code
    if exit_code == 137 and not oom_killed:
        return ErrorType.KILLED
    return SIGNAL_EXIT_CODES.get(exit_code)


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
            "IsADirectoryError",
            "NotADirectoryError",
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
)


def _build_lookup() -> dict[str, ErrorType]:
    lookup: dict[str, ErrorType] = {}
    for names, error_type in EXCEPTION_TABLE:
        for name in names:
            lookup.setdefault(name, error_type)  # an earlier (more specific) row wins
    return lookup


_BY_NAME: Mapping[str, ErrorType] = MappingProxyType(_build_lookup())


def exception_names(exc_type: type[BaseException]) -> list[str]:
    """The MRO in the form ``classify_exception`` expects: builtins bare, others qualified."""
    return [
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
        for cls in exc_type.__mro__
    ]


def classify_exception(names: Sequence[str]) -> ErrorType:
    """The type of an uncaught exception, from its MRO names (most derived first) or one name.

    Each name is tried by its full name, then by its last dotted component, and the first name
    with a hit decides: ``["__main__.Bad", "ValueError", ...]`` is ``value_error``. Matching the
    last component on its own is deliberate: a traceback gives one name and no MRO, and
    ``requests.exceptions.ConnectionError`` should read as ``network_error``. The price is that a
    user class named like a builtin (``mymod.KeyError``) is classified as that builtin.
    """
    for raw in names:
        name = raw.strip()
        found = _BY_NAME.get(name)
        if found is None and "." in name:
            found = _BY_NAME.get(name.rpartition(".")[2])
        if found is not None:
            return found
    return ErrorType.RUNTIME_ERROR


# --- Tracebacks ---------------------------------------------------------------------------------

_TAIL_LINES = 200  # a traceback's end is all we need; older lines only cost time
_TAIL_CHARS = 64 * 1024  # bounds the work on one huge line as well as on many lines
_MAX_NAME = 256  # longer "names" are not exception classes anyone wrote
_MAX_MESSAGE = 1000  # enough for any useful message; the full text stays in stderr
_HEADER = "Traceback (most recent call last):"
_GROUP_HEADER = "  + Exception Group Traceback (most recent call last):"
_GROUP_PREFIX = "  | "


def _exception_name(line: str) -> str | None:
    """The class name if ``line`` reads as ``Name`` or ``module.Name: message``, else None."""
    head = line.partition(": ")[0]
    if len(head) > _MAX_NAME or not head:
        return None
    if all(part.isidentifier() for part in head.split(".")):
        return head
    return None


def _tail_lines(stderr: str) -> list[str]:
    text = stderr[-_TAIL_CHARS:]
    lines = text.split("\n")
    if len(text) < len(stderr):
        lines = lines[1:]  # the first line was cut in half: it could look like anything
    return [line.rstrip("\r") for line in lines[-_TAIL_LINES:]]


def _final_exception_line(stderr: str) -> str | None:
    """The line naming the exception that ended the program, or None.

    The last top-level traceback header decides where to look (earlier ones are the causes of a
    chain); a SyntaxError of the main file has no header, so without one the first ``File``
    line is the start. After it, frames and source are indented and the first unindented line
    that reads as an exception is ours: lines after it may be a multi-line message or notes.
    """
    lines = _tail_lines(stderr)
    start: int | None = None
    group = False
    for index in range(len(lines) - 1, -1, -1):
        if lines[index] == _HEADER or lines[index] == _GROUP_HEADER:
            start, group = index, lines[index] == _GROUP_HEADER
            break
    if start is None:
        start = next((i for i, line in enumerate(lines) if line.startswith('  File "')), None)
        if start is None:
            return None
    for raw in lines[start + 1 :]:
        line = raw
        if group:
            # A group prints as "  | " lines; its own exception is the first unindented one in
            # them, and its sub-exceptions are nested deeper, so never at that column.
            if not raw.startswith(_GROUP_PREFIX):
                continue
            line = raw[len(_GROUP_PREFIX) :]
        if line and not line[0].isspace() and _exception_name(line) is not None:
            return line
    return None


def parse_traceback(stderr: str) -> str | None:
    """The name of the exception that ended the program, as its traceback prints it.

    E.g. ``"ZeroDivisionError"``, ``"json.decoder.JSONDecodeError"``, ``"ExceptionGroup"``.
    ``stderr`` is untrusted: only its tail is read, with no regular expression at all.
    """
    line = _final_exception_line(stderr)
    return None if line is None else _exception_name(line)


def exception_message(stderr: str) -> str | None:
    """The final exception's line (``"ZeroDivisionError: division by zero"``) for a result.

    Only the first line of a multi-line message, capped in length: the rest is in stderr.
    """
    line = _final_exception_line(stderr)
    if line is None:
        return None
    line = line.rstrip()
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 1] + "…"


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
#: Left out: cancelled and killed (someone else ended the job) and service_unavailable and
#: internal_error (our fault).
USER_ERRORS: frozenset[ErrorType] = frozenset(ErrorType) - {
    ErrorType.CANCELLED,
    ErrorType.KILLED,
    ErrorType.SERVICE_UNAVAILABLE,
    ErrorType.INTERNAL_ERROR,
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
