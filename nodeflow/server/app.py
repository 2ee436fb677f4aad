"""The server: an app factory and its background worker (the command line that starts it is
``serve_cli``).

``create_app(config, registry)`` builds the aiohttp application: ComfyUI's routes (each
also under ``/api``), the security middlewares, and a ``cleanup_ctx`` that opens the
persistent queue, recovers from a crash, empties temp/ (as ComfyUI does), applies
``--device``/``--precision``, and runs the worker thread for the app's lifetime (all of the
start-up work off the event loop). Handlers are plain functions in the ``routes_*`` modules and
``ws``; they find what they need in the typed app state (``common``). ``frontend`` adds the graph
editor at / after them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from nodeflow import configure_devices
from nodeflow import folders as folders_mod
from nodeflow.limits import ResourceLimits
from nodeflow.queue import (
    Backend,
    BackendError,
    Dispatcher,
    LocalBackend,
    PromptQueue,
    StorageError,
    default_db_path,
)
from nodeflow.registry import Registry, build_registry
from nodeflow.server import (
    frontend,
    routes_files,
    routes_info,
    routes_internal,
    routes_jobs,
    routes_prompt,
    routes_templates,
    routes_uploads,
    routes_user,
    ws,
)
from nodeflow.server.common import (
    API_ROUTES,
    CONFIG,
    DISPATCHER,
    FOLDERS,
    HUB,
    LIMITS,
    QUEUE,
    REGISTRY,
    Route,
    ServerConfig,
    describe_error,
    error_response,
    storage_unavailable,
)
from nodeflow.server.security import auth_middleware, origin_middleware
from nodeflow.server.ws import Hub, ThreadEmitter

log = logging.getLogger("nodeflow.server")

BackendFactory = Callable[[Registry, ServerConfig], Backend]

ROUTES: list[Route] = [*routes_prompt.ROUTES, *routes_jobs.ROUTES, *routes_files.ROUTES, *routes_uploads.ROUTES,
                       *routes_user.ROUTES, *routes_info.ROUTES,
                       *routes_templates.ROUTES, *routes_internal.ROUTES, *ws.ROUTES]


class StartupError(Exception):
    """The server cannot start as configured (e.g. ``--device cuda`` without CUDA)."""


def create_app(config: ServerConfig | None = None, registry: Registry | None = None, *,
               backend: BackendFactory | None = None) -> web.Application:
    """The application. ``registry`` defaults to the built-in nodes and installed packages
    (and ``config.extra_nodes``); ``backend`` makes the backend that runs prompts (default:
    ``make_backend``: the ``config.backend`` one, whose workers check each node's resolved
    inputs against the resource limits before it runs)."""
    config = config or ServerConfig()
    folders = folders_mod.configure(config.base_dir, input_dir=config.input_dir, output_dir=config.output_dir,
                                    temp_dir=config.temp_dir)
    middlewares: list[Any] = [json_errors, origin_middleware(config)]
    if config.auth_token:
        middlewares.append(auth_middleware(config.auth_token))
    app = web.Application(middlewares=middlewares, client_max_size=config.max_upload_bytes + (1 << 20))
    app[CONFIG] = config
    app[REGISTRY] = registry if registry is not None else build_registry(config.extra_nodes, config.builtin_nodes)
    app[FOLDERS] = folders
    app[LIMITS] = ResourceLimits(config.max_pixels, config.max_steps, config.max_literal)
    app[API_ROUTES] = ROUTES
    for route in ROUTES:
        for prefix in ("", "/api"):
            if route.method == "GET":
                app.router.add_get(prefix + route.path, route.handler)  # HEAD too
            else:
                app.router.add_route(route.method, prefix + route.path, route.handler)
    app[frontend.EDITOR] = frontend.find_frontend(config.web_root)
    frontend.serve(app, app[frontend.EDITOR])
    app[routes_internal.LOGS] = routes_internal.LogBuffer()
    app.cleanup_ctx.append(routes_internal.capture_logs)
    app.cleanup_ctx.append(_worker(backend))
    app.on_shutdown.append(_close_websockets)
    return app


def _worker(make_backend: BackendFactory | None):
    async def worker(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        path = config.db_path or str(default_db_path(app[FOLDERS].base))
        # Opening a big database may migrate it; with the recovery and temp/, off the loop.
        queue = await asyncio.to_thread(_open_queue, path, config, app[FOLDERS])
        try:
            if config.backend == "local":  # remote workers apply them in their own processes
                await asyncio.to_thread(configure_devices, config.device, config.precision,
                                        compile=config.compile, cuda_graphs=config.cuda_graphs)
            backend = (make_backend or default_backend)(app[REGISTRY], config)
        except (ValueError, BackendError) as exc:
            queue.close()
            raise StartupError(str(exc)) from None
        hub = Hub(queue.remaining)
        emitter = ThreadEmitter(hub, asyncio.get_running_loop(), config.previews, config.preview_size)
        dispatcher = Dispatcher(queue, backend, emitter, emitter.queue_changed, registry=app[REGISTRY],
                                max_tries=config.max_tries)
        try:
            await asyncio.to_thread(dispatcher.start)
        except BackendError as exc:
            backend.close()
            queue.close()
            raise StartupError(str(exc)) from None
        app[QUEUE], app[HUB], app[DISPATCHER] = queue, hub, dispatcher
        try:
            yield
        finally:
            await asyncio.to_thread(dispatcher.stop)
            await asyncio.to_thread(backend.close)
            queue.close()

    return worker


def _open_queue(path: str, config: ServerConfig, folders: folders_mod.Folders) -> PromptQueue:
    queue = PromptQueue(path, max_history=config.max_history)
    try:
        recovered = queue.recover(requeue=config.requeue_interrupted)
        if recovered:
            log.warning("%d prompt(s) were running when the server stopped: %s (%s)", len(recovered),
                        ", ".join(recovered), "queued again" if config.requeue_interrupted else "marked failed")
        # Only once this server owns the database (another one on the same base would hold the
        # lock): temp/ is ours to empty.
        removed = folders.clear_temp(keep=(path,) if path != ":memory:" else ())
        if removed:
            log.info("emptied the temp folder (%d entries)", removed)
    except BaseException:
        queue.close()
        raise
    return queue


def default_backend(registry: Registry, config: ServerConfig) -> Backend:
    """The backend ``config.backend`` names: ``local`` (workers in this process; one by
    default) or ``ray`` (Ray actors, one per GPU; imports Ray only then)."""
    limits = ResourceLimits(config.max_pixels, config.max_steps)
    if config.backend == "local":
        return LocalBackend(registry, workers=config.workers or 1, cache_size=config.cache_size,
                            before_node=limits.before_node)
    if config.backend != "ray":
        raise BackendError(f"--backend {config.backend!r}: expected local or ray")
    from nodeflow.queue.ray_backend import RayBackend, RayOptions, import_ray
    from nodeflow.queue.remote import WorkerSpec

    import_ray()  # a clear message now when Ray is missing
    folders = folders_mod.folders()
    spec = WorkerSpec("", base_dir=str(folders.base), device=config.device, precision=config.precision,
                      compile=config.compile, cuda_graphs=config.cuda_graphs,
                      extra_nodes=list(config.extra_nodes), builtin_nodes=config.builtin_nodes,
                      cache_size=config.cache_size, max_pixels=config.max_pixels, max_steps=config.max_steps,
                      previews=config.previews)
    return RayBackend(spec, folders, RayOptions(address=config.ray_address, workers=config.workers,
                                                threads=config.worker_threads))


async def _close_websockets(app: web.Application) -> None:
    if HUB in app:
        await app[HUB].close_all()


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every error as JSON, in ComfyUI's ``{"error": {...}}`` shape; the server never answers
    a failure with a traceback page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        keep = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        return error_response(exc.status, _ERROR_TYPES.get(exc.status, "http_error"), exc.reason,
                              f"{request.method} {request.path}: {exc.reason}", headers=keep)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except StorageError as exc:
        log.error("%s %s: %s", request.method, request.path, exc)
        return storage_unavailable(exc)
    except Exception as exc:
        log.exception("error in %s %s", request.method, request.path)
        folders = request.app.get(FOLDERS)
        roots = (folders.base, folders.input, folders.output, folders.temp) if folders is not None else ()
        return error_response(500, "server_error", "Internal server error", describe_error(exc, roots))


_ERROR_TYPES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}
