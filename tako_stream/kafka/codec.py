"""The only place where bytes become messages and messages become bytes (orjson).

Decoding is where untrusted input enters the service, so it never raises anything but
``InvalidRequestError``, whose ``errors`` name each bad field for the ``invalid_request`` result.
"""

from __future__ import annotations

import gc
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from tako_stream.core.errors import InvalidRequestError
from tako_stream.core.models import CORRELATION_HEADER, MAX_CORRELATION_CHARS, ExecutionRequest

Headers = Sequence[tuple[str, bytes]]

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: An invalid_request answer names at most this many problems, each in at most _MAX_ERROR chars
#: (with its field name cut at _MAX_LOC): a request with 200,000 unknown fields, or one named
#: with a megabyte, must not make a multi-megabyte answer (nor a DLQ record over the topic's max).
_MAX_ERRORS = 20
_MAX_ERROR = 300
_MAX_LOC = 64
_FIELDS = frozenset(ExecutionRequest.model_fields)


def dumps(value: Any) -> bytes:
    """Compact JSON bytes; pydantic models are dumped in JSON mode."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return orjson.dumps(value)


def encodes(value: Any) -> bool:
    """Whether orjson can write ``value`` (not past its depth limit, no integer past 64 bits,
    no key that is not a string)."""
    try:
        orjson.dumps(value)
    except (orjson.JSONEncodeError, TypeError, ValueError):
        return False
    return True


def loads(data: bytes | str) -> Any:
    """orjson.loads with the cyclic garbage collector paused: a value of a million small
    containers (anyone's message, a job's result.json) set off a collection every few hundred
    allocations, each walking the young objects: 0.7 s for a 4 MB message, 0.1 s paused
    (measured).  A parsed value holds no cycle, so nothing is left for the collector."""
    if not gc.isenabled():
        return orjson.loads(data)
    gc.disable()
    try:
        return orjson.loads(data)
    finally:
        gc.enable()


def new_id() -> str:
    return str(uuid.uuid4())


def header(headers: Headers | None, name: str) -> bytes | None:
    """The last value of a header, matched case-insensitively as HTTP-minded users expect."""
    found = None
    for key, value in headers or ():
        if key.lower() == name:
            found = value
    return found


def correlation_id(headers: Headers | None) -> str:
    """The request's correlation id, or a new one; unprintable or huge values are replaced."""
    raw = header(headers, CORRELATION_HEADER)
    try:
        text = raw.decode("utf-8") if raw else None
    except UnicodeDecodeError:
        text = None
    return clean_correlation_id(text)


def clean_correlation_id(text: str | None) -> str:
    """``text`` stripped if it is printable and at most ``MAX_CORRELATION_CHARS`` long, else a
    new id: it goes into JSON, log lines and headers.  An HTTP header's bytes that are not
    UTF-8 arrive as surrogate escapes, which are not printable."""
    text = (text or "").strip()
    if text and len(text) <= MAX_CORRELATION_CHARS and text.isprintable():
        return text
    return new_id()


def usable_id(value: object) -> str | None:
    """``value`` as an execution id if it is one (text or UTF-8 bytes of the allowed form)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and _ID.fullmatch(value):
        return value
    return None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(errors: Iterable[Any]) -> list[str]:
    described = []
    for err in errors:
        where = ".".join(_clip(str(part), _MAX_LOC) for part in err["loc"]) or "request"
        message = str(err["msg"]).removeprefix("Value error, ")  # pydantic's validator prefix
        described.append(f"{where}: {message}")
    return described


def _bounded(errors: list[str]) -> list[str]:
    """At most ``_MAX_ERRORS`` lines of at most ``_MAX_ERROR`` characters each."""
    kept = [_clip(e, _MAX_ERROR) for e in errors[:_MAX_ERRORS]]
    if len(errors) > _MAX_ERRORS:
        kept.append(f"request: {len(errors) - _MAX_ERRORS} more problem(s) not listed")
    return kept


def _json_problem(value: bytes, exc: orjson.JSONDecodeError) -> str:
    """orjson's reason (which names a BOM or too deep a nesting), and where: the offending
    text (``NaN``, ``'``...) or the first byte that is not UTF-8."""
    detail = f"request: not valid JSON ({exc})"
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"{detail}: invalid UTF-8 byte 0x{value[bad.start]:02x} at offset {bad.start}"
    near = exc.doc[exc.pos : exc.pos + 24] if isinstance(exc.doc, str) else ""
    return f"{detail} near {near!r}" if near else detail


def decode_request(
    value: bytes | None, key: bytes | None, fallback_id: str | None = None
) -> ExecutionRequest:
    """Parse and validate a request; the id falls back to the key, then to ``fallback_id``
    (the intake passes one derived from the record's position, so a re-delivery of the same
    record gets the same id), then to a new UUID."""
    if value is None:
        raise InvalidRequestError(["request: message has no value"], usable_id(key))
    try:
        body = loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError([_json_problem(value, exc)], usable_id(key)) from None
    if not isinstance(body, dict):
        raise InvalidRequestError(
            [f"request: expected a JSON object, got {type(body).__name__}"], usable_id(key)
        )
    # Unknown fields are named here rather than by pydantic, which would build one error per
    # field (seconds of CPU, and megabytes of message, for a request with 200,000 of them).
    unknown = [name for name in body if name not in _FIELDS]
    errors = [f"{_clip(name, _MAX_LOC)}: Extra inputs are not permitted" for name in unknown]
    if unknown:
        body = {name: body[name] for name in _FIELDS if name in body}
    try:
        request = ExecutionRequest.model_validate(body)
    except ValidationError as exc:
        errors = _describe(exc.errors(include_url=False)) + errors
    if errors:
        raise InvalidRequestError(
            _bounded(errors), usable_id(body.get("execution_id")) or usable_id(key)
        ) from None
    if request.execution_id is None:
        execution_id = usable_id(key) or fallback_id or new_id()
        request = request.model_copy(update={"execution_id": execution_id})
    return request
