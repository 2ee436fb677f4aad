"""GLIGEN: phrases placed in boxes (SD 1.x text-box GLIGEN models from models/gligen)."""

from __future__ import annotations

from nodeflow import Combo, Int, Node, Output, Socket, String
from nodes.loaders import choices_of, model_path_of, stamp_of

MAX_RESOLUTION = 16384


class GLIGENLoader(Node):
    """Loads a GLIGEN text-box model from models/gligen."""

    category = "loaders"
    display_name = "Load GLIGEN"
    model_inputs = {"gligen_name": "gligen"}
    inputs = {"gligen_name": Combo(choices=choices_of("gligen"))}
    outputs = [Output("GLIGEN")]

    @classmethod
    def fingerprint(cls, gligen_name, **_):
        return stamp_of(("gligen",), gligen_name)

    def run(self, gligen_name):
        from nodeflow.models.gligen import load_gligen

        return (load_gligen(model_path_of(("gligen",), gligen_name)),)


class GLIGENTextBoxApply(Node):
    """Places ``text`` in a box (pixels, multiples of 8) of every entry of ``conditioning_to``;
    boxes of several nodes add up (at most 30)."""

    category = "conditioning/gligen"
    display_name = "GLIGEN Textbox Apply"
    inputs = {
        "conditioning_to": Socket("CONDITIONING"),
        "clip": Socket("CLIP"),
        "gligen_textbox_model": Socket("GLIGEN"),
        "text": String(multiline=True),
        "width": Int(default=64, min=8, max=MAX_RESOLUTION, step=8),
        "height": Int(default=64, min=8, max=MAX_RESOLUTION, step=8),
        "x": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "y": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
    }
    outputs = [Output("CONDITIONING")]

    def run(self, conditioning_to, clip, gligen_textbox_model, text, width, height, x, y):
        _, pooled = clip.encode(text, projected=False)
        box = (pooled, height // 8, width // 8, y // 8, x // 8)
        out = []
        for cond, meta in conditioning_to:
            previous = meta["gligen"][2] if "gligen" in meta else []
            out.append([cond, {**meta, "gligen": ("position", gligen_textbox_model, [*previous, box])}])
        return (out,)
