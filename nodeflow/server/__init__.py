"""nodeflow's HTTP + WebSocket server: ComfyUI's API over the engine and a persistent queue.

    from nodeflow.server import ServerConfig, create_app
    app = create_app(ServerConfig(base_dir="..."), registry)   # an aiohttp Application

Modules: ``app`` (factory, the queue and its workers for the app's lifetime), ``serve_cli``
(the command line),
``routes_prompt`` (prompts, queue, history, workers), ``routes_jobs`` (the jobs view),
``routes_files`` (/view), ``routes_uploads`` (uploads), ``routes_user`` (the frontend's user
files), ``routes_info`` (schemas, models, system, frontend settings), ``routes_templates`` (the
editor's templates), ``routes_internal`` (ComfyUI's /internal routes: logs, folders),
``frontend`` (the graph editor at /), ``ws`` (the WebSocket and event routing), ``security``
(auth, origin and host checks, the access log), ``schemas`` (pydantic bodies) and ``openapi``
(/openapi.json). The prompts themselves run in ``nodeflow.queue``'s workers.
"""

from nodeflow.registry import build_registry
from nodeflow.server.app import create_app
from nodeflow.server.common import ServerConfig
from nodeflow.server.serve_cli import main

__all__ = ["ServerConfig", "build_registry", "create_app", "main"]
