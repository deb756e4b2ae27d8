"""The error taxonomy, table by table, against exceptions and tracebacks that really happen."""

from __future__ import annotations

import ast
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import types
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest

from tako_stream.core import classify, errors
from tako_stream.core.classify import (
    classify_exception,
    classify_exit,
    exception_message,
    exception_names,
    parse_traceback,
)
from tako_stream.core.errors import (
    EXCEPTION_TABLE,
    RETRYABLE,
    SIGNAL_EXIT_CODES,
    ErrorType,
    InvalidRequestError,
    SandboxError,
    SandboxSetupError,
    SandboxUnavailableError,
    Status,
    TakoError,
    default_message,
    is_user_error,
)


def raised(action: Callable[[], object]) -> BaseException:
    """The exception ``action`` really raises in this process."""
    try:
        action()
    except BaseException as exc:
        return exc
    raise AssertionError("action raised nothing")


def raise_(exc: BaseException) -> Callable[[], object]:
    def action() -> object:
        raise exc

    return action


def mro_names(exc: BaseException) -> list[str]:
    """MRO names built here independently of ``exception_names``, as the supervisor does."""
    return [
        c.__name__ if c.__module__ == "builtins" else f"{c.__module__}.{c.__qualname__}"
        for c in type(exc).__mro__
    ]


def run_python(tmp_path: Path, source: str) -> str:
    """Stderr of a real interpreter running ``source`` as a file, the way a job's code runs."""
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(source))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0
    return proc.stderr


# --- Enums --------------------------------------------------------------------------------------


def test_status_values() -> None:
    assert [s.value for s in Status] == [
        "succeeded",
        "failed",
        "timeout",
        "oom",
        "cancelled",
        "rejected",
    ]


SEED_TYPES = {
    # Signal exit codes.
    "oom", "cancelled", "segfault", "abort", "arithmetic_error", "bus_error", "pipe_error",
    # Python exceptions.
    "syntax_error", "import_error", "type_error", "value_error", "key_error", "index_error",
    "attribute_error", "name_error", "file_not_found", "recursion_error", "division_error",
    "encoding_error", "json_error",
    # System errors.
    "permission", "os_error", "network_error", "network_timeout", "timeout", "killed",
    "service_unavailable", "internal_error",
}  # fmt: skip


#: Rows of Tako VM's classifier (tako_vm/security.py classify_error, and its startup-phase
#: timeout) that its error guide does not list.
TAKO_VM_TYPES = {
    "assertion_error", "overflow_error", "file_error", "startup_timeout", "dependency_error",
    "docker_error",
}  # fmt: skip


def test_error_types_are_the_seed_tables_plus_ours() -> None:
    ours = {"runtime_error", "invalid_request", "invalid_output", "nonzero_exit"}
    assert {t.value for t in ErrorType} == SEED_TYPES | TAKO_VM_TYPES | ours
    assert len(ErrorType) == len(SEED_TYPES) + len(TAKO_VM_TYPES) + len(ours)


def test_enums_are_plain_strings() -> None:
    assert isinstance(ErrorType.DIVISION_ERROR, str)
    assert f"{ErrorType.DIVISION_ERROR}" == "division_error"
    assert json.dumps({"type": ErrorType.OOM, "status": Status.OOM}) == (
        '{"type": "oom", "status": "oom"}'
    )
    assert ErrorType("json_error") is ErrorType.JSON_ERROR


# --- Signal exit codes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exit_code", "expected"),
    [
        (137, "oom"),
        (143, "cancelled"),
        (139, "segfault"),
        (134, "abort"),
        (136, "arithmetic_error"),
        (135, "bus_error"),
        (141, "pipe_error"),
    ],
)
def test_signal_table_rows(exit_code: int, expected: str) -> None:
    assert SIGNAL_EXIT_CODES[exit_code] == expected
    assert classify_exit(exit_code, oom_killed=True) == expected


def test_signal_table_has_exactly_the_seed_rows() -> None:
    assert set(SIGNAL_EXIT_CODES) == {137, 143, 139, 134, 136, 135, 141}
    with pytest.raises(TypeError):
        SIGNAL_EXIT_CODES[1] = ErrorType.ABORT  # type: ignore[index]


@pytest.mark.parametrize(
    ("exit_code", "oom_killed", "expected"),
    [
        (137, True, ErrorType.OOM),
        (137, False, ErrorType.KILLED),
        (-9, True, ErrorType.OOM),
        (-9, False, ErrorType.KILLED),
        (143, False, ErrorType.CANCELLED),
        (-15, False, ErrorType.CANCELLED),
        (-11, False, ErrorType.SEGFAULT),
        (-6, False, ErrorType.ABORT),
        (-8, False, ErrorType.ARITHMETIC_ERROR),
        (-7, False, ErrorType.BUS_ERROR),
        (-13, False, ErrorType.PIPE_ERROR),
        (139, True, ErrorType.SEGFAULT),
        (0, False, None),
        (0, True, None),
        (1, False, None),
        (1, True, None),
        (3, False, None),
        (2, False, None),
        (127, False, None),
        (130, False, None),
        (-2, False, None),  # SIGINT: not in the table
        (255, False, None),
    ],
)
def test_classify_exit(exit_code: int, oom_killed: bool, expected: ErrorType | None) -> None:
    assert classify_exit(exit_code, oom_killed=oom_killed) is expected


@pytest.mark.parametrize(
    ("code", "signum"),
    [("import os; os.abort()", 6), ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 15)],
)
def test_classify_exit_of_real_signal_deaths(code: str, signum: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == -signum
    assert classify_exit(proc.returncode, oom_killed=False) == SIGNAL_EXIT_CODES[128 + signum]


# --- Python exceptions ---------------------------------------------------------------------------


class BadError(ValueError):
    """A user's own exception, as ``class Bad(ValueError)`` in a job's code."""


class UnlistedError(Exception):
    pass


def _recurse() -> object:
    return _recurse()


_EMPTY: list[int] = []


def _unbound() -> object:
    for _name in _EMPTY:  # never binds `_name`: reading it below is the error under test
        pass
    return _name


def _failed_assert() -> object:
    value = len(_EMPTY)
    assert value == 1, "one item expected"  # the statement itself is under test
    return value


def _import_missing_name() -> object:
    from json import no_such_name  # type: ignore[attr-defined]

    return no_such_name


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        pytest.param(lambda: compile("def broken(", "<job>", "exec"), "syntax_error", id="syntax"),
        pytest.param(lambda: compile("if 1:\nx = 1", "<job>", "exec"), "syntax_error", id="indent"),
        pytest.param(
            lambda: compile("if 1:\n        x = 1\n\ty = 2", "<job>", "exec"),
            "syntax_error",
            id="tab",
        ),
        pytest.param(
            lambda: __import__("tako_no_such_module_xyz"), "import_error", id="module-not-found"
        ),
        pytest.param(_import_missing_name, "import_error", id="import-error"),
        pytest.param(lambda: 1 + "1", "type_error", id="type"),  # type: ignore[operator]
        pytest.param(lambda: int("x"), "value_error", id="value"),
        pytest.param(lambda: dict[str, int]()["missing"], "key_error", id="key"),
        pytest.param(lambda: _EMPTY[0], "index_error", id="index"),
        pytest.param(lambda: None.nope, "attribute_error", id="attribute"),  # type: ignore[attr-defined]
        pytest.param(
            lambda: undefined_name_xyz,  # type: ignore[name-defined]  # noqa: F821
            "name_error",
            id="name",
        ),
        pytest.param(_unbound, "name_error", id="unbound-local"),
        pytest.param(
            lambda: Path("/nonexistent/file").read_text(), "file_not_found", id="file-not-found"
        ),
        pytest.param(_recurse, "recursion_error", id="recursion"),
        pytest.param(lambda: 1 / 0, "division_error", id="division"),
        pytest.param(lambda: b"\xff".decode("utf-8"), "encoding_error", id="unicode-decode"),
        pytest.param(lambda: "é".encode("ascii"), "encoding_error", id="unicode-encode"),
        pytest.param(raise_(UnicodeError("x")), "encoding_error", id="unicode"),
        pytest.param(lambda: json.loads("{"), "json_error", id="json"),
        pytest.param(raise_(BadError("user subclass")), "value_error", id="user-subclass"),
        pytest.param(raise_(UnlistedError()), "runtime_error", id="unlisted"),
        pytest.param(raise_(RuntimeError("x")), "runtime_error", id="runtime"),
        pytest.param(raise_(AssertionError()), "assertion_error", id="assertion-raised"),
        pytest.param(_failed_assert, "assertion_error", id="assertion"),
        pytest.param(lambda: 2.0**5000, "overflow_error", id="overflow"),
        pytest.param(lambda: int(1e400), "overflow_error", id="overflow-int"),
        pytest.param(raise_(KeyboardInterrupt()), "runtime_error", id="keyboard-interrupt"),
        pytest.param(raise_(MemoryError()), "oom", id="memory"),
    ],
)
def test_python_exception_rows(action: Callable[[], object], expected: str) -> None:
    exc = raised(action)
    assert classify_exception(mro_names(exc)) == expected
    assert classify_exception(exception_names(type(exc))) == expected
    # A traceback gives only the most derived name; builtins must classify from that alone.
    if type(exc).__module__ == "builtins":
        assert classify_exception([type(exc).__name__]) == expected


def _connect_to_closed_port() -> object:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return socket.create_connection(("127.0.0.1", port), timeout=5)


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        # Executing a file with no x bit is refused even to root, unlike opening one.
        pytest.param(
            lambda: subprocess.run([__file__], check=False), "permission", id="permission"
        ),
        pytest.param(raise_(PermissionError(13, "denied")), "permission", id="permission-raised"),
        # Tako VM's file_error: a path of the wrong kind; other OSErrors stay os_error.
        pytest.param(lambda: os.listdir("/etc/passwd"), "file_error", id="not-a-directory"),
        pytest.param(lambda: Path("/").read_bytes(), "file_error", id="is-a-directory"),
        pytest.param(lambda: os.mkdir("/"), "os_error", id="file-exists"),
        pytest.param(lambda: os.waitpid(2**22 + 12345, 0), "os_error", id="child-process"),
        pytest.param(lambda: os.kill(2**22 + 12345, 0), "os_error", id="process-lookup"),
        pytest.param(raise_(OSError(5, "I/O error")), "os_error", id="os"),
        pytest.param(raise_(BlockingIOError()), "os_error", id="blocking-io"),
        pytest.param(raise_(InterruptedError()), "os_error", id="interrupted"),
        pytest.param(_connect_to_closed_port, "network_error", id="connection-refused"),
        pytest.param(raise_(ConnectionResetError()), "network_error", id="connection-reset"),
        pytest.param(raise_(ConnectionAbortedError()), "network_error", id="connection-aborted"),
        pytest.param(raise_(ConnectionError()), "network_error", id="connection"),
        pytest.param(raise_(BrokenPipeError()), "network_error", id="broken-pipe"),
        pytest.param(raise_(socket.gaierror(-2, "Name unknown")), "network_error", id="gaierror"),
        pytest.param(raise_(socket.herror(1, "x")), "network_error", id="herror"),
        pytest.param(raise_(urllib.error.URLError("down")), "network_error", id="urlerror"),
        pytest.param(
            raise_(urllib.error.HTTPError("http://x", 500, "boom", None, None)),  # type: ignore[arg-type]
            "network_error",
            id="httperror",
        ),
        pytest.param(
            raise_(socket.timeout("timed out")),  # noqa: UP041 - the alias itself is under test
            "network_timeout",
            id="socket-timeout",
        ),
        pytest.param(raise_(TimeoutError()), "network_timeout", id="timeout-error"),
    ],
)
def test_system_error_rows(action: Callable[[], object], expected: str) -> None:
    exc = raised(action)
    assert classify_exception(mro_names(exc)) == expected


def test_real_socket_timeout() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(0.01)
        exc = raised(lambda: left.recv(1))
    assert isinstance(exc, socket.timeout)
    assert classify_exception(mro_names(exc)) == ErrorType.NETWORK_TIMEOUT


NAME_CASES: list[tuple[list[str], str]] = [
    (["SyntaxError"], "syntax_error"),
    (["IndentationError"], "syntax_error"),
    (["TabError"], "syntax_error"),
    (["ModuleNotFoundError"], "import_error"),
    (["ImportError"], "import_error"),
    (["json.decoder.JSONDecodeError"], "json_error"),
    (["json.JSONDecodeError"], "json_error"),
    (["JSONDecodeError"], "json_error"),
    (["simplejson.errors.JSONDecodeError"], "json_error"),
    (["UnicodeError"], "encoding_error"),
    (["UnicodeDecodeError"], "encoding_error"),
    (["UnicodeEncodeError"], "encoding_error"),
    (["UnicodeTranslateError"], "encoding_error"),
    (["FileNotFoundError"], "file_not_found"),
    (["PermissionError"], "permission"),
    (["socket.timeout"], "network_timeout"),
    (["TimeoutError"], "network_timeout"),
    (["ConnectionError"], "network_error"),
    (["ConnectionRefusedError"], "network_error"),
    (["ConnectionResetError"], "network_error"),
    (["ConnectionAbortedError"], "network_error"),
    (["BrokenPipeError"], "network_error"),
    (["socket.gaierror"], "network_error"),
    (["socket.herror"], "network_error"),
    (["urllib.error.URLError"], "network_error"),
    (["requests.exceptions.ConnectionError"], "network_error"),
    (["OSError"], "os_error"),
    (["IOError"], "os_error"),
    (["EnvironmentError"], "os_error"),
    (["IsADirectoryError"], "file_error"),
    (["NotADirectoryError"], "file_error"),
    (["AssertionError"], "assertion_error"),
    (["OverflowError"], "overflow_error"),
    (["IsADirectoryError", "OSError", "Exception"], "file_error"),
    (["__main__.Bad", "AssertionError", "Exception"], "assertion_error"),
    (["FileExistsError"], "os_error"),
    (["BlockingIOError"], "os_error"),
    (["ChildProcessError"], "os_error"),
    (["InterruptedError"], "os_error"),
    (["ProcessLookupError"], "os_error"),
    (["RecursionError"], "recursion_error"),
    (["ZeroDivisionError"], "division_error"),
    (["KeyError"], "key_error"),
    (["IndexError"], "index_error"),
    (["AttributeError"], "attribute_error"),
    (["NameError"], "name_error"),
    (["UnboundLocalError"], "name_error"),
    (["TypeError"], "type_error"),
    (["ValueError"], "value_error"),
    (["MemoryError"], "oom"),
    # Walked from the most derived: the first name with a row decides.
    (["__main__.BadError", "ValueError", "Exception", "BaseException"], "value_error"),
    (["json.decoder.JSONDecodeError", "ValueError", "Exception"], "json_error"),
    (["FileNotFoundError", "OSError", "Exception"], "file_not_found"),
    (["ExceptionGroup", "BaseExceptionGroup", "Exception", "BaseException"], "runtime_error"),
    (["  ValueError \n"], "value_error"),
    # Nothing known.
    (["__main__.BadError"], "runtime_error"),
    (["RuntimeError"], "runtime_error"),
    (["timeout"], "runtime_error"),
    (["gaierror"], "runtime_error"),
    ([], "runtime_error"),
    ([""], "runtime_error"),
    (["."], "runtime_error"),
]


@pytest.mark.parametrize(("names", "expected"), NAME_CASES)
def test_classify_exception_by_name(names: list[str], expected: str) -> None:
    assert classify_exception(names) == expected


def test_every_table_name_has_a_case() -> None:
    table_names = {name for names, _ in EXCEPTION_TABLE for name in names}
    single = {names[0] for names, _ in NAME_CASES if len(names) == 1}
    assert table_names <= single


def test_exception_names_form() -> None:
    assert exception_names(json.JSONDecodeError) == [
        "json.decoder.JSONDecodeError",
        "ValueError",
        "Exception",
        "BaseException",
        "object",
    ]
    assert exception_names(BadError)[0] == f"{__name__}.BadError"


# --- Tracebacks from real interpreters -----------------------------------------------------------

TRACEBACK_CASES = [
    pytest.param(
        "x = 1 / 0\n",
        "ZeroDivisionError",
        "ZeroDivisionError: division by zero",
        id="zero-division",
    ),
    pytest.param(
        "def broken(\n",
        "SyntaxError",
        "SyntaxError: '(' was never closed",
        id="syntax-error-in-file",
    ),
    pytest.param(
        "if True:\nprint('x')\n",
        "IndentationError",
        "IndentationError: expected an indented block after 'if' statement on line 1",
        id="indentation-error-in-file",
    ),
    pytest.param(
        """
        try:
            {}["k"]
        except KeyError:
            raise ValueError("second")
        """,
        "ValueError",
        "ValueError: second",
        id="chained-during-handling",
    ),
    pytest.param(
        """
        try:
            1 / 0
        except ZeroDivisionError as exc:
            raise RuntimeError("wrapped: cause") from exc
        """,
        "RuntimeError",
        "RuntimeError: wrapped: cause",
        id="chained-direct-cause",
    ),
    pytest.param(
        "raise KeyError('a: b\\nTraceback (most recent call last):\\nc: d')\n",
        "KeyError",
        "KeyError: 'a: b\\nTraceback (most recent call last):\\nc: d'",
        id="key-error-colons-newlines",
    ),
    pytest.param(
        """
        exc = ValueError("first line\\nSecondError: looks like an exception\\n  File \\"x\\"")
        exc.add_note("NoteError: a note")
        raise exc
        """,
        "ValueError",
        "ValueError: first line",
        id="multiline-message-and-note",
    ),
    pytest.param(
        "import json\njson.loads('{')\n",
        "json.decoder.JSONDecodeError",
        "json.decoder.JSONDecodeError: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)",
        id="json-error",
    ),
    pytest.param(
        "import socket\nraise socket.gaierror(-2, 'Name or service not known')\n",
        "socket.gaierror",
        "socket.gaierror: [Errno -2] Name or service not known",
        id="qualified-name",
    ),
    pytest.param(
        "class BadError(ValueError):\n    pass\nraise BadError('mine')\n",
        "BadError",
        "BadError: mine",
        id="user-class",
    ),
    pytest.param("raise KeyError\n", "KeyError", "KeyError", id="no-message"),
    pytest.param(
        "def f():\n    f()\nf()\n",
        "RecursionError",
        "RecursionError: maximum recursion depth exceeded",
        id="recursion-repeated-lines",
    ),
    pytest.param(
        """
        import sys
        print("Warning: something went wrong", file=sys.stderr)
        try:
            raise ValueError("inner")
        except ValueError:
            raise ExceptionGroup("group", [TypeError("t"), ExceptionGroup("sub", [KeyError(1)])])
        """,
        "ExceptionGroup",
        "ExceptionGroup: group (2 sub-exceptions)",
        id="exception-group-chained",
    ),
    pytest.param(
        """
        try:
            raise ExceptionGroup("group", [TypeError("t")])
        except ExceptionGroup as exc:
            raise AttributeError("outer") from exc
        """,
        "AttributeError",
        "AttributeError: outer",
        id="exception-group-as-cause",
    ),
    pytest.param(
        """
        import atexit, sys
        atexit.register(lambda: print("Note: cleaning up", file=sys.stderr))
        [][3]
        """,
        "IndexError",
        "IndexError: list index out of range",
        id="output-after-traceback",
    ),
]


@pytest.mark.parametrize(("source", "name", "line"), TRACEBACK_CASES)
def test_parse_real_tracebacks(tmp_path: Path, source: str, name: str, line: str) -> None:
    stderr = run_python(tmp_path, source)
    assert parse_traceback(stderr) == name
    assert exception_message(stderr) == line


def test_traceback_from_dash_c() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import json; json.loads('{')"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert parse_traceback(proc.stderr) == "json.decoder.JSONDecodeError"
    assert classify_exception([parse_traceback(proc.stderr) or ""]) == ErrorType.JSON_ERROR


def test_socket_timeout_traceback_classifies(tmp_path: Path) -> None:
    stderr = run_python(tmp_path, "import socket\nraise socket.timeout('timed out')\n")
    name = parse_traceback(stderr)
    assert name == "TimeoutError"  # an alias of TimeoutError since Python 3.10
    assert classify_exception([name]) == ErrorType.NETWORK_TIMEOUT


def test_long_traceback_beyond_the_window(tmp_path: Path) -> None:
    # 300 distinct frames: the header falls outside the last 200 lines.
    source = "".join(f"def f{i}():\n    f{i + 1}()\n" for i in range(300))
    source += "def f300():\n    {}['deep']\nf0()\n"
    stderr = run_python(tmp_path, source)
    assert len(stderr.splitlines()) > 600
    assert parse_traceback(stderr) == "KeyError"
    assert exception_message(stderr) == "KeyError: 'deep'"


@pytest.mark.parametrize(
    "stderr",
    [
        pytest.param("", id="empty"),
        pytest.param("hello\nworld\n", id="plain-output"),
        pytest.param("Warning: disk almost full\n", id="colon-line-without-traceback"),
        pytest.param("Traceback (most recent call last):\n", id="header-only"),
        pytest.param(
            'Traceback (most recent call last):\n  File "x", line 1, in <module>\n', id="no-exc"
        ),
        pytest.param(
            os.urandom(4096).decode("utf-8", "replace").replace("\n", " "), id="binary-garbage"
        ),
        pytest.param(
            "Traceback (most recent call last):\nnot an exception line\n\x00\x01\x02\n",
            id="garbage-after-header",
        ),
        pytest.param("Fatal Python error: Segmentation fault\n", id="fatal-error"),
    ],
)
def test_parse_without_exception(stderr: str) -> None:
    assert parse_traceback(stderr) is None
    assert exception_message(stderr) is None


def test_garbage_before_traceback_is_ignored(tmp_path: Path) -> None:
    stderr = run_python(tmp_path, "1 / 0\n")
    noisy = os.urandom(8192).decode("latin-1") + "\n" + stderr
    assert parse_traceback(noisy) == "ZeroDivisionError"


def test_windows_line_endings() -> None:
    stderr = 'Traceback (most recent call last):\r\n  File "x", line 1\r\nKeyError: 1\r\n'
    assert parse_traceback(stderr) == "KeyError"
    assert exception_message(stderr) == "KeyError: 1"


@pytest.mark.parametrize(
    "stderr",
    [
        pytest.param("a" * 5_000_000, id="one-huge-line"),
        pytest.param("Traceback (most recent call last):\n" * 200_000, id="many-headers"),
        pytest.param('  File "x", line 1\n' * 200_000, id="many-frames"),
        pytest.param("Traceback (most recent call last):\n" + "A." * 2_000_000, id="dotted"),
        pytest.param("Traceback (most recent call last):\n" + ": " * 2_000_000, id="colons"),
    ],
)
def test_hostile_input_is_read_only_up_to_a_bounded_tail(stderr: str) -> None:
    """The work is bounded by the tail the parser reads, whatever the input's size (and the
    parser has no regular expression to backtrack in)."""
    lines = classify._tail_lines(stderr)
    assert len(lines) <= classify._TAIL_LINES
    assert sum(len(line) for line in lines) <= classify._TAIL_CHARS
    parse_traceback(stderr)
    exception_message(stderr)


def test_exception_message_is_capped() -> None:
    stderr = "Traceback (most recent call last):\nValueError: " + "x" * 5000 + "\n"
    message = exception_message(stderr)
    assert message is not None
    assert message.startswith("ValueError: xxx")
    assert len(message) <= 1000


# --- Messages and policy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_type", "timeout", "expected"),
    [
        (ErrorType.TIMEOUT, 5, "Execution timeout exceeded (5s)"),
        (ErrorType.TIMEOUT, 5.0, "Execution timeout exceeded (5s)"),
        (ErrorType.TIMEOUT, 2.5, "Execution timeout exceeded (2.5s)"),
        (ErrorType.TIMEOUT, 300, "Execution timeout exceeded (300s)"),
        (ErrorType.TIMEOUT, None, "Execution timeout exceeded"),
        (ErrorType.OOM, None, "Execution exceeded memory limit"),
        (ErrorType.SERVICE_UNAVAILABLE, None, "Service temporarily unavailable"),
        (ErrorType.DIVISION_ERROR, None, "Division by zero"),
        (ErrorType.KILLED, None, "Process killed by system"),
        (ErrorType.PERMISSION, None, "Permission denied"),
        (ErrorType.NETWORK_ERROR, None, "Connection failed"),
        (ErrorType.NETWORK_TIMEOUT, None, "Network request timed out"),
        (ErrorType.JSON_ERROR, None, "Invalid JSON"),
        (ErrorType.SYNTAX_ERROR, None, "Invalid Python syntax"),
        (ErrorType.SEGFAULT, None, "Segmentation fault (SIGSEGV)"),
        (ErrorType.OOM, 5, "Execution exceeded memory limit"),
    ],
)
def test_default_message(error_type: ErrorType, timeout: float | None, expected: str) -> None:
    assert default_message(error_type, timeout=timeout) == expected


@pytest.mark.parametrize("error_type", list(ErrorType))
def test_every_type_has_a_message(error_type: ErrorType) -> None:
    message = default_message(error_type)
    assert message
    assert message[0].isupper()
    assert not message.endswith(".")


def test_retryable_is_the_seeds_set() -> None:
    assert {"service_unavailable", "network_error", "network_timeout"} == RETRYABLE


@pytest.mark.parametrize(
    ("error_type", "expected"),
    [
        *[(ErrorType(t), True) for t in ("syntax_error", "import_error", "name_error")],
        *[(ErrorType(t), True) for t in ("type_error", "value_error", "json_error")],
        (ErrorType.TIMEOUT, True),
        (ErrorType.OOM, True),
        (ErrorType.SEGFAULT, True),
        (ErrorType.RUNTIME_ERROR, True),
        (ErrorType.NONZERO_EXIT, True),
        (ErrorType.INVALID_OUTPUT, True),
        (ErrorType.INVALID_REQUEST, True),
        (ErrorType.NETWORK_ERROR, True),
        (ErrorType.SERVICE_UNAVAILABLE, False),
        (ErrorType.INTERNAL_ERROR, False),
        (ErrorType.CANCELLED, False),
        (ErrorType.KILLED, False),
    ],
)
def test_is_user_error(error_type: ErrorType, expected: bool) -> None:
    assert is_user_error(error_type) is expected


def test_the_seeds_permanent_errors_are_user_errors() -> None:
    for name in ("syntax_error", "import_error", "name_error", "type_error"):
        assert is_user_error(ErrorType(name))
        assert ErrorType(name) not in RETRYABLE


# --- The service's exceptions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "parent", "error_type"),
    [
        (TakoError, Exception, ErrorType.INTERNAL_ERROR),
        (InvalidRequestError, TakoError, ErrorType.INVALID_REQUEST),
        (SandboxError, TakoError, ErrorType.INTERNAL_ERROR),
        (SandboxUnavailableError, SandboxError, ErrorType.SERVICE_UNAVAILABLE),
        (SandboxSetupError, SandboxError, ErrorType.INTERNAL_ERROR),
    ],
)
def test_exception_tree(cls: type[TakoError], parent: type[Exception], error_type: str) -> None:
    assert cls.__bases__ == (parent,)
    assert cls.error_type == error_type
    assert cls.__doc__


def test_invalid_request_error_names_each_field() -> None:
    exc = InvalidRequestError(["code: must not be blank", "timeout: too big"], "job-1")
    assert exc.errors == ["code: must not be blank", "timeout: too big"]
    assert exc.execution_id == "job-1"
    assert str(exc) == "Invalid request: code: must not be blank; timeout: too big"
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.errors, copy.execution_id) == (exc.errors, exc.execution_id)


def test_invalid_request_error_takes_one_string_as_one_error() -> None:
    exc = InvalidRequestError("request: not JSON")
    assert exc.errors == ["request: not JSON"]
    assert exc.execution_id is None


def test_sandbox_errors_carry_messages() -> None:
    exc = SandboxUnavailableError("Docker daemon unreachable: refused")
    assert str(exc) == "Docker daemon unreachable: refused"
    assert isinstance(exc, TakoError)


@pytest.mark.parametrize("module", [errors, classify])
def test_all_lists_every_public_name(module: types.ModuleType) -> None:
    """``__all__`` is every public name the module itself defines (read from its source, so
    names it imports do not count)."""
    tree = ast.parse(Path(str(module.__file__)).read_text())
    defined_here: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined_here.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined_here.add(node.target.id)
        elif isinstance(node, ast.Assign):
            defined_here.update(t.id for t in node.targets if isinstance(t, ast.Name))
    public = {name for name in defined_here if not name.startswith("_")}
    assert set(vars(module)["__all__"]) == public
