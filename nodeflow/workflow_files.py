"""Reading workflow files: API-format JSON (plain or wrapped as ``{"prompt": ...}``), and
PNG images that carry their workflow in a ``prompt`` text chunk (as SaveImage writes, ours
or ComfyUI's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nodeflow.graph import WorkflowError, is_ui_format, load_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_workflow_file(path: Path, registry: Any = None) -> dict[str, Any]:
    """The API-format workflow in a file; UI-format workflows are converted with
    ``registry``'s schemas (the default registry's when it is None)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise WorkflowError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise WorkflowError(f"{path} is a folder, not a workflow file") from None
    except OSError as exc:
        raise WorkflowError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw.startswith(PNG_MAGIC):
        return _from_png(path, registry)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise WorkflowError(f"{path} is neither a JSON workflow nor a PNG with an embedded workflow") from None
    data = load_json(text)
    return _api_format(data, path, registry)


def _from_png(path: Path, registry: Any = None) -> dict[str, Any]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            chunks = dict(getattr(im, "text", {}) or im.info)
    except Exception as exc:  # noqa: BLE001 - a broken image is a user error here
        raise WorkflowError(f"cannot read {path} as an image: {exc}") from None
    for key in ("prompt", "workflow"):
        if isinstance(chunks.get(key), str):
            try:
                return _api_format(load_json(chunks[key]), path, registry)
            except WorkflowError:
                if key == "workflow":
                    raise
    raise WorkflowError(f"{path} carries no workflow (no 'prompt' or 'workflow' text chunk)")


def _api_format(data: Any, path: Path, registry: Any = None) -> dict[str, Any]:
    if is_ui_format(data):
        try:
            from nodeflow.uiformat import ui_to_api
        except ImportError:
            raise WorkflowError(f"{path} is a UI-format workflow, which this version cannot convert yet") from None
        return ui_to_api(data, registry)
    if not isinstance(data, dict):
        raise WorkflowError(f"{path} holds JSON {type(data).__name__}, not a workflow object")
    return data


def editor_workflow(path: Path) -> dict[str, Any] | None:
    """The editor (UI-format) workflow a file carries, if any: the file itself when it is
    UI-format JSON, or a PNG's ``workflow`` chunk. Saved images embed it again, so they
    reopen in the editor with their layout."""
    try:
        raw = path.read_bytes()
        if raw.startswith(PNG_MAGIC):
            from PIL import Image

            with Image.open(path) as im:
                text = dict(getattr(im, "text", {}) or im.info).get("workflow")
            data = load_json(text) if isinstance(text, str) else None
        else:
            data = load_json(raw.decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, WorkflowError, ValueError):
        return None
    return data if is_ui_format(data) else None

