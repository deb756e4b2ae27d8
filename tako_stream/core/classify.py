"""Classification: the taxonomy's tables applied to what a job left behind.

An exit code, an exception's MRO names, or the tail of a traceback on stderr become one
``ErrorType`` (see ``tako_stream.core.errors`` for the tables). Everything read here is
untrusted output of the job, so parsing is bounded and never raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from tako_stream.core.errors import EXCEPTION_TABLE, SIGNAL_EXIT_CODES, ErrorType

__all__ = [
    "classify_exception",
    "classify_exit",
    "classify_failure",
    "exception_message",
    "exception_names",
    "parse_traceback",
]


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


#: An OSError's message naming a network that cannot be reached (ENETUNREACH, EHOSTUNREACH):
#: what a job's connect meets in a container with no network, raised as a plain OSError.
_UNREACHABLE = re.compile(r"\[Errno (?:101|113)\]|Network is unreachable|No route to host")


def classify_failure(names: Sequence[str], message: str) -> ErrorType:
    """``classify_exception``, and a plain OSError about an unreachable network is Tako VM's
    ``network_error`` (the kernel raises no ConnectionError subclass for it)."""
    found = classify_exception(names)
    if found is ErrorType.OS_ERROR and _UNREACHABLE.search(message):
        return ErrorType.NETWORK_ERROR
    return found


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
