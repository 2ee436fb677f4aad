"""ComfyUI's newer model-free utility nodes, as its current templates use them: math on
numbers, number conversion, text joining, previews of any value, of masks and of two images
side by side, and batching images.

Names, inputs and outputs are ComfyUI's (``comfy_extras/nodes_math.py``, ``nodes_string.py``,
``nodes_preview_any.py``, ``nodes_mask.py``, ``nodes_images.py``). ComfyUI declares some
inputs as *autogrow* groups (``values.a``, ``values.b``, ... appear as the editor adds
sockets); nodeflow declares the whole group as optional sockets, which takes the same API
prompts and editor files.
"""

from __future__ import annotations

import json
import math
import random
import string
from typing import Any

from nodeflow import Combo, Float, Hidden, Int, Node, Output, Result, Socket, String
from nodeflow.spec import ANY, EditorWidget
from nodes._mathexpr import ExpressionError, evaluate

#: The variables of ComfyMathExpression: ComfyUI's autogrow names a..z.
MATH_NAMES = list(string.ascii_lowercase)
#: How many images BatchImagesNode takes (its autogrow group ``images.image0`` ...).
MAX_BATCH_INPUTS = 50


class ComfyMathExpression(Node):
    """Evaluates a math expression over the values given as a, b, c, ... (and ``values``, the
    list of them): arithmetic, comparisons, ``x if c else y`` and min, max, abs, round, pow,
    sqrt, ceil, floor, log, log2, log10, sin, cos, tan, int, float, sum. The text is parsed
    and evaluated safely, never run as code. Outputs the result as FLOAT, INT and BOOLEAN."""

    category = "utilities"
    display_name = "Math Expression"
    inputs = {"expression": String(default="a + b", multiline=True)}
    optional = {f"values.{n}": Socket("FLOAT,INT,BOOLEAN") for n in MATH_NAMES}
    outputs = [Output("FLOAT", "FLOAT"), Output("INT", "INT"), Output("BOOLEAN", "BOOL")]

    def run(self, expression, **values):
        names: dict[str, Any] = {key.partition(".")[2]: v for key, v in values.items() if v is not None}
        names = dict(sorted(names.items()))
        names["values"] = list(names.values())
        try:
            result = evaluate(expression, names)
        except ExpressionError as exc:
            raise ValueError(f"math expression {expression!r}: {exc}") from None
        if isinstance(result, bool) or not isinstance(result, (int, float)):
            if isinstance(result, bool):
                result = int(result)
            else:
                raise ValueError(f"math expression {expression!r} must give a number, got {type(result).__name__}")
        if not math.isfinite(float(result)):
            raise ValueError(f"math expression {expression!r} gave a non-finite result: {result}")
        return float(result), int(result), bool(result)


class ComfyNumberConvert(Node):
    """Converts a number, a numeric string or a boolean to FLOAT and INT (INT truncates)."""

    category = "utilities"
    display_name = "Number Convert"
    inputs = {"value": Socket("INT,FLOAT,STRING,BOOLEAN")}
    outputs = [Output("FLOAT", "FLOAT"), Output("INT", "INT")]

    def run(self, value):
        if isinstance(value, bool):
            number: float = 1.0 if value else 0.0
        elif isinstance(value, (int, float)):
            number = value
        elif isinstance(value, str):
            text = value.strip()
            try:
                number = int(text) if text.lstrip("+-").isdigit() else float(text)
            except ValueError:
                raise ValueError(f"cannot convert the text {value!r} to a number") from None
        else:
            raise ValueError(f"expected a number, a numeric string or a boolean, got {type(value).__name__}")
        if not math.isfinite(float(number)):
            raise ValueError(f"cannot convert {value!r} to an integer: not finite")
        return float(number), int(number)


class StringConcatenate(Node):
    """Joins two texts with an optional delimiter between them."""

    category = "utils/string"
    display_name = "Concatenate"
    inputs = {"string_a": String(multiline=True), "string_b": String(multiline=True),
              "delimiter": String(default="")}
    outputs = [Output("STRING")]

    def run(self, string_a, string_b, delimiter):
        return (delimiter.join((string_a, string_b)),)


def preview_text(value: Any) -> str:
    """A value as readable text: strings as they are, numbers and booleans printed, other
    JSON-able values as JSON, anything else by its Python text."""
    if value is None:
        return "None"
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    try:
        return json.dumps(value, indent=4)
    except (TypeError, ValueError):
        return str(value)


class PreviewAny(Node):
    """Shows any value as text in the editor (and passes the text on)."""

    category = "utils"
    display_name = "Preview as Text"
    inputs = {"source": Socket(ANY)}
    outputs = [Output("STRING")]
    output_node = True

    def run(self, source):
        text = preview_text(source)
        return Result(text, ui={"text": [text]})


def _preview(images) -> list[dict[str, str]]:
    from nodes.io import save_images

    prefix = "ComfyUI_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    return save_images(images, prefix, "temp", 1)


class MaskPreview(Node):
    """Shows a mask as a grayscale picture (written to the temp folder) and passes it on."""

    category = "mask"
    display_name = "Preview Mask"
    inputs = {"mask": Socket("MASK")}
    hidden = {"prompt": Hidden("PROMPT"), "extra_pnginfo": Hidden("EXTRA_PNGINFO")}
    outputs = [Output("MASK", "mask")]
    output_node = True

    def run(self, mask, prompt=None, extra_pnginfo=None):
        from nodeflow.imaging import mask_batch

        masks = mask_batch(mask)
        images = masks.reshape(-1, 1, *masks.shape[-2:]).movedim(1, -1).expand(-1, -1, -1, 3)
        return Result(mask, ui={"images": _preview(images.clamp(0, 1))})


class ImageCompare(Node):
    """Shows two images for comparison in the editor (both written to the temp folder)."""

    category = "image"
    display_name = "Image Compare"
    # The editor's comparison slider: not saved in widgets_values; the editor sends its
    # initial value, ["", ""], in every prompt (frontend 1.58.1's graphToPrompt).
    inputs = {"compare_view": EditorWidget(kind="IMAGECOMPARE", saved=False, editor_value=["", ""])}
    optional = {"image_a": Socket("IMAGE"), "image_b": Socket("IMAGE")}
    outputs = []
    output_node = True

    def run(self, image_a=None, image_b=None, compare_view=None):
        ui = {"a_images": _preview(image_a) if image_a is not None else [],
              "b_images": _preview(image_b) if image_b is not None else []}
        return Result(ui=ui)


class BatchImagesNode(Node):
    """Joins the given images into one batch, in input order; images of another size than the
    first are resized to it (bilinear, the centre cropped to its aspect ratio), and a missing
    alpha channel is filled with 1."""

    category = "image"
    display_name = "Batch Images"
    optional = {f"images.image{i}": Socket("IMAGE") for i in range(MAX_BATCH_INPUTS)}
    outputs = [Output("IMAGE")]

    def run(self, **images):
        import torch
        import torch.nn.functional as F

        from nodeflow.imaging import resize_image

        given = [images[f"images.image{i}"] for i in range(MAX_BATCH_INPUTS)
                 if images.get(f"images.image{i}") is not None]
        if not given:
            raise ValueError("Batch Images needs at least one image")
        first = given[0]
        channels = max(int(img.shape[-1]) for img in given)
        out = []
        for img in given:
            if img.shape[-1] < channels:
                img = F.pad(img, (0, channels - img.shape[-1]), value=1.0)
            if img.shape[1:3] != first.shape[1:3]:
                # ComfyUI's rule: bilinear after cropping the centre to the first's aspect ratio
                img = resize_image(img, int(first.shape[2]), int(first.shape[1]), "bilinear", "center")
            out.append(img)
        return (torch.cat(out, dim=0),)


#: ResolutionSelector's aspect ratios (ComfyUI's names and order): width and height parts.
ASPECT_RATIOS = {"1:1 (Square)": (1, 1), "3:2 (Photo)": (3, 2), "4:3 (Standard)": (4, 3),
                 "16:9 (Widescreen)": (16, 9), "21:9 (Ultrawide)": (21, 9), "2:3 (Portrait Photo)": (2, 3),
                 "3:4 (Portrait Standard)": (3, 4), "9:16 (Portrait Widescreen)": (9, 16)}


class ResolutionSelector(Node):
    """A width and height of the chosen aspect ratio with about ``megapixels`` (1 MP = 1024²
    pixels), each a multiple of ``multiple``; when a side would be under ``minimum``, the
    smallest size of exactly that ratio whose sides are multiples and at least the minimum."""

    category = "utilities"
    display_name = "Resolution Selector"
    inputs = {
        "aspect_ratio": Combo(choices=list(ASPECT_RATIOS), default="1:1 (Square)"),
        "megapixels": Float(default=1.0, min=0.1, max=16.0, step=0.1),
        "multiple": Int(default=8, min=8, max=128, step=4),
        "minimum": Int(default=256, min=32, max=4096, step=32),
    }
    outputs = [Output("INT", "width"), Output("INT", "height")]

    def run(self, aspect_ratio, megapixels, multiple, minimum):
        w_part, h_part = ASPECT_RATIOS[aspect_ratio]
        scale = math.sqrt(megapixels * 1024 * 1024 / (w_part * h_part))
        width = round(w_part * scale / multiple) * multiple
        height = round(h_part * scale / multiple) * multiple
        if width < minimum or height < minimum:
            # k × (w_part, h_part) with both sides multiples of `multiple`: k a multiple of step.
            step_w, step_h = multiple // math.gcd(w_part, multiple), multiple // math.gcd(h_part, multiple)
            step = math.lcm(step_w, step_h)
            k = math.ceil(math.ceil(max(minimum / w_part, minimum / h_part)) / step) * step
            width, height = w_part * k, h_part * k
        return width, height


class SeedNode(Node):
    """A seed value to share between nodes (the editor's "control after generate" widget
    changes it between runs)."""

    category = "utilities"
    display_name = "Seed"
    inputs = {"seed": Int(default=0, min=0, max=2**63 - 1, control_after_generate="fixed")}
    outputs = [Output("INT", "seed")]

    def run(self, seed):
        return (seed,)
