"""The editor's templates: nodeflow's example workflows (``nodeflow.templates``).

- ``GET /templates/index.json``: the index the editor lists (``index.LOCALE.json`` is not
  translated: 404, and the editor falls back to this one; ``index_logo.json`` is ``{}``);
- ``GET /templates/{name}.json``: one template, as a UI-format workflow;
- ``GET /templates/{name}-1.webp`` / ``.svg``: its thumbnail;
- ``GET /workflow_templates``: the templates of custom node packages, by package (none: ``{}``).

Documents are built from the registry's schemas, off the event loop.
"""

from __future__ import annotations

import asyncio
import re

from aiohttp import web

from nodeflow import templates
from nodeflow.server.common import REGISTRY, Route, error_response, json_response

_THUMBNAIL = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)-1\.(?P<ext>webp|svg)$")
_EXTENSIONS = {"image/webp": "webp", "image/svg+xml": "svg"}


async def template_file(request: web.Request) -> web.Response:
    file = request.match_info["file"]
    registry = request.app[REGISTRY]
    if file == "index.json":
        return json_response(await asyncio.to_thread(templates.index, registry))
    if file == "index_logo.json":
        return json_response({})
    if file.endswith(".json"):
        doc = await asyncio.to_thread(templates.document, file[:-5], registry)
        if doc is not None:
            return json_response(doc)
    found = _THUMBNAIL.match(file)
    if found:
        picture = await asyncio.to_thread(templates.thumbnail, found["name"], registry)
        if picture is not None and _EXTENSIONS[picture[1]] == found["ext"]:
            return web.Response(body=picture[0], content_type=picture[1],
                                headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
    return error_response(404, "not_found", f"No template file {file!r}")


async def workflow_templates(request: web.Request) -> web.Response:
    return json_response({})


ROUTES = [
    Route("GET", "/templates/{file}", template_file, "The editor's templates: index.json (their "
          "index), NAME.json (a UI-format workflow), NAME-1.webp or NAME-1.svg (its thumbnail)",
          tag="frontend", media=("application/json", "image/webp", "image/svg+xml"), errors=(404,)),
    Route("GET", "/workflow_templates", workflow_templates, "Templates of node packages, by package (none)",
          response={"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
          tag="frontend"),
]
