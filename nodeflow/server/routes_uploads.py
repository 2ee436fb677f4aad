"""Uploads: /upload/image and /upload/mask store images in input/, output/ or temp/.

Uploads stream into a spooled temporary file, stopping at ``--max-upload-size`` (413); an
existing name is kept and the new file gets ComfyUI's ``name (1).png`` numbering, unless
``overwrite`` is "true"/"1", or the existing file has the same bytes (then it is reused).
Files are created with O_EXCL (numbering is race-free) or replaced atomically, with the
usual mode (0666 less the umask, 0644 typically) either way.

The upload's file name is client metadata: its last part is kept, and must be a plain file
name (not empty, ``.`` or ``..``, at most 255 bytes). Names that cannot be stored (a folder
of that name, a subfolder that is a file, ...) answer 400, a malformed form too; error bodies
never show server paths.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from nodeflow.folders import IO_KINDS, Folders, InvalidFileName, check_file_name
from nodeflow.server.common import CONFIG, FOLDERS, Route, describe_error, error_response, json_response
from nodeflow.server.routes_files import (
    FILE_MODE,
    TooManyPixels,
    check_pixels,
    error_roots,
    error_text,
    resolve_file,
    split_annotation,
)
from nodeflow.server.schemas import MaskUploadForm, UploadForm, UploadResponse

log = logging.getLogger(__name__)

_FIELD_LIMIT = 64 * 1024
_SPOOL_MEMORY = 8 * 1024 * 1024


async def upload_image(request: web.Request) -> web.Response:
    return await _upload(request, mask=False)


async def upload_mask(request: web.Request) -> web.Response:
    return await _upload(request, mask=True)


async def _upload(request: web.Request, mask: bool) -> web.Response:
    limit = request.app[CONFIG].max_upload_bytes
    if request.content_length is not None and request.content_length > limit + _FIELD_LIMIT:
        return _too_large(limit)
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        return error_response(400, "invalid_request", "Expected a multipart/form-data body")
    fields: dict[str, str] = {}
    upload: IO[bytes] | None = None
    filename = ""
    try:
        try:
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "image" and upload is None:
                    filename = part.filename or ""
                    upload = tempfile.SpooledTemporaryFile(_SPOOL_MEMORY)  # noqa: SIM115 - closed below
                    if not await _copy_part(part, upload, limit):
                        return _too_large(limit)
                elif part.name in ("overwrite", "subfolder", "type", "original_ref"):
                    buffer = io.BytesIO()
                    if not await _copy_part(part, buffer, _FIELD_LIMIT):
                        return error_response(400, "invalid_request", f"Form field {part.name!r} is too long")
                    fields[part.name] = buffer.getvalue().decode("utf-8", "replace")
                else:
                    await part.release()
        except (BadHttpMessage, ValueError, AssertionError, KeyError, UnicodeError) as exc:
            # A part whose headers are not HTTP headers (a NUL in a file name...), a missing
            # boundary, a body cut short: the client's malformed form, never the server's failure.
            return error_response(400, "invalid_request", "Malformed multipart/form-data body",
                                  _first_line(exc))
        if upload is None or not filename:
            return error_response(400, "invalid_request", "No file in the form field 'image'")
        config = _upload_fields(fields, filename, mask)
        config["max_pixels"] = request.app[CONFIG].max_pixels
        upload.seek(0)
        try:
            name = await asyncio.to_thread(_store, request.app[FOLDERS], upload, **config)
        except OSError as exc:
            return _store_error(exc, config, request.app[FOLDERS])
    finally:
        if upload is not None:
            upload.close()
    return json_response({"name": name, "subfolder": config["subfolder"], "type": config["kind"]})


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def _store_error(exc: OSError, config: dict[str, Any], folders: Folders) -> web.Response:
    """An upload the file system refused: the client's mistake (400) where it is one, in
    words that name the upload, never a server path."""
    where = f"{config['kind']}/{config['subfolder'].strip('/') + '/' if config['subfolder'] else ''}"
    name = config["name"]
    if exc.errno == errno.EISDIR:
        return error_response(400, "invalid_filename", f"{where}{name} is a folder",
                              "choose another file name (or leave overwrite off to get a numbered name)")
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return error_response(400, "invalid_subfolder", f"The subfolder {config['subfolder']!r} is not a folder",
                              "a file of that name is in the way; choose another subfolder")
    if exc.errno == errno.ENAMETOOLONG:
        return error_response(400, "invalid_filename", "The file name or subfolder is too long")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return error_response(507, "insufficient_storage", "No space left to store the upload")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return error_response(403, "forbidden_path", f"The server may not write to {where}")
    log.error("cannot store upload %s%s: %s", where, name, exc)
    return error_response(500, "server_error", "Cannot store the upload", describe_error(exc, error_roots(folders)))


def _too_large(limit: int) -> web.Response:
    return error_response(413, "too_large", f"The upload exceeds the limit of {limit:,} bytes",
                          "the server's --max-upload-size sets it")


async def _copy_part(part: BodyPartReader, sink: IO[bytes], limit: int) -> bool:
    size = 0
    while chunk := await part.read_chunk(256 * 1024):
        size += len(chunk)
        if size > limit:
            return False
        sink.write(chunk)
    return True


def _upload_fields(fields: dict[str, str], filename: str, mask: bool) -> dict[str, Any]:
    kind = fields.get("type") or "input"
    if kind not in IO_KINDS:
        raise web.HTTPBadRequest(text=error_text("invalid_type", f"Unknown type {kind!r}"),
                                 content_type="application/json")
    # The file name is client metadata: keep its last part only, a plain file name.
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    try:
        check_file_name(name)
    except InvalidFileName as exc:
        raise web.HTTPBadRequest(text=error_text("invalid_filename", f"Invalid file name: {exc}"),
                                 content_type="application/json") from None
    config: dict[str, Any] = {"kind": kind, "subfolder": fields.get("subfolder", ""), "name": name,
                              "overwrite": fields.get("overwrite", "").lower() in ("true", "1"), "original": None}
    if mask:
        try:
            ref = json.loads(fields.get("original_ref", ""))
            if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str) or not ref["filename"]:
                raise ValueError("no filename")
        except ValueError:
            raise web.HTTPBadRequest(text=error_text("invalid_request", "original_ref must be JSON "
                                               '{"filename", "subfolder", "type"}'),
                                     content_type="application/json") from None
        config["original"] = ref
    return config


def _store(folders: Folders, upload: IO[bytes], *, kind: str, subfolder: str, name: str, overwrite: bool,
           original: dict | None, max_pixels: int = 0) -> str:
    """Write the upload (for a mask: the original with the mask as its alpha); returns the name used."""
    target = resolve_file(folders, kind, name, subfolder)
    if original is not None:
        upload = _apply_mask(folders, original, upload, max_pixels)
    target.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        fd, tmp = _create_temporary(target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(upload, out)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target.name
    stem, suffix = os.path.splitext(target.name)
    path, n = target, 1
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
        except FileExistsError:
            if _same_content(path, upload):
                return path.name  # the same file uploaded again: reuse it
            path = target.with_name(f"{stem} ({n}){suffix}")
            n += 1
            continue
        try:
            with os.fdopen(fd, "wb") as out:
                upload.seek(0)
                shutil.copyfileobj(upload, out)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path.name


def _create_temporary(folder: Path) -> tuple[int, Path]:
    """A new hidden file in ``folder`` to be renamed over the target, with the mode a new
    file gets (``mkstemp`` would make it 0600)."""
    while True:
        path = folder / f".upload-{secrets.token_hex(8)}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE), path
        except FileExistsError:
            continue


def _same_content(path: Path, upload: IO[bytes]) -> bool:
    try:
        if not path.is_file():
            return False
        upload.seek(0, os.SEEK_END)
        if path.stat().st_size != upload.tell():
            return False
        upload.seek(0)
        with open(path, "rb") as f:
            return _digest(f) == _digest(upload)
    finally:
        upload.seek(0)


def _digest(f: IO[bytes]) -> bytes:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.digest()


def _apply_mask(folders: Folders, ref: dict, upload: IO[bytes], max_pixels: int = 0) -> IO[bytes]:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    name, annotated = split_annotation(ref["filename"])
    kind = annotated or ref.get("type") or "output"
    original = resolve_file(folders, kind, name, ref.get("subfolder") or "")
    if not original.is_file():
        raise web.HTTPNotFound(text=error_text("not_found", f"No original image {ref['filename']!r} in {kind}"),
                               content_type="application/json")
    try:
        with Image.open(original) as img:
            check_pixels(img, max_pixels)
            info = PngInfo()
            for key, value in getattr(img, "text", {}).items():
                info.add_text(key, value)
            rgba = img.convert("RGBA")
        with Image.open(upload) as mask_img:
            check_pixels(mask_img, max_pixels)
            alpha = mask_img.convert("RGBA").getchannel("A")
    except web.HTTPException:
        raise
    except TooManyPixels as exc:
        raise web.HTTPBadRequest(text=error_text("too_large", f"Cannot apply the mask: {exc} (--max-pixels)"),
                                 content_type="application/json") from None
    except Exception as exc:  # noqa: BLE001 - unreadable images are the client's error
        raise web.HTTPBadRequest(text=error_text("not_an_image", "Cannot read the image or mask: "
                                           + describe_error(exc, error_roots(folders))),
                                 content_type="application/json") from None
    if alpha.size != rgba.size:
        alpha = alpha.resize(rgba.size)
    rgba.putalpha(alpha)
    out = io.BytesIO()
    rgba.save(out, format="PNG", compress_level=4, pnginfo=info)
    out.seek(0)
    return out


ROUTES = [
    Route("POST", "/upload/image", upload_image, "Upload an image", UploadForm, UploadResponse, "files",
          multipart=True, errors=(507,)),
    Route("POST", "/upload/mask", upload_mask, "Upload a mask into an image's alpha channel", MaskUploadForm,
          UploadResponse, "files", multipart=True, errors=(404, 507)),
]
