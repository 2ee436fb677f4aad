"""nodeflow's HTTP + WebSocket server: ComfyUI's API over the engine and a persistent queue.

    from nodeflow.server import ServerConfig, create_app
    app = create_app(ServerConfig(base_dir="..."), registry)   # an aiohttp Application

Modules: ``app`` (factory, worker lifetime, command line), ``backend`` (the local backend
with the run-time limit guard), ``routes_prompt`` (prompts, queue, history, jobs),
``routes_files`` (/view, uploads), ``routes_user`` (the frontend's user files),
``routes_info`` (schemas, models, system, frontend settings), ``ws`` (the WebSocket and
event routing), ``security`` (auth, origin and host checks, resource limits, the access
log), ``schemas`` (pydantic bodies, /openapi.json).
"""

from nodeflow.server.app import build_registry, create_app, main
from nodeflow.server.common import ServerConfig

__all__ = ["ServerConfig", "build_registry", "create_app", "main"]
