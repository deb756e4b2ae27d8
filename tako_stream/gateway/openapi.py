"""The gateway's OpenAPI 3.1 document, generated from its route table and the message models."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tako_stream import __version__
from tako_stream.gateway.api import HEADERS, ROUTES, Response, Route

_PATH_PARAM = re.compile(r"\{(\w+)\}")


def _content(model: type[BaseModel] | None) -> dict[str, Any]:
    schema = (
        {"$ref": f"#/components/schemas/{model.__name__}"}
        if model is not None
        else {"type": "object"}
    )
    return {"content": {"application/json": {"schema": schema}}}


def _response(response: Response) -> dict[str, Any]:
    description, model = response[0], response[1]
    answer: dict[str, Any] = {"description": description, **_content(model)}
    if len(response) > 2:
        answer["headers"] = {
            name: {"description": HEADERS[name][0], "schema": {"type": HEADERS[name][1]}}
            for name in response[2]
        }
    return answer


def _operation(route: Route) -> dict[str, Any]:
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(route.path)
    ] + [{"name": name, "in": "query", "schema": {"type": kind}} for name, kind in route.query]
    operation: dict[str, Any] = {
        "summary": route.summary,
        "responses": {str(code): _response(answer) for code, answer in route.answers.items()},
    }
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {"required": True, **_content(route.body)}
    return operation


def document() -> dict[str, Any]:
    """OpenAPI 3.1 for every documented route; request bodies are schemas in validation mode
    (what the gateway accepts), responses in serialization mode (what it sends)."""
    routes = [r for r in ROUTES if r.documented]
    models: dict[type[BaseModel], str] = {}
    for route in routes:
        for answer in route.answers.values():
            model = answer[1]
            if model is not None:
                models.setdefault(model, "serialization")
        if route.body is not None:
            models[route.body] = "validation"
    _, defs = models_json_schema(
        [(model, mode) for model, mode in models.items()],  # type: ignore[misc]
        ref_template="#/components/schemas/{model}",
    )
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "tako-stream gateway", "version": __version__},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }
