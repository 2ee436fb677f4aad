"""The graph editor at ``/``: ComfyUI's own web frontend, as ComfyUI serves it.

Where the files come from, first found:

1. ``--web-root DIR`` (a frontend build: ``DIR/index.html`` and its assets);
2. the ``comfyui-frontend-package`` from PyPI (``pip install "nodeflow[web]"``), the package
   ComfyUI itself serves, in the versions nodeflow is tested with (``TESTED``; another
   version is served too, with a warning);
3. none: ``/`` answers a short page saying what the server is and how to get the editor.

``index.html`` goes out with ``Cache-Control: no-cache`` (a new frontend version is picked up
at once; its assets have hashed names). Other files are served from the root, never from outside
it (``..``, absolute names and symlinks that lead out are 404, as are missing files, in JSON).
"""

from __future__ import annotations

import html
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from nodeflow.folders import InvalidFileName, UnsafePath, confined_path

log = logging.getLogger(__name__)

PACKAGE = "comfyui-frontend-package"
MODULE = "comfyui_frontend_package"
#: The frontend versions the browser test has passed with: [TESTED[0], TESTED[1]).
TESTED = ((1, 28, 9), (1, 59, 0))


@dataclass(frozen=True)
class Frontend:
    root: Path
    #: Where it came from, for the log: "--web-root" or "comfyui-frontend-package 1.58.1".
    source: str


#: The frontend the app serves (None: the page saying how to get one).
EDITOR: web.AppKey[Frontend | None] = web.AppKey("editor")


def find_frontend(web_root: str | None) -> Frontend | None:
    """The frontend to serve; ``ValueError`` when ``web_root`` is given but holds none."""
    if web_root:
        root = Path(web_root).expanduser().resolve()
        if not (root / "index.html").is_file():
            raise ValueError(f"--web-root {web_root}: no index.html there (expected a web frontend build)")
        return Frontend(root, f"--web-root {root}")
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "static"
    if not (root / "index.html").is_file():
        log.warning("%s is installed but has no static/index.html; not serving the editor", PACKAGE)
        return None
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if not _tested(version):
        low, high = (".".join(map(str, v)) for v in TESTED)
        log.warning("%s %s is outside the versions nodeflow is tested with (>=%s,<%s); serving it anyway",
                    PACKAGE, version, low, high)
    return Frontend(root, f"{PACKAGE} {version}")


def _tested(version: str) -> bool:
    try:
        parts = tuple(int(p) for p in version.split(".")[:3])
    except ValueError:
        return False
    return TESTED[0] <= parts < TESTED[1]


def serve(app: web.Application, frontend: Frontend | None) -> None:
    """Add ``/`` (and, with a frontend, its static files) to ``app``: after the API routes,
    which win over a file of the same name."""
    if frontend is None:
        app.router.add_get("/", _no_editor)
        return
    index = frontend.root / "index.html"

    async def home(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

    async def static(request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            allowed = await _allowed_methods(request, static)
            if allowed:  # an API route of this path, with other methods
                raise web.HTTPMethodNotAllowed(request.method, allowed)
            raise web.HTTPNotFound()
        name = request.match_info["path"]
        try:
            path = confined_path(frontend.root, name, what="the frontend's folder")
        except (InvalidFileName, UnsafePath):
            path = None
        if path is None or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app.router.add_get("/", home)
    app.router.add_route("*", "/{path:.+}", static)


async def _allowed_methods(request: web.Request, catch_all: object) -> set[str]:
    """The methods the app's other routes offer at this request's path."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if any(route.handler is catch_all for route in resource):
            continue
        _, methods = await resource.resolve(request)
        allowed |= methods
    return allowed


_NO_EDITOR = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nodeflow</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:42em;margin:3em auto;padding:0 1em;color:#222}}
code{{background:#eee;padding:.1em .3em;border-radius:3px}}</style></head>
<body><h1>nodeflow {version}</h1>
<p>This is nodeflow's server. It speaks ComfyUI's HTTP and WebSocket API, so ComfyUI clients work
with it; the routes and their schemas are in <a href="openapi.json">/openapi.json</a>.</p>
<p><b>The graph editor is not installed.</b> To get it (ComfyUI's own web frontend, from PyPI),
install nodeflow with its <code>web</code> extra and start the server again:</p>
<pre><code>pip install "nodeflow[web]"
python server.py</code></pre>
<p>Or serve a frontend build of your own with <code>--web-root DIR</code>.</p>
</body></html>
"""


async def _no_editor(request: web.Request) -> web.Response:
    from nodeflow import __version__

    return web.Response(text=_NO_EDITOR.format(version=html.escape(__version__)), content_type="text/html",
                        headers={"Cache-Control": "no-cache"})
