"""What the server knows: node schemas, model files, the machine, and the small routes the
stock ComfyUI web frontend needs before it starts (users, settings, extensions, ...).

torch is imported only for /system_stats, lazily and only if it is installed: the server
itself runs without it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from nodeflow.folders import MODEL_KINDS
from nodeflow.server.common import (
    API_ROUTES,
    CONFIG,
    DISPATCHER,
    FOLDERS,
    QUEUE,
    REGISTRY,
    Route,
    error_response,
    json_response,
)
from nodeflow.server.openapi import openapi
from nodeflow.server.schemas import Features, ObjectInfo, SystemStats, Users
from nodeflow.server.ws import server_features


async def object_info(request: web.Request) -> web.Response:
    # Combo choices may list files on disk: off the event loop.
    return json_response(await asyncio.to_thread(request.app[REGISTRY].object_info))


async def object_info_one(request: web.Request) -> web.Response:
    name = request.match_info["node_class"]
    return json_response(await asyncio.to_thread(request.app[REGISTRY].object_info, name))


async def models(request: web.Request) -> web.Response:
    return json_response(list(MODEL_KINDS))


async def models_of(request: web.Request) -> web.Response:
    kind = request.match_info["folder"]
    if kind not in MODEL_KINDS:
        return error_response(404, "not_found", f"Unknown model folder {kind!r}",
                              f"known: {', '.join(MODEL_KINDS)}")
    return json_response(await asyncio.to_thread(request.app[FOLDERS].list_models, kind))


async def experiment_models(request: web.Request) -> web.Response:
    """ComfyUI's model folder list: ``[{"name": kind, "folders": [path, ...]}]``. A folder
    under the base directory is shown relative to it; extra folders (``nodeflow.json``) as
    configured."""
    folders = request.app[FOLDERS]
    return json_response([{"name": kind, "folders": [_shown_path(p, folders.base) for p in folders.model_dirs(kind)]}
                          for kind in MODEL_KINDS])


def _shown_path(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


async def experiment_models_of(request: web.Request) -> web.Response:
    """ComfyUI's file list of a model folder: ``[{"name", "pathIndex", "modified", "size"}]``,
    ``pathIndex`` being the folder's position in ``/experiment/models``' ``folders``."""
    kind = request.match_info["folder"]
    if kind not in MODEL_KINDS:
        return error_response(404, "not_found", f"Unknown model folder {kind!r}", f"known: {', '.join(MODEL_KINDS)}")
    return json_response(await asyncio.to_thread(_model_files, request.app[FOLDERS], kind))


def _model_files(folders: Any, kind: str) -> list[dict[str, Any]]:
    dirs = folders.model_dirs(kind)
    files = []
    for name, index in folders.list_models_by_dir(kind):
        entry: dict[str, Any] = {"name": name, "pathIndex": index}
        try:
            stat = (dirs[index] / name).stat()
            entry.update(modified=stat.st_mtime, size=stat.st_size)
        except OSError:
            pass
        files.append(entry)
    return files


async def embeddings(request: web.Request) -> web.Response:
    names = await asyncio.to_thread(request.app[FOLDERS].list_models, "embeddings")
    return json_response([os.path.splitext(n)[0] for n in names])


async def extensions(request: web.Request) -> web.Response:
    return json_response([])


async def features(request: web.Request) -> web.Response:
    return json_response(server_features(request.app))


# -- /system_stats --------------------------------------------------------------------------------


async def system_stats(request: web.Request) -> web.Response:
    from nodeflow import __version__

    total, free = _ram()
    torch_version, devices = await asyncio.to_thread(_torch_devices, total, free)
    if request.app[CONFIG].backend != "local" and DISPATCHER in request.app:
        devices = _worker_devices(request.app[DISPATCHER], total, free) or devices
    return json_response({
        "system": {"os": os.name, "python_version": sys.version, "embedded_python": False,
                   "comfyui_version": f"nodeflow {__version__}", "pytorch_version": torch_version,
                   "platform": platform.platform(), "argv": list(sys.argv), "ram_total": total, "ram_free": free},
        "devices": devices,
    })


def _worker_devices(dispatcher: Any, ram_total: int, ram_free: int) -> list[dict[str, Any]]:
    """Each remote worker's device, as ComfyUI lists devices, its name saying whose it is."""
    devices = []
    for worker in dispatcher.backend.workers():
        info = worker.info()
        stats = info.device_stats
        if not stats or info.state == "dead":
            continue
        entry = {**stats, "name": f"{stats.get('name', info.device)} (worker {info.id} on {info.host})"}
        if entry.get("type") == "cpu":
            entry.update(vram_total=ram_total, vram_free=ram_free)
        devices.append(entry)
    return devices


def _ram() -> tuple[int, int]:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, KeyError, ValueError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


def _torch_devices(ram_total: int, ram_free: int) -> tuple[str, list[dict[str, Any]]]:
    cpu = {"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free,
           "torch_vram_total": 0, "torch_vram_free": 0}
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return "", [cpu]
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken install: report no torch
        return "", [cpu]
    devices = []
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                reserved, allocated = torch.cuda.memory_reserved(i), torch.cuda.memory_allocated(i)
                devices.append({"name": f"cuda:{i} {torch.cuda.get_device_name(i)}", "type": "cuda", "index": i,
                                "vram_total": total, "vram_free": free, "torch_vram_total": reserved,
                                "torch_vram_free": reserved - allocated})
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devices.append({**cpu, "name": "mps", "type": "mps"})
    except Exception:  # noqa: BLE001 - device queries must not break the route
        devices = []
    return str(torch.__version__), devices or [cpu]


# -- the web frontend's small needs -----------------------------------------------------------------


async def users(request: web.Request) -> web.Response:
    # Single-user mode, as ComfyUI answers it (no "users" key: no login screen).
    return json_response({"storage": "server", "migrated": True})


async def get_settings(request: web.Request) -> web.Response:
    return json_response(await asyncio.to_thread(request.app[QUEUE].settings))


async def post_settings(request: web.Request) -> web.Response:
    try:
        values = await request.json()
    except ValueError:
        values = None
    if not isinstance(values, dict):
        return error_response(400, "invalid_request", "Settings must be a JSON object")
    await asyncio.to_thread(request.app[QUEUE].set_settings, values)
    return json_response({})


async def get_setting(request: web.Request) -> web.Response:
    return json_response(await asyncio.to_thread(request.app[QUEUE].setting, request.match_info["setting_id"]))


async def post_setting(request: web.Request) -> web.Response:
    try:
        value = await request.json()
    except ValueError:
        return error_response(400, "invalid_request", "The setting's value must be JSON")
    await asyncio.to_thread(request.app[QUEUE].set_settings, {request.match_info["setting_id"]: value})
    return json_response({})


async def empty_object(request: web.Request) -> web.Response:
    """Features nodeflow does not have, as an empty answer (global subgraphs, node replacements)."""
    return json_response({})


async def i18n(request: web.Request) -> web.Response:
    return json_response({})


async def openapi_json(request: web.Request) -> web.Response:
    from nodeflow import __version__

    return json_response(openapi(request.app[API_ROUTES], __version__))


_STRINGS = {"type": "array", "items": {"type": "string"}}
_OBJECT = {"type": "object"}

ROUTES = [
    Route("GET", "/object_info", object_info, "Every node type's schema", response=ObjectInfo, tag="info"),
    Route("GET", "/object_info/{node_class}", object_info_one, "One node type's schema ({} if unknown)",
          response=ObjectInfo, tag="info"),
    Route("GET", "/models", models, "Model folder names", response=_STRINGS, tag="info"),
    Route("GET", "/models/{folder}", models_of, "The model files of a folder", response=_STRINGS, tag="info",
          errors=(404,)),
    Route("GET", "/embeddings", embeddings, "Embedding names", response=_STRINGS, tag="info"),
    Route("GET", "/system_stats", system_stats, "Python, torch, RAM and devices", response=SystemStats, tag="info"),
    Route("GET", "/extensions", extensions, "Web extensions (none)", response=_STRINGS, tag="info"),
    Route("GET", "/features", features, "Server feature flags", response=Features, tag="info"),
    Route("GET", "/users", users, "Single-user mode", response=Users, tag="frontend"),
    Route("GET", "/settings", get_settings, "The frontend's settings", response=_OBJECT, tag="frontend"),
    Route("POST", "/settings", post_settings, "Store frontend settings", _OBJECT, _OBJECT, "frontend",
          errors=(503,)),
    Route("GET", "/settings/{setting_id}", get_setting, "One setting (null if unset)", tag="frontend"),
    Route("POST", "/settings/{setting_id}", post_setting, "Store one setting (the body: its JSON value)", {},
          _OBJECT, "frontend", errors=(503,)),
    Route("GET", "/experiment/models", experiment_models, "Model folders and where they are",
          response={"type": "array", "items": {"$ref": "#/components/schemas/ModelFolder"}}, tag="info"),
    Route("GET", "/experiment/models/{folder}", experiment_models_of, "The model files of a folder, with their "
          "folder's index", response={"type": "array", "items": {"$ref": "#/components/schemas/ModelFile"}},
          tag="info", errors=(404,)),
    Route("GET", "/global_subgraphs", empty_object, "Subgraph blueprints (none)", response=_OBJECT, tag="frontend"),
    Route("GET", "/node_replacements", empty_object, "Node replacements (none)", response=_OBJECT, tag="frontend"),
    Route("GET", "/i18n", i18n, "Translations of node packages (none)", response=_OBJECT, tag="frontend"),
    Route("GET", "/openapi.json", openapi_json, "This document", response=_OBJECT, tag="info"),
]
