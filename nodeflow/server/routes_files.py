"""Files: /view serves images from input/, output/ and temp/ (``routes_uploads`` stores
them). Every name goes through ``Folders.io_path``, which refuses ``..``, absolute paths and
symlinks that lead out of the folder. A file of a type that could run script in the server's
origin goes out as a download; a re-encoded preview is refused (400) when the image's header
says it holds more than ``--max-pixels``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import mimetypes
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from nodeflow.folders import IO_KINDS, Folders, InvalidFileName, UnsafePath
from nodeflow.server.common import CONFIG, FOLDERS, Param, Route, describe_error, error_response

log = logging.getLogger(__name__)

#: Served with their own type; anything else (html, svg, js, ...) as a download, so an
#: uploaded file can never run script in the server's origin.
SAFE_TYPES = frozenset({
    "image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff", "image/avif",
    "video/mp4", "video/webm", "video/quicktime", "audio/mpeg", "audio/wav", "audio/x-wav", "audio/flac",
    "audio/ogg", "application/json", "text/plain",
})
_FIELD_LIMIT = 64 * 1024
_SPOOL_MEMORY = 8 * 1024 * 1024
#: Mode of new files, less the umask (what open() gives).
FILE_MODE = 0o666


def split_annotation(name: str) -> tuple[str, str | None]:
    """ComfyUI's annotated names: ``"photo.png [output]"`` -> ("photo.png", "output")."""
    for kind in IO_KINDS:
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


def resolve_file(folders: Folders, kind: str, name: str, subfolder: str) -> Path:
    """``io_path`` with ComfyUI's status codes: unknown type or not a file name 400,
    escaping name 403."""
    if kind not in IO_KINDS:
        raise web.HTTPBadRequest(text=error_text("invalid_type", f"Unknown type {kind!r}; expected one of "
                                           f"{', '.join(IO_KINDS)}"), content_type="application/json")
    try:
        return folders.io_path(kind, name, subfolder)
    except InvalidFileName as exc:
        raise web.HTTPBadRequest(text=error_text("invalid_filename", str(exc)),
                                 content_type="application/json") from None
    except UnsafePath as exc:
        raise web.HTTPForbidden(text=error_text("forbidden_path", str(exc)), content_type="application/json") from None


def error_text(type_: str, message: str) -> str:
    return json.dumps({"error": {"type": type_, "message": message, "details": message, "extra_info": {}}})


def error_roots(folders: Folders) -> list[Path]:
    """The folders whose paths error texts show relative to them."""
    return [folders.base, folders.input, folders.output, folders.temp]


# -- /view ------------------------------------------------------------------------------------------


async def view(request: web.Request) -> web.StreamResponse:
    query = request.query
    filename = query.get("filename", "")
    if not filename:
        return error_response(400, "missing_filename", "The filename parameter is required")
    name, annotated = split_annotation(filename)
    kind = annotated or query.get("type") or "output"
    path = resolve_file(request.app[FOLDERS], kind, name, query.get("subfolder", ""))
    if not path.is_file():
        return error_response(404, "not_found", f"No file {filename!r} in {kind}")
    headers = {"Content-Disposition": _disposition(path.name), "X-Content-Type-Options": "nosniff",
               "Cache-Control": "no-cache"}
    preview, channel = query.get("preview"), query.get("channel", "rgba")
    if preview or channel in ("rgb", "a"):
        try:
            body, content_type = await asyncio.to_thread(_transform, path, preview, channel,
                                                         request.app[CONFIG].max_pixels)
        except TooManyPixels as exc:
            return error_response(400, "too_large", f"Cannot convert {filename!r}: {exc}",
                                  "the server's --max-pixels sets the limit")
        except Exception as exc:  # noqa: BLE001 - not an image PIL can read
            return error_response(400, "not_an_image", f"Cannot convert {filename!r}",
                                  describe_error(exc, error_roots(request.app[FOLDERS])))
        return web.Response(body=body, content_type=content_type, headers=headers)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if content_type not in SAFE_TYPES:
        content_type = "application/octet-stream"
        headers["Content-Disposition"] = "attachment; " + _disposition(path.name)
    headers["Content-Type"] = content_type
    return web.FileResponse(path, headers=headers)


def _disposition(name: str) -> str:
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    text = f'filename="{ascii_name}"'
    if ascii_name != name:
        text += f"; filename*=UTF-8''{quote(name)}"
    return text


class TooManyPixels(ValueError):
    """An image whose header says it decodes to more than the server's ``--max-pixels``."""


def check_pixels(img: Any, max_pixels: int) -> None:
    """Refuse to decode an image (opened, not yet decoded) bigger than ``max_pixels`` (0: any)."""
    width, height = img.size
    if max_pixels and width * height > max_pixels:
        raise TooManyPixels(f"the image is {width} × {height} = {width * height:,} pixels, over the limit of "
                            f"{max_pixels:,}")


def _transform(path: Path, preview: str | None, channel: str, max_pixels: int = 0) -> tuple[bytes, str]:
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(path) as img:
        check_pixels(img, max_pixels)
        if preview:
            # ComfyUI's "format;quality", e.g. "webp;90" or "jpeg;75".
            parts = preview.split(";")
            fmt = parts[0].lower() if parts[0].lower() in ("webp", "jpeg", "jpg") else "webp"
            fmt = "jpeg" if fmt == "jpg" else fmt
            quality = int(parts[-1]) if parts[-1].isdigit() else 90
            out = img.convert("RGB") if fmt == "jpeg" and img.mode != "RGB" else img
            out.save(buffer, format=fmt, quality=max(1, min(quality, 100)))
            return buffer.getvalue(), f"image/{fmt}"
        if channel == "rgb":
            img.convert("RGB").save(buffer, format="PNG")
        else:  # "a": the alpha channel alone, as an RGBA image (opaque when there is none)
            alpha = img.getchannel("A") if img.mode == "RGBA" else \
                img.convert("RGBA").getchannel("A") if "transparency" in img.info else Image.new("L", img.size, 255)
            out = Image.new("RGBA", img.size)
            out.putalpha(alpha)
            out.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"


ROUTES = [
    Route("GET", "/view", view, "An image from output/, input/ or temp/", tag="files",
          query=(Param("filename", "the file name (may end in ' [output]' etc.)", required=True),
                 Param("subfolder"), Param("type", "output (default), input or temp"),
                 Param("preview", "webp;90 or jpeg;90: re-encode"), Param("channel", "rgba (default), rgb or a")),
          media=("*/*",), errors=(400, 404)),
]
