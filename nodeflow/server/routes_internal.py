"""ComfyUI's ``/internal`` routes, which its frontend reads (the editor's error dialog, its
log panel, its model library):

- ``GET /internal/logs``: the server's recent log as one text (a JSON string);
- ``GET /internal/logs/raw``: ``{"entries": [{"t": ISO time, "m": text}], "size": {"cols", "rows"}}``;
- ``PATCH /internal/logs/subscribe``: ``{"clientId", "enabled"}`` (accepted; the log is not
  streamed over the WebSocket);
- ``GET /internal/folder_paths``: ``{kind: [folder, ...]}`` of the model folders (a folder
  under the base directory relative to it, as ``/experiment/models`` shows them);
- ``GET /internal/files/{type}``: the file names in input/, output/ or temp/, newest first.

``LogBuffer`` keeps the last ``LOG_LINES`` records of the ``logging`` root while the app runs.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import os
import threading
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nodeflow.folders import IO_KINDS, MODEL_KINDS
from nodeflow.server.common import FOLDERS, Route, bad_request, error_response, json_response

LOG_LINES = 2000
#: ComfyUI's log panel size, in characters.
TERMINAL_SIZE = {"cols": 120, "rows": 40}


class LogBuffer(logging.Handler):
    """The last ``capacity`` log records, formatted, as ComfyUI's ``{"t", "m"}`` entries."""

    def __init__(self, capacity: int = LOG_LINES) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._entries: collections.deque[dict[str, str]] = collections.deque(maxlen=capacity)
        self._entries_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is left out
            return
        stamp = datetime.datetime.fromtimestamp(record.created).isoformat()
        with self._entries_lock:
            self._entries.append({"t": stamp, "m": text + "\n"})

    def entries(self) -> list[dict[str, str]]:
        with self._entries_lock:
            return list(self._entries)

    def text(self) -> str:
        return "".join(f"{e['t']} - {e['m']}" for e in self.entries())


LOGS: web.AppKey[LogBuffer] = web.AppKey("logs", LogBuffer)


async def capture_logs(app: web.Application):
    """``cleanup_ctx``: the log buffer is attached to the root logger while the app runs."""
    buffer = app[LOGS]
    root = logging.getLogger()
    root.addHandler(buffer)
    try:
        yield
    finally:
        root.removeHandler(buffer)


class LogSubscription(BaseModel):
    """PATCH /internal/logs/subscribe."""

    model_config = ConfigDict(extra="ignore")

    clientId: str = Field("", max_length=256)
    enabled: bool = False


class RawLogs(BaseModel):
    entries: list[dict[str, str]] = Field(description='[{"t": ISO time, "m": text}, ...], oldest first')
    size: dict[str, int] = Field(description='{"cols", "rows"}')


async def logs(request: web.Request) -> web.Response:
    return json_response(request.app[LOGS].text())


async def raw_logs(request: web.Request) -> web.Response:
    return json_response({"entries": request.app[LOGS].entries(), "size": TERMINAL_SIZE})


async def subscribe_logs(request: web.Request) -> web.Response:
    try:
        LogSubscription.model_validate_json(await request.read())
    except ValidationError as exc:
        return bad_request(exc)
    return web.Response(status=200)


async def folder_paths(request: web.Request) -> web.Response:
    folders = request.app[FOLDERS]
    return json_response({kind: [_shown(p, folders.base) for p in folders.model_dirs(kind)] for kind in MODEL_KINDS})


def _shown(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


async def files(request: web.Request) -> web.Response:
    kind = request.match_info["type"]
    if kind not in IO_KINDS:
        return error_response(400, "invalid_type", f"Unknown type {kind!r}", f"expected one of {', '.join(IO_KINDS)}")
    folder = request.app[FOLDERS].io_dir(kind)
    return json_response(await asyncio.to_thread(_newest_first, folder))


def _newest_first(folder: Path) -> list[str]:
    found: list[tuple[float, str]] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        found.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
                except OSError:
                    continue
    except OSError:
        return []
    return [name for _, name in sorted(found, key=lambda f: (-f[0], f[1]))]


def routes() -> list[Route]:
    string: dict[str, Any] = {"type": "string"}
    return [
        Route("GET", "/internal/logs", logs, "The server's recent log, as one text", response=string, tag="internal"),
        Route("GET", "/internal/logs/raw", raw_logs, "The server's recent log entries", response=RawLogs,
              tag="internal"),
        Route("PATCH", "/internal/logs/subscribe", subscribe_logs, "Ask for the log over the WebSocket "
              "(accepted, not streamed)", LogSubscription, tag="internal", media=()),
        Route("GET", "/internal/folder_paths", folder_paths, "The model folders of each kind",
              response={"type": "object", "additionalProperties": {"type": "array", "items": string}},
              tag="internal"),
        Route("GET", "/internal/files/{type}", files, "File names in input/, output/ or temp/, newest first",
              response={"type": "array", "items": string}, tag="internal", errors=(400,)),
    ]


ROUTES = routes()
