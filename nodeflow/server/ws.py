"""The WebSocket (``/ws?clientId=...``) and the hub that routes events to its clients.

Messages are ComfyUI's: text frames ``{"type": event, "data": {...}}``. ``status`` (the
queue length) goes to everyone, on connect and whenever the queue changes; messages about
a prompt go to the client that submitted it (``client_id``), or to everyone when it gave
none. Live previews, when enabled, are binary frames: a big-endian uint32 event type
(1 = preview image), a uint32 format (1 JPEG, 2 PNG), then the image.

Events come from the worker thread. ``ThreadEmitter`` serialises them there (and encodes
previews there), then hands the bytes to the event loop; each connection has its own
bounded outbox and writer task, so one slow client never holds up the others.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import threading
import uuid
from typing import Any

from aiohttp import WSMsgType, web

from nodeflow import events
from nodeflow.server.common import CONFIG, DISPATCHER, HUB, Route, dumps

log = logging.getLogger(__name__)

PREVIEW_IMAGE = 1  # binary event type
FORMAT_JPEG, FORMAT_PNG = 1, 2
#: Messages waiting for one client before it is considered gone and disconnected.
OUTBOX_LIMIT = 10_000


class Connection:
    """One open WebSocket and the task that writes its outbox in order."""

    def __init__(self, sid: str, ws: web.WebSocketResponse) -> None:
        self.sid, self.ws = sid, ws
        self.outbox: asyncio.Queue[str | bytes | None] = asyncio.Queue(OUTBOX_LIMIT)
        self.writer: asyncio.Task | None = None
        self.dropped = False

    def start(self) -> None:
        """Start writing (after the handshake); messages posted before wait in the outbox."""
        self.writer = asyncio.get_running_loop().create_task(self._write())

    def post(self, message: str | bytes) -> None:
        if self.dropped:
            return
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped = True
            log.warning("client %s does not keep up with its messages; disconnecting it", self.sid)
            if self.writer is not None:
                self.writer.cancel()
            asyncio.get_running_loop().create_task(self.ws.close(code=1008, message=b"too slow"))

    async def _write(self) -> None:
        try:
            while (message := await self.outbox.get()) is not None:
                if isinstance(message, str):
                    await self.ws.send_str(message)
                else:
                    await self.ws.send_bytes(message)
        except (ConnectionError, RuntimeError) as exc:  # closed underneath us
            log.debug("websocket %s: %s", self.sid, exc)

    async def close(self) -> None:
        if self.writer is None:
            return
        if not self.writer.done():
            if self.outbox.full():
                self.writer.cancel()
            else:
                self.outbox.put_nowait(None)
        try:
            await asyncio.wait_for(self.writer, 5)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass


class Hub:
    """Client connections by client id; lives on the event loop."""

    def __init__(self, queue_remaining) -> None:
        self._remaining = queue_remaining
        self.clients: dict[str, set[Connection]] = {}
        self._status_due = False
        self._status_value = 0

    def connect(self, sid: str, ws: web.WebSocketResponse) -> Connection:
        conn = Connection(sid, ws)
        self.clients.setdefault(sid, set()).add(conn)
        return conn

    def disconnect(self, conn: Connection) -> None:
        group = self.clients.get(conn.sid)
        if group is not None:
            group.discard(conn)
            if not group:
                del self.clients[conn.sid]

    def send(self, message: str | bytes, client_id: str | None = None) -> None:
        """To ``client_id``'s connections, or to everyone when ``client_id`` is None."""
        if client_id is None:
            for group in self.clients.values():
                for conn in group:
                    conn.post(message)
        else:
            for conn in self.clients.get(client_id, ()):
                conn.post(message)

    def status_message(self, sid: str | None = None, remaining: int | None = None) -> str:
        remaining = self._remaining() if remaining is None else remaining
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": remaining}}}
        if sid is not None:
            data["sid"] = sid
        return dumps({"type": "status", "data": data})

    def queue_changed(self) -> None:
        """Broadcast ``status`` soon, with the queue length as of now; changes within one
        loop iteration share one message."""
        self._status_value = self._remaining()
        if not self._status_due:
            self._status_due = True
            asyncio.get_running_loop().call_soon(self._send_status)

    def _send_status(self) -> None:
        self._status_due = False
        if self.clients:
            self.send(self.status_message(remaining=self._status_value))

    def send_status(self) -> None:
        """Broadcast ``status`` now (in order with the messages sent around it)."""
        if self.clients:
            self.send(self.status_message())

    async def close_all(self) -> None:
        for group in list(self.clients.values()):
            for conn in list(group):
                await conn.ws.close(code=1001, message=b"server shutdown")
                await conn.close()
        self.clients.clear()


class ThreadEmitter:
    """The dispatcher's ``emit``: called in the worker thread, delivers on the event loop.

    Messages are serialised here, off the loop, and handed over in batches: one loop wake-up
    carries every message queued since the last one, in order."""

    def __init__(self, hub: Hub, loop: asyncio.AbstractEventLoop, previews: bool, preview_size: int = 512) -> None:
        self.hub, self.loop, self.previews, self.preview_size = hub, loop, previews, preview_size
        self._lock = threading.Lock()
        self._batch: list[tuple[str | bytes | None, str | None]] = []

    def __call__(self, event: str, data: dict, client_id: str | None) -> None:
        clients = self.hub.clients
        if not clients or (client_id is not None and client_id not in clients):
            return  # nobody to tell (read without a lock: a dict lookup is atomic)
        if event == "preview":
            if not self.previews:
                return
            frame = encode_preview(data.get("image"), self.preview_size)
            if frame is None:
                return
            message: str | bytes = frame
        else:
            message = dumps({"type": event, "data": data})
        self._post(message, client_id)

    def listening(self, client_id: str | None) -> bool:
        """Whether a message for ``client_id`` (None: everyone) would reach anyone."""
        clients = self.hub.clients
        return bool(clients) and (client_id is None or client_id in clients)

    def queue_changed(self) -> None:
        self._post(None, None)

    def _post(self, message: str | bytes | None, client_id: str | None) -> None:
        with self._lock:
            self._batch.append((message, client_id))
            if len(self._batch) > 1:
                return  # a flush is already on its way
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, []
        previous: str | bytes | None = b""
        for message, client_id in batch:
            if message is None:
                if previous is not None:  # one status for changes in a row
                    self.hub.send_status()
            else:
                self.hub.send(message, client_id)
            previous = message


def encode_preview(image: Any, max_size: int = 512, fmt: str = "JPEG") -> bytes | None:
    """A binary preview frame from a PIL image or an HWC float array/tensor (values 0..1)."""
    try:
        from PIL import Image

        if not isinstance(image, Image.Image):
            import numpy as np

            if hasattr(image, "detach"):
                image = image.detach().float().cpu().numpy()
            array = np.asarray(image, dtype=np.float32)
            if array.ndim == 4:
                array = array[0]
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            image = Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
        image = image.copy()
        image.thumbnail((max_size, max_size))
        buffer = io.BytesIO()
        if fmt == "PNG":
            image.save(buffer, format="PNG")
            kind = FORMAT_PNG
        else:
            image.convert("RGB").save(buffer, format="JPEG", quality=90)
            kind = FORMAT_JPEG
        return struct.pack(">II", PREVIEW_IMAGE, kind) + buffer.getvalue()
    except Exception:
        log.exception("could not encode a preview")
        return None


async def websocket(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    hub, dispatcher = app[HUB], app[DISPATCHER]
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=1 << 20)
    sid = request.query.get("clientId") or uuid.uuid4().hex
    # Known to the hub before the handshake completes: a client may submit the moment it
    # is connected, and must not miss the first events of that prompt.
    conn = hub.connect(sid, ws)
    try:
        conn.post(hub.status_message(sid))  # the first message
        for item, _, node in dispatcher.running():
            if item.client_id == sid and node is not None:
                # A client that reconnects mid-run learns where its prompt is.
                conn.post(dumps({"type": "executing", "data": events.executing(item.prompt_id, node)}))
        await ws.prepare(request)
        conn.start()
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                _client_message(conn, msg.data, app)
            elif msg.type == WSMsgType.ERROR:
                log.warning("websocket %s closed with %s", sid, ws.exception())
    finally:
        hub.disconnect(conn)
        await conn.close()
    return ws


def _client_message(conn: Connection, text: str, app: web.Application) -> None:
    """ComfyUI's frontend announces its feature flags; we answer with ours."""
    try:
        message = json.loads(text)
    except ValueError:
        return
    if isinstance(message, dict) and message.get("type") == "feature_flags":
        conn.post(dumps({"type": "feature_flags", "data": server_features(app)}))


def server_features(app: web.Application) -> dict[str, Any]:
    config = app[CONFIG]
    return {"supports_preview_metadata": False, "max_upload_size": config.max_upload_bytes}


ROUTES = [
    Route("GET", "/ws", websocket, "WebSocket of ComfyUI's events (?clientId=...); 400 for a request that is not a "
          "WebSocket handshake", tag="events", query=(("clientId", "the client id given with POST /prompt"),),
          status=101, media=(), errors=(400,)),
]
