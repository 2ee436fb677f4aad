"""The server: an app factory, its background worker, and the command line.

    python server.py [--listen HOST] [--port PORT] [--base-dir DIR] [--auth-token TOKEN] ...
    nodeflow serve   (the same options)

``create_app(config, registry)`` builds the aiohttp application: ComfyUI's routes (each
also under ``/api``), the security middlewares, and a ``cleanup_ctx`` that opens the
persistent queue, recovers from a crash, empties temp/ (as ComfyUI does), applies
``--device``/``--precision``, and runs the worker thread for the app's lifetime (all of the
start-up work off the event loop). Handlers are plain functions in the ``routes_*`` modules and
``ws``; they find what they need in the typed app state (``common``). ``frontend`` adds the graph
editor at / after them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from nodeflow import configure_devices
from nodeflow import folders as folders_mod
from nodeflow.cli import speed_options
from nodeflow.limits import ResourceLimits
from nodeflow.queue import (
    Backend,
    BackendError,
    Dispatcher,
    LocalBackend,
    PromptQueue,
    QueueLocked,
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
from nodeflow.server.security import AccessLogger, auth_middleware, is_loopback_host, origin_middleware
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


# -- command line -------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodeflow serve", description="Serve ComfyUI's HTTP + WebSocket API.")
    net = p.add_argument_group("network")
    net.add_argument("--listen", metavar="HOST[,HOST]", nargs="?", const="0.0.0.0", default="127.0.0.1",
                     help="addresses to listen on (default 127.0.0.1; --listen alone: 0.0.0.0)")
    net.add_argument("--port", type=int, default=8188, help="port (default 8188)")
    folders = p.add_argument_group("folders")
    folders.add_argument("--base-dir", metavar="DIR", help="holds models/, input/, output/, temp/ "
                         "(default: $NODEFLOW_HOME or the current directory)")
    folders.add_argument("--input-dir", metavar="DIR")
    folders.add_argument("--output-dir", metavar="DIR")
    folders.add_argument("--temp-dir", metavar="DIR")
    queue = p.add_argument_group("queue and history")
    queue.add_argument("--db", metavar="PATH", default=os.environ.get("NODEFLOW_DB"),
                       help="SQLite file of the queue and history (default BASE/nodeflow.sqlite3, or $NODEFLOW_DB; "
                       "':memory:' keeps nothing)")
    queue.add_argument("--requeue-interrupted", action="store_true",
                       help="after a crash, run the prompt that was running again (default: mark it failed)")
    queue.add_argument("--max-history", type=int, default=10_000, metavar="N", help="history entries kept")
    queue.add_argument("--cache-size", type=int, default=4096, metavar="N", help="node outputs cached between runs")
    sec = p.add_argument_group("security")
    sec.add_argument("--auth-token", default=os.environ.get("NODEFLOW_AUTH_TOKEN"), metavar="TOKEN",
                     help="require 'Authorization: Bearer TOKEN' (or ?token=) on every request "
                     "(default $NODEFLOW_AUTH_TOKEN)")
    sec.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                     help="a browser origin (http://host:port, or *) allowed to POST and open the WebSocket; "
                     "repeatable or comma-separated")
    sec.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="a Host name accepted while listening on loopback only; repeatable")
    sec.add_argument("--max-upload-size", type=float, default=100.0, metavar="MB", help="upload limit (default 100)")
    sec.add_argument("--max-pixels", type=int, default=4096 * 4096, metavar="N",
                     help="pixels a node may make or take: width × height × batch_size, LATENT and IMAGE sizes "
                     "(default 4096×4096; 0: none)")
    sec.add_argument("--max-steps", type=int, default=1000, metavar="N",
                     help="limit on 'steps' inputs, literal or linked (default 1000; 0: none)")
    sec.add_argument("--max-literal-size", type=int, default=1_000_000, metavar="N",
                     help="characters in one literal input of a prompt: a text, or a list as JSON "
                     "(default 1,000,000; 0: none)")
    run = p.add_argument_group("nodes and events")
    run.add_argument("--extra-nodes", action="append", default=[], metavar="MODULE|FILE.py",
                     help="register the nodes of a module or file (repeatable; also $NODEFLOW_EXTRA_NODES, "
                     "comma-separated)")
    run.add_argument("--no-builtin-nodes", action="store_true",
                     help="do not load the built-in nodes and installed node packages")
    run.add_argument("--device", metavar="DEVICE", type=_device,
                     help="cuda, cuda:1, mps or cpu for the models (default: the best available)")
    run.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                     help="model precision (default: fp16 on GPUs, fp32 on the CPU)")
    speed_options(run)
    workers = p.add_argument_group("workers")
    workers.add_argument("--backend", choices=["local", "ray"], default="local",
                         help="where prompts run: local (in this process; default) or ray (Ray actors, one per GPU, "
                         "on this machine or a cluster; pip install \"nodeflow[ray]\")")
    workers.add_argument("--workers", type=_positive, metavar="N",
                         help="workers to run (default: 1 locally; with ray, one per GPU in the cluster, or 1 "
                         "without GPUs)")
    workers.add_argument("--ray-address", metavar="HOST:PORT|auto",
                         help="join a running Ray cluster (default: start one on this machine, loopback only)")
    workers.add_argument("--worker-threads", type=_positive, metavar="N",
                         help="torch threads per Ray worker (default: the cluster's CPUs shared among the workers)")
    workers.add_argument("--max-tries", type=_positive, default=3, metavar="N",
                         help="runs a prompt may lose with a worker that dies before it fails (default 3)")
    run.add_argument("--preview", action="store_true", help="send live previews as binary WebSocket frames")
    run.add_argument("--preview-size", type=int, default=512, metavar="PX")
    run.add_argument("--web-root", metavar="DIR", help="serve this web frontend build at / (default: the graph editor "
                     "of pip install \"nodeflow[web]\", ComfyUI's frontend package, when installed)")
    run.add_argument("--access-log", action="store_true", help="log every request")
    run.add_argument("--verbose", "-v", action="store_true")
    return p


def _device(text: str) -> str:
    kind, _, index = text.strip().lower().partition(":")
    if kind not in ("cuda", "mps", "cpu") or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cuda, cuda:N, mps or cpu")
    return text.strip().lower()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _split(values: Sequence[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _path(arg: str | None) -> str | None:
    """A path given on the command line, absolute against the current directory (as a user
    expects), not against the base directory."""
    return str(Path(arg).expanduser().resolve()) if arg else arg


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        hosts=_split([args.listen]) or ["127.0.0.1"], port=args.port, base_dir=_path(args.base_dir),
        input_dir=_path(args.input_dir), output_dir=_path(args.output_dir), temp_dir=_path(args.temp_dir),
        db_path=_path(args.db),
        requeue_interrupted=args.requeue_interrupted, max_history=args.max_history, auth_token=args.auth_token or None,
        allow_origins=_split(args.allow_origin), allow_hosts=_split(args.allow_host),
        max_upload_mb=args.max_upload_size, max_pixels=args.max_pixels, max_steps=args.max_steps,
        max_literal=args.max_literal_size,
        previews=args.preview, preview_size=args.preview_size, cache_size=args.cache_size, web_root=args.web_root,
        device=args.device, precision=args.precision, compile=args.compile_backend if args.compile else None,
        cuda_graphs=args.cuda_graphs, backend=args.backend, workers=args.workers,
        ray_address=args.ray_address, worker_threads=args.worker_threads, max_tries=args.max_tries,
        extra_nodes=_split(args.extra_nodes) + _split([os.environ.get("NODEFLOW_EXTRA_NODES", "")]),
        builtin_nodes=not args.no_builtin_nodes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    # The event loop shares the GIL with the worker thread: hand it over sooner than the
    # default 5 ms, or every socket write of the loop may wait that long behind a busy run.
    sys.setswitchinterval(0.0005)
    if config.backend != "ray" and (config.ray_address or config.worker_threads):
        print("error: --ray-address and --worker-threads need --backend ray", file=sys.stderr)
        return 2
    try:
        registry = build_registry(config.extra_nodes, builtin=config.builtin_nodes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not all(is_loopback_host(h) for h in config.hosts) and not config.auth_token:
        log.warning("listening on %s without --auth-token: anyone who can reach this port can run prompts "
                    "and read your images", ", ".join(config.hosts))
    try:
        app = create_app(config, registry)
    except ValueError as exc:  # e.g. an unreadable nodeflow.json
        print(f"error: {exc}", file=sys.stderr)
        return 2
    urls = ", ".join(f"http://{'[' + h + ']' if ':' in h else h}:{config.port}" for h in config.hosts)
    editor = app[frontend.EDITOR]
    urls += f" (graph editor: {editor.source})" if editor else " (no graph editor: pip install \"nodeflow[web]\")"
    try:
        web.run_app(app, host=config.hosts, port=config.port, print=lambda _: log.info("serving on %s", urls),
                    access_log=logging.getLogger("nodeflow.access") if args.access_log else None,
                    access_log_class=AccessLogger)
    except (QueueLocked, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        path = config.db_path or default_db_path(app[FOLDERS].base)
        print(f"error: cannot use the queue database {path}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot listen on {urls}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
