"""What the server's modules share: the configuration, the typed app state keys, the route
table entry, and JSON responses in ComfyUI's error shape."""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from nodeflow.events import dumps

if TYPE_CHECKING:
    from nodeflow.folders import Folders
    from nodeflow.limits import ResourceLimits
    from nodeflow.queue import Dispatcher, PromptQueue
    from nodeflow.registry import Registry
    from nodeflow.server.ws import Hub


@dataclass
class ServerConfig:
    """Every server option; ``nodeflow serve --help`` describes them."""

    hosts: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    port: int = 8188
    base_dir: str | None = None
    input_dir: str | None = None
    output_dir: str | None = None
    temp_dir: str | None = None
    #: The queue/history database; None: BASE/nodeflow.sqlite3; ":memory:" keeps nothing.
    db_path: str | None = None
    #: After a crash, queue the prompt that was running again instead of failing it.
    requeue_interrupted: bool = False
    max_history: int = 10_000
    #: When set, every request needs ``Authorization: Bearer <token>``.
    auth_token: str | None = None
    #: Origins (``scheme://host[:port]``, or ``*``) whose browser pages may POST and open the
    #: WebSocket; the server's own origin always may.
    allow_origins: list[str] = field(default_factory=list)
    #: Extra Host names accepted while listening on loopback only (DNS-rebinding guard).
    allow_hosts: list[str] = field(default_factory=list)
    max_upload_mb: float = 100.0
    #: Pixels one node may make or take: width × height × batch_size inputs, LATENT and IMAGE
    #: sizes (checked on literals at validation, on resolved inputs at run time; 0: none).
    max_pixels: int = 4096 * 4096
    #: Limit on ``steps`` inputs, literal or linked (0: none).
    max_steps: int = 1000
    #: Characters in one literal input of a prompt: a string, or a list as JSON (0: none).
    max_literal: int = 1_000_000
    #: Send live previews as binary WebSocket frames (off by default, as several clients
    #: take them for results or crash on them).
    previews: bool = False
    preview_size: int = 512
    #: Node outputs kept in the executor's cache between runs.
    cache_size: int = 4096
    #: A folder of web frontend files to serve at / (e.g. ComfyUI's frontend build).
    web_root: str | None = None
    #: The model stack's device ("cuda", "cuda:1", "mps", "cpu") and precision ("fp32",
    #: "fp16", "bf16"); None: automatic. Applied when the worker starts.
    device: str | None = None
    precision: str | None = None
    #: The fast model path: the torch.compile backend of ``--compile`` ("inductor"; None: eager)
    #: and ``--cuda-graphs``. Applied to every worker, as the device is.
    compile: str | None = None
    cuda_graphs: bool = False
    #: Where prompts run: "local" (workers in this process) or "ray" (Ray actors).
    backend: str = "local"
    #: Workers: None means one (local), or one per GPU in the Ray cluster (ray).
    workers: int | None = None
    #: The Ray cluster to join ("auto" or "HOST:PORT"); None: start one on this machine.
    ray_address: str | None = None
    #: torch threads per Ray worker process (None: the cluster's CPUs shared among them).
    worker_threads: int | None = None
    #: Runs a prompt may lose with a dead worker before it fails.
    max_tries: int = 3
    #: Node modules or files besides the built-in nodes (the server's and each worker's).
    extra_nodes: list[str] = field(default_factory=list)
    builtin_nodes: bool = True

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


# -- typed app state ------------------------------------------------------------------------------

CONFIG: web.AppKey[ServerConfig] = web.AppKey("config", ServerConfig)
REGISTRY: web.AppKey[Registry] = web.AppKey("registry")
FOLDERS: web.AppKey[Folders] = web.AppKey("folders")
LIMITS: web.AppKey[ResourceLimits] = web.AppKey("limits")
#: Set while the app runs (started in cleanup_ctx):
QUEUE: web.AppKey[PromptQueue] = web.AppKey("queue")
DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("dispatcher")
HUB: web.AppKey[Hub] = web.AppKey("hub")
API_ROUTES: web.AppKey[list[Route]] = web.AppKey("api_routes")


# -- routes ---------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Param:
    """A query (or path) parameter, documented in /openapi.json with its JSON schema."""

    name: str
    description: str = ""
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


STRING: dict[str, Any] = {"type": "string"}
BOOLEAN_FLAG: dict[str, Any] = {"type": "string", "description": "true, 1 or yes for on"}


@dataclass(frozen=True)
class Route:
    """One route: served at ``path`` and at ``/api`` + ``path``, documented in /openapi.json
    with every status it answers."""

    method: str
    path: str
    handler: Handler
    summary: str
    #: The request body: a pydantic model, a JSON schema, or None.
    body: Any = None
    #: The 200 body: a pydantic model, a JSON schema, or None (any JSON).
    response: Any = None
    tag: str = ""
    query: tuple[Param | tuple[str, str], ...] = ()
    #: The body is multipart form data (documented by ``body``'s fields).
    multipart: bool = False
    #: The body's media type when not JSON (e.g. ``*/*`` for a file's bytes).
    body_media: str = "application/json"
    body_required: bool = True
    #: The success status, and its media types (none: an empty body).
    status: int = 200
    media: tuple[str, ...] = ("application/json",)
    #: Error statuses of this route, besides those every route may give (401 without the
    #: token, 403 for a foreign origin or host; 400 and 413 for a route with a body).
    errors: tuple[int, ...] = ()
    #: JSON schemas of path parameters (default: a string).
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


# -- responses ------------------------------------------------------------------------------------


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return raw_json(dumps(data), status, headers)


def raw_json(text: str, status: int = 200, headers: dict | None = None) -> web.Response:
    """A response from JSON text already made (e.g. the history, assembled from storage).
    A lone surrogate (a request's undecodable bytes, echoed back) goes out as its JSON escape
    ``\\udcff``, never as a failure to encode."""
    return web.Response(body=text.encode("utf-8", "backslashreplace"), status=status, headers=headers,
                        content_type="application/json", charset="utf-8")


def error_body(type_: str, message: str, details: str = "", extra: dict | None = None) -> dict:
    """ComfyUI's error object: ``{"type", "message", "details", "extra_info"}``."""
    return {"type": type_, "message": message, "details": details or message, "extra_info": extra or {}}


def error_response(status: int, type_: str, message: str, details: str = "", *, node_errors: bool = False,
                   headers: dict | None = None) -> web.Response:
    body: dict[str, Any] = {"error": error_body(type_, message, details)}
    if node_errors:
        body["node_errors"] = {}
    return json_response(body, status, headers)


def bad_request(exc: ValidationError) -> web.Response:
    """400 for a request body its model refused, in ComfyUI's error shape."""
    errors = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        first = errors[0]
        body = error_body("invalid_json", "The request body is not valid JSON", str(first.get("msg", "")))
    else:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)
        body = error_body("invalid_request", "Invalid request body", details)
    return json_response({"error": body, "node_errors": {}}, 400)


def storage_unavailable(exc: Exception) -> web.Response:
    """503 when the queue's database refuses a write (disk full): nothing was changed."""
    return json_response({"error": error_body("storage_unavailable", "The server cannot store this right now",
                                              f"{exc}; nothing was changed, try again later"),
                          "node_errors": {}}, 503, headers={"Retry-After": "30"})


# -- error texts without server paths ------------------------------------------------------------

#: An absolute POSIX or Windows path (up to the first blank or quote).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"<>,;:()\[\]]+)|\b[A-Za-z]:\\[^\s'\"<>,;()\[\]]*")


def describe_error(exc: BaseException, roots: Iterable[str | os.PathLike] = ()) -> str:
    """``"Type: message"`` for an HTTP error body, with no absolute server path in it: an
    ``OSError`` gives its ``strerror`` (not its file names); elsewhere a path under one of
    ``roots`` becomes relative to it, and any other absolute path shrinks to its last part."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {redact_paths(str(exc), roots)}"


def redact_paths(text: str, roots: Iterable[str | os.PathLike] = ()) -> str:
    """``text`` with paths under ``roots`` made relative and other absolute paths cut to
    their last part."""
    for root in sorted({str(r) for r in roots if str(r) not in ("", "/")}, key=len, reverse=True):
        text = text.replace(root.rstrip("/\\") + os.sep, "").replace(root, ".")
    return _ABSOLUTE_PATH.sub(lambda m: re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1] or "/", text)
