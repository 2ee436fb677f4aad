"""User data: the files the web frontend saves on the server (workflows, templates, ...).

ComfyUI's routes, for its single user ``default``; the files live in ``BASE/user/default/``:

- ``GET /userdata?dir=workflows[&recurse=true][&full_info=true][&split=true]``: the files
  under that folder, relative to it (``[]`` when it does not exist yet);
- ``GET /userdata/{file}``, ``DELETE /userdata/{file}`` (204);
- ``POST /userdata/{file}[?overwrite=false][&full_info=true]``: the body becomes the file
  (409 when it exists and ``overwrite`` is false); answers its path, or with ``full_info``
  ``{"path", "size", "modified"}``;
- ``POST /userdata/{file}/move/{dest}`` with the same parameters.

``{file}`` is a path relative to the user folder, usually URL-encoded (``workflows%2Fa.json``).
Names are confined like every other file name (no ``..``, no absolute paths, no symlink
out: 403) and must name a file (400). Files are written atomically, off the event loop;
they are served as downloads unless they are of a harmless type, like /view's files.
"""

from __future__ import annotations

import asyncio
import errno
import mimetypes
import os
import secrets
from pathlib import Path
from typing import Any

from aiohttp import web

from nodeflow.folders import InvalidFileName, UnsafePath, check_file_name, confined_path, safe_relative
from nodeflow.server.common import BOOLEAN_FLAG, FOLDERS, Param, Route, error_response, json_response
from nodeflow.server.routes_files import FILE_MODE, SAFE_TYPES

USER = "default"


def user_root(app: web.Application) -> Path:
    """The folder of the (single) user's files."""
    return app[FOLDERS].base / "user" / USER


def _path(request: web.Request, name: str) -> Path:
    try:
        return confined_path(user_root(request.app), name, what="the user folder")
    except InvalidFileName as exc:
        raise _json_error(web.HTTPBadRequest, "invalid_filename", str(exc)) from None
    except UnsafePath as exc:
        raise _json_error(web.HTTPForbidden, "forbidden_path", str(exc)) from None


def _json_error(cls: type[web.HTTPException], type_: str, message: str) -> web.HTTPException:
    response = error_response(cls.status_code, type_, message)
    return cls(text=response.text, content_type="application/json")


def _flag(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    return default if value is None else value.lower() in ("true", "1", "yes")


def _relative(request: web.Request, path: Path) -> str:
    return path.relative_to(user_root(request.app).resolve()).as_posix()


def file_info(path: Path, relative_to: Path) -> dict[str, Any]:
    """ComfyUI's ``{"path", "size", "modified"}`` of a user file (``modified`` in seconds)."""
    stat = path.stat()
    return {"path": path.relative_to(relative_to).as_posix(), "size": stat.st_size, "modified": stat.st_mtime}


# -- routes ---------------------------------------------------------------------------------------


async def list_userdata(request: web.Request) -> web.Response:
    folder = request.query.get("dir", "")
    if not folder:
        return error_response(400, "invalid_request", "The dir parameter is required", "e.g. ?dir=workflows")
    root = user_root(request.app)
    try:
        rel = safe_relative(folder)
        for part in rel.parts:
            check_file_name(part)  # each a plain name the file system can hold
    except InvalidFileName as exc:
        return error_response(400, "invalid_filename", str(exc))
    except UnsafePath as exc:
        return error_response(403, "forbidden_path", str(exc))
    recurse, full_info, split = (_flag(request, k, False) for k in ("recurse", "full_info", "split"))
    try:
        found = await asyncio.to_thread(_list, root, rel, recurse)
    except OSError as exc:  # e.g. a folder name longer than the file system allows: 400
        return _os_error(exc)
    if found is None:
        return error_response(403, "forbidden_path", f"{folder!r} leaves the user folder")
    base = (root / rel).resolve()
    if full_info:
        return json_response(await asyncio.to_thread(lambda: [file_info(p, base) for p in found if p.is_file()]))
    names = [p.relative_to(base).as_posix() for p in found]
    return json_response([[n, *n.split("/")] for n in names] if split else names)


def _list(root: Path, rel: Path, recurse: bool) -> list[Path] | None:
    """The files under ``root/rel`` (sorted; symlinks not followed), None if it leaves root."""
    real_root = root.resolve()
    folder = (root / rel).resolve()
    if folder != real_root and real_root not in folder.parents:
        return None
    if not folder.is_dir():
        return []
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found += [Path(dirpath, f) for f in sorted(filenames) if not os.path.islink(os.path.join(dirpath, f))]
        if not recurse:
            break
    return found


async def get_userdata(request: web.Request) -> web.StreamResponse:
    path = _path(request, request.match_info["file"])
    if not path.is_file():
        return error_response(404, "not_found", "No such user data file")
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
               "Content-Type": content_type if content_type in SAFE_TYPES else "application/octet-stream"}
    return web.FileResponse(path, headers=headers)


async def post_userdata(request: web.Request) -> web.Response:
    path = _path(request, request.match_info["file"])
    body = await request.read()
    overwrite, full_info = _flag(request, "overwrite", True), _flag(request, "full_info", False)
    try:
        written = await asyncio.to_thread(_write, path, body, overwrite)
    except OSError as exc:
        return _os_error(exc)
    if not written:
        return error_response(409, "conflict", "The file exists", "send ?overwrite=true to replace it")
    return await _answer(request, path, full_info)


def _write(path: Path, body: bytes, overwrite: bool) -> bool:
    """Write ``body`` to ``path`` atomically; False if it exists and ``overwrite`` is off."""
    _prepare(path)
    tmp = path.with_name(f".{path.name[:200]}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(body)
        return _place(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def _prepare(dest: Path) -> None:
    """Refuse a folder's name; make the folders leading to ``dest``."""
    if dest.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    dest.parent.mkdir(parents=True, exist_ok=True)


def _place(source: Path, dest: Path, overwrite: bool) -> bool:
    """Give ``source``'s file the name ``dest`` (``source`` keeps its name too unless
    replacing); False if ``dest`` exists and ``overwrite`` is off."""
    if overwrite:
        os.replace(source, dest)
        return True
    try:
        os.link(source, dest)  # fails if the name exists, even when created meanwhile
    except FileExistsError:
        return False
    return True


async def delete_userdata(request: web.Request) -> web.Response:
    path = _path(request, request.match_info["file"])
    if path.is_dir():
        return error_response(400, "invalid_filename", "That name is a folder, not a file")
    try:
        await asyncio.to_thread(path.unlink)
    except FileNotFoundError:
        return error_response(404, "not_found", "No such user data file")
    except OSError as exc:
        return _os_error(exc)
    return web.Response(status=204)


async def move_userdata(request: web.Request) -> web.Response:
    source = _path(request, request.match_info["file"])
    dest = _path(request, request.match_info["dest"])
    overwrite, full_info = _flag(request, "overwrite", True), _flag(request, "full_info", False)
    if not source.is_file():
        return error_response(404, "not_found", "No such user data file")
    try:
        moved = await asyncio.to_thread(_move, source, dest, overwrite)
    except OSError as exc:
        return _os_error(exc)
    if not moved:
        return error_response(409, "conflict", "The destination exists", "send ?overwrite=true to replace it")
    return await _answer(request, dest, full_info)


def _move(source: Path, dest: Path, overwrite: bool) -> bool:
    _prepare(dest)
    if not _place(source, dest, overwrite):
        return False
    source.unlink(missing_ok=True)
    return True


async def _answer(request: web.Request, path: Path, full_info: bool) -> web.Response:
    if full_info:
        root = user_root(request.app).resolve()
        return json_response(await asyncio.to_thread(file_info, path, root))
    return json_response(_relative(request, path))


def _os_error(exc: OSError) -> web.Response:
    """A file-system refusal as a client error where it is one, without server paths."""
    if exc.errno == errno.EISDIR:
        return error_response(400, "invalid_filename", "That name is a folder, not a file")
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return error_response(400, "invalid_filename", "A file is in the way of that folder")
    if exc.errno == errno.ENAMETOOLONG:
        return error_response(400, "invalid_filename", "The name is too long")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return error_response(507, "insufficient_storage", "No space left")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return error_response(403, "forbidden_path", "The server may not write there")
    return error_response(500, "server_error", "Cannot store the user data file", exc.strerror or type(exc).__name__)


#: A path parameter of any characters (a file name may hold a newline).
_ANY = r"[\s\S]+"
_SAVED = {"anyOf": [{"type": "string", "description": "the file's path in the user folder"},
                   {"$ref": "#/components/schemas/FileInfo"}]}
_LISTED = {"type": "array", "items": {"anyOf": [{"type": "string"}, {"$ref": "#/components/schemas/FileInfo"},
                                                {"type": "array", "items": {"type": "string"}}]}}
_FLAGS = (Param("overwrite", "false: 409 if the destination exists", BOOLEAN_FLAG),
          Param("full_info", "true: answer {path, size, modified}", BOOLEAN_FLAG))

ROUTES = [
    Route("GET", "/userdata", list_userdata, "The user's files in a folder", tag="frontend", response=_LISTED,
          query=(Param("dir", "the folder, e.g. workflows", required=True),
                 Param("recurse", "true: subfolders too", BOOLEAN_FLAG),
                 Param("full_info", "true: {path, size, modified} each", BOOLEAN_FLAG),
                 Param("split", "true: [path, *parts] each", BOOLEAN_FLAG)), errors=(400,)),
    # Before the plain {file} routes, which would match it too.
    Route("POST", f"/userdata/{{file:{_ANY}}}/move/{{dest:{_ANY}}}", move_userdata, "Rename a user file",
          tag="frontend", response=_SAVED, query=_FLAGS, errors=(400, 404, 409, 507)),
    Route("GET", f"/userdata/{{file:{_ANY}}}", get_userdata, "A user file", tag="frontend", media=("*/*",),
          errors=(400, 404)),
    Route("POST", f"/userdata/{{file:{_ANY}}}", post_userdata, "Store a user file (the body)", tag="frontend",
          body={"type": "string", "format": "binary"}, body_media="*/*", body_required=False, response=_SAVED,
          query=_FLAGS, errors=(409, 507)),
    Route("DELETE", f"/userdata/{{file:{_ANY}}}", delete_userdata, "Delete a user file", tag="frontend", status=204,
          media=(), errors=(400, 404, 507)),
]
