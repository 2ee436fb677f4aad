"""nodeflow's example workflows as the graph editor's templates.

The editor (ComfyUI's frontend) lists templates from an index, one module of them, and opens
each as a UI-format document; this module makes both from the API-format workflows shipped in
``nodeflow/workflows/`` (laid out by ``nodeflow.uiexport``), with a thumbnail each: a picture
the workflow made where one ships beside it (``NAME.webp``), else a drawing of the graph.

    index(registry)              -> [{"moduleName": "default", "title", "templates": [...]}]
    document("txt2img_demo", r)  -> the UI-format workflow, or None
    thumbnail("txt2img_demo", r) -> (bytes, content type), or None
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeflow.registry import Registry
from nodeflow.uiexport import api_to_ui

WORKFLOWS = Path(__file__).resolve().parent / "workflows"
#: The index's module: "default" makes the editor fetch the files from /templates/.
MODULE = "default"
MODULE_TITLE = "nodeflow examples"


@dataclass(frozen=True)
class Template:
    name: str           # the workflow file's stem
    title: str
    description: str
    tags: tuple[str, ...] = ()


TEMPLATES = (
    Template("txt2img_demo", "txt2img on the demo model",
             "nodeflow's own small model draws a circle or triangle in red, green, blue, yellow or purple on a "
             "white, black, gray, pink or cyan background, offline, in about a second on a CPU. Edit the prompt "
             "and press Run. (nodeflow demo installs the model into models/checkpoints.)",
             ("Text to Image", "demo")),
    Template("txt2img", "Text to image", "Stable Diffusion 1.x text to image at 512×512: choose your checkpoint "
             "in the loader.", ("Text to Image",)),
    Template("img2img", "Image to image", "Redraws input/example.png at denoise 0.6.", ("Image to Image",)),
    Template("inpaint", "Inpainting", "Repaints the transparent area of input/example_masked.png with an "
             "inpainting model.", ("Inpainting",)),
    Template("outpaint", "Outpainting", "Extends input/example.png to the right and bottom with an inpainting "
             "model.", ("Outpainting",)),
    Template("hires_fix", "Hires fix", "Two passes: a 512² sample, a latent upscale to 768², a second sample "
             "at denoise 0.5.", ("Upscale",)),
    Template("lora", "LoRA", "Text to image through a LoRA from models/loras.", ("LoRA",)),
    Template("sdxl_txt2img", "SDXL text to image", "SDXL base at 1024² with size conditioning.",
             ("Text to Image", "SDXL")),
    Template("upscale", "Upscale and redraw", "Upscales input/example.png 1.5× (lanczos) and redraws it at "
             "denoise 0.4 for detail.", ("Upscale",)),
    Template("upscale_esrgan", "Upscale with ESRGAN", "Text to image, then ×4 with an ESRGAN model from "
             "models/upscale_models.", ("Upscale",)),
)
_BY_NAME = {t.name: t for t in TEMPLATES}


def _picture(t: Template) -> Path | None:
    path = WORKFLOWS / f"{t.name}.webp"
    return path if path.is_file() else None


def index(registry: Registry) -> list[dict[str, Any]]:
    """The editor's ``/templates/index.json``: one module with a template per workflow whose
    nodes this server has."""
    entries = []
    for t in TEMPLATES:
        if document(t.name, registry) is None:
            continue
        entries.append({"name": t.name, "title": t.title, "description": t.description, "mediaType": "image",
                        "mediaSubtype": "webp" if _picture(t) else "svg", "tags": list(t.tags),
                        "sourceModule": MODULE})
    return [{"moduleName": MODULE, "title": MODULE_TITLE, "type": "image", "category": "nodeflow",
             "templates": entries}]


def document(name: str, registry: Registry) -> dict[str, Any] | None:
    """The UI-format workflow of template ``name`` (None if there is none, or this server
    lacks one of its node types)."""
    t = _BY_NAME.get(name)
    if t is None:
        return None
    prompt = json.loads((WORKFLOWS / f"{t.name}.json").read_text(encoding="utf-8"))
    try:
        return api_to_ui(prompt, registry)
    except ValueError:  # e.g. --no-builtin-nodes: the example's node types are missing
        return None


def thumbnail(name: str, registry: Registry) -> tuple[bytes, str] | None:
    """The template's picture (``image/webp``), or a drawing of its graph (``image/svg+xml``)."""
    t = _BY_NAME.get(name)
    if t is None:
        return None
    picture = _picture(t)
    if picture is not None:
        return picture.read_bytes(), "image/webp"
    doc = document(name, registry)
    return (graph_svg(doc).encode(), "image/svg+xml") if doc is not None else None


def graph_svg(doc: dict[str, Any], width: int = 400, height: int = 400) -> str:
    """A small drawing of a UI-format graph: its nodes as titled boxes, its links as curves."""
    nodes = {n["id"]: n for n in doc["nodes"]}
    left = min(n["pos"][0] for n in nodes.values())
    top = min(n["pos"][1] for n in nodes.values())
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    pad = 20
    scale = min((width - 2 * pad) / max(right - left, 1), (height - 2 * pad) / max(bottom - top, 1))

    def at(x: float, y: float) -> tuple[float, float]:
        return pad + (x - left) * scale, pad + (y - top) * scale

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}"><rect width="100%" height="100%" fill="#202020"/>']
    for _, source, slot, target, _, _ in doc["links"]:
        a, b = nodes[source], nodes[target]
        x1, y1 = at(a["pos"][0] + a["size"][0], a["pos"][1] + 40 + 22 * slot)
        x2, y2 = at(b["pos"][0], b["pos"][1] + 40)
        mid = (x1 + x2) / 2
        parts.append(f'<path d="M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" '
                     'stroke="#8a8" stroke-width="1.5" fill="none"/>')
    for n in nodes.values():
        x, y = at(*n["pos"])
        w, h = n["size"][0] * scale, n["size"][1] * scale
        title = html.escape(n.get("title") or n["type"])
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="4" fill="#353535" '
                     'stroke="#555"/>')
        size = max(7, min(12, 16 * scale))
        parts.append(f'<text x="{x + 4:.1f}" y="{y + 11:.1f}" font-family="sans-serif" font-size="{size:.0f}" '
                     f'fill="#ddd">{title[:24]}</text>')
    parts.append("</svg>")
    return "".join(parts)
