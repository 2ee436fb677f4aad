"""/openapi.json: an OpenAPI 3.1 document of every route, built from the route table and the
pydantic models of ``schemas``.

Each operation lists every status it answers: its success (``Route.status``, with its media
types, or an empty body), its own errors (``Route.errors``), and those any route may give: 401
without the server's token, 403 for a foreign origin or host name, and for a route with a body
400 (a body its model refuses) and 413 (over the size limit). Every error is ComfyUI's
``{"error": {"type", "message", "details", "extra_info"}}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from nodeflow.server.common import Param, Route
from nodeflow.server.schemas import ErrorResponse, FileInfo, ImageRef, ModelFile, ModelFolder

STATUS_TEXT = {
    101: "Switching to the WebSocket protocol", 200: "OK", 204: "Done (no body)", 400: "Bad request",
    401: "Authentication required (when the server has a token)",
    403: "Refused: a cross-origin request, a host name not served, or a path that leaves its folder",
    404: "Not found", 409: "Conflict: it exists", 413: "Too large",
    503: "The queue's storage refuses writes for now (disk full): nothing was changed",
    507: "No space left to store it",
}


def openapi(routes: list[Route], version: str) -> dict[str, Any]:
    """An OpenAPI 3.1 document of the routes (each also served under /api)."""
    # ErrorResponse for every error; the others are referenced by inline schemas.
    models: list[type[BaseModel]] = [ErrorResponse, ImageRef, FileInfo, ModelFolder, ModelFile]
    for r in routes:
        for m in (r.body, r.response):
            if _is_model(m) and m not in models:
                models.append(m)
    _, schema = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        paths.setdefault(_openapi_path(r.path), {})[r.method.lower()] = _operation(r)
    return {
        "openapi": "3.1.0",
        "info": {"title": "nodeflow", "version": version,
                 "description": "ComfyUI's HTTP API, served by nodeflow. Every path is also served under /api."},
        "paths": paths,
        "components": {"schemas": schema.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{}, {"bearer": []}],
    }


def _operation(r: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": r.summary, "operationId": f"{r.method.lower()}{_op_name(r.path)}"}
    if r.tag:
        op["tags"] = [r.tag]
    params = [{"name": name, "in": "path", "required": True, "schema": r.params.get(name, {"type": "string"})}
              for name in _path_params(r.path)]
    for q in r.query:
        q = q if isinstance(q, Param) else Param(*q)
        param: dict[str, Any] = {"name": q.name, "in": "query", "required": q.required, "schema": q.schema}
        if q.description:
            param["description"] = q.description
        params.append(param)
    if params:
        op["parameters"] = params
    errors = {401, 403, *r.errors}
    if r.body is not None:
        media = "multipart/form-data" if r.multipart else r.body_media
        op["requestBody"] = {"required": r.body_required, "content": {media: {"schema": _schema(r.body)}}}
        errors |= {400, 413}
    success: dict[str, Any] = {"description": STATUS_TEXT.get(r.status, "OK")}
    if r.media:
        shown = _schema(r.response) if r.response is not None else {}
        success["content"] = {m: {"schema": shown if m == "application/json" else {}} for m in r.media}
    responses: dict[str, Any] = {str(r.status): success}
    for status in sorted(errors):
        responses[str(status)] = {"description": STATUS_TEXT.get(status, "Error"),
                                  "content": {"application/json": {"schema": _schema(ErrorResponse)}}}
    op["responses"] = responses
    return op


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _schema(value: Any) -> dict[str, Any]:
    if _is_model(value):
        return {"$ref": f"#/components/schemas/{value.__name__}"}
    return value if isinstance(value, dict) else {}


def _path_params(path: str) -> list[str]:
    return [p[1:-1].split(":")[0] for p in path.split("/") if p.startswith("{")]


def _openapi_path(path: str) -> str:
    return "/".join("{" + p[1:-1].split(":")[0] + "}" if p.startswith("{") else p for p in path.split("/"))


def _op_name(path: str) -> str:
    parts = [p.strip("{}").split(":")[0] for p in path.split("/") if p]
    return "".join(p[:1].upper() + p[1:] for p in parts) or "Root"
