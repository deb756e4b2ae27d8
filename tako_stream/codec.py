"""The only place where bytes become messages and messages become bytes (orjson).

Decoding is where untrusted input enters the service, so it never raises anything but
``InvalidRequestError``, whose ``errors`` name each bad field for the ``invalid_request`` result.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from tako_stream.errors import InvalidRequestError
from tako_stream.models import CORRELATION_HEADER, ExecutionRequest

Headers = Sequence[tuple[str, bytes]]

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_MAX_CORRELATION = 256


def dumps(value: Any) -> bytes:
    """Compact JSON bytes; pydantic models are dumped in JSON mode."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return orjson.dumps(value)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


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
    if raw:
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            text = ""
        if text and len(text) <= _MAX_CORRELATION and text.isprintable():
            return text
    return new_id()


def _usable_id(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and _ID.fullmatch(value):
        return value
    return None


def _describe(errors: Iterable[Any]) -> list[str]:
    described = []
    for err in errors:
        where = ".".join(str(part) for part in err["loc"]) or "request"
        message = str(err["msg"]).removeprefix("Value error, ")  # pydantic's validator prefix
        described.append(f"{where}: {message}")
    return described


def decode_request(value: bytes | None, key: bytes | None) -> ExecutionRequest:
    """Parse and validate a request; the id falls back to the key, then to a new UUID."""
    if value is None:
        raise InvalidRequestError(["request: message has no value"], _usable_id(key))
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError([f"request: not valid JSON ({exc})"], _usable_id(key)) from None
    if not isinstance(body, dict):
        raise InvalidRequestError(
            [f"request: expected a JSON object, got {type(body).__name__}"], _usable_id(key)
        )
    try:
        request = ExecutionRequest.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequestError(
            _describe(exc.errors(include_url=False)),
            _usable_id(body.get("execution_id")) or _usable_id(key),
        ) from None
    if request.execution_id is None:
        request = request.model_copy(update={"execution_id": _usable_id(key) or new_id()})
    return request
