"""ComfyUI's newer resizing and layout nodes for images (and masks): resize by a chosen rule,
fit into a size with padding, scale to a longest side, stitch two images side by side.

Names, inputs and their order are ComfyUI's (``comfy_extras/nodes_images.py`` and
``nodes_post_processing.py``). ``ResizeImageMaskNode`` declares its size settings as a
dynamic combo: the widgets that follow ``resize_type`` depend on the rule chosen, and API
prompts name them ``"resize_type.<input>"``.
"""

from __future__ import annotations

import math

from nodeflow import Bool, Combo, Float, Int, Node, Output, Socket
from nodeflow.spec import MATCH_TYPE, DynamicCombo, MatchType

MAX_RESOLUTION = 16384
IMAGE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]


def _size(tooltip: str) -> Int:
    return Int(default=512, min=0, max=MAX_RESOLUTION, step=1, tooltip=tooltip)


def _crop() -> Combo:
    return Combo(choices=CROP_METHODS, default="center",
                 tooltip="disabled stretches to fit; center crops to keep the aspect ratio")


#: The rules of ResizeImageMaskNode and the inputs each brings (ComfyUI's order).
RESIZE_RULES = {
    "scale dimensions": {"width": _size("target width; 0 keeps the aspect ratio"),
                         "height": _size("target height; 0 keeps the aspect ratio"), "crop": _crop()},
    "scale by multiplier": {"multiplier": Float(default=1.0, min=0.01, max=8.0, step=0.01)},
    "scale longer dimension": {"longer_size": _size("the longer side becomes this long")},
    "scale shorter dimension": {"shorter_size": _size("the shorter side becomes this long")},
    "scale width": {"width": _size("target width; the height keeps the aspect ratio")},
    "scale height": {"height": _size("target height; the width keeps the aspect ratio")},
    "scale total pixels": {"megapixels": Float(default=1.0, min=0.01, max=16.0, step=0.01)},
    "match size": {"match": Socket("IMAGE,MASK"), "crop": _crop()},
    "scale to multiple": {"multiple": Int(default=8, min=1, max=MAX_RESOLUTION, step=1,
                                          tooltip="width and height become multiples of this")},
}


class ResizeImageMaskNode(Node):
    """Resizes an image or a mask by the rule chosen in ``resize_type``: to given dimensions
    (a side of 0 keeps the aspect ratio), by a multiplier, so that the longer or the shorter
    side, the width or the height has a given length, to a number of megapixels, to the size
    of another image or mask, or down to multiples of a number (cropping the centre).

    "scale shorter dimension" keeps the aspect ratio of a portrait input (37x53 W x H to
    shorter side 20 gives 20x29), as ComfyUI's current code does; ComfyUI 0.8.0 made it
    square (20x20) by testing the landscape case twice."""

    category = "transform"
    display_name = "Resize Image/Mask"
    inputs = {
        "input": MatchType(template_id="input_type", allowed="IMAGE,MASK"),
        "resize_type": DynamicCombo(choice_inputs=RESIZE_RULES, tooltip="how to resize"),
        "scale_method": Combo(choices=IMAGE_METHODS, default="area"),
    }
    outputs = [Output(MATCH_TYPE, "resized")]

    def run(self, input, resize_type, scale_method, **chosen):
        settings = {key.partition(".")[2]: value for key, value in chosen.items()}
        return (resize_by_rule(input, resize_type, settings, scale_method),)


def resize_by_rule(pixels, rule: str, settings: dict, method: str):
    """``pixels`` (an IMAGE ``[B, H, W, C]`` or a MASK ``[B, H, W]``) resized by ``rule``."""
    height, width = int(pixels.shape[1]), int(pixels.shape[2])
    crop = "disabled"
    if rule in ("scale dimensions", "scale width", "scale height"):
        w, h = settings.get("width", 0), settings.get("height", 0)
        if rule == "scale width":
            h = 0
        elif rule == "scale height":
            w = 0
        if w == 0 and h == 0:
            return pixels
        if w == 0:
            w = max(1, round(width * h / height))
        elif h == 0:
            h = max(1, round(height * w / width))
        crop = settings.get("crop", "disabled") if rule == "scale dimensions" else "disabled"
    elif rule == "scale by multiplier":
        w, h = round(width * settings["multiplier"]), round(height * settings["multiplier"])
    elif rule in ("scale longer dimension", "scale shorter dimension"):
        side = settings["longer_size" if rule == "scale longer dimension" else "shorter_size"]
        longer = rule == "scale longer dimension"
        if height == width:
            w = h = side
        elif (height > width) == longer:
            w, h = round(width / height * side), side
        else:
            w, h = side, round(height / width * side)
    elif rule == "scale total pixels":
        scale = math.sqrt(int(settings["megapixels"] * 1024 * 1024) / (width * height))
        w, h = round(width * scale), round(height * scale)
    elif rule == "match size":
        match = settings["match"]
        w, h = int(match.shape[2]), int(match.shape[1])
        crop = settings.get("crop", "center")
    elif rule == "scale to multiple":
        return _to_multiple(pixels, settings["multiple"], method)
    else:
        raise ValueError(f"unknown resize_type {rule!r}: expected one of {list(RESIZE_RULES)}")
    return _resize(pixels, w, h, method, crop)


def _resize(pixels, width: int, height: int, method: str, crop: str = "disabled"):
    from nodeflow.imaging import resize

    if width < 1 or height < 1:
        raise ValueError(f"the resized picture would be {width} × {height} pixels")
    is_image = pixels.ndim == 4
    samples = pixels.movedim(-1, 1) if is_image else pixels.unsqueeze(1)
    out = resize(samples, width, height, method, crop)
    return out.movedim(1, -1) if is_image else out.squeeze(1)


def _to_multiple(pixels, multiple: int, method: str):
    """Scale so that both sides are the largest multiples of ``multiple`` that fit, covering
    them (the aspect ratio kept), then cut the centre."""
    height, width = int(pixels.shape[1]), int(pixels.shape[2])
    target_w, target_h = width // multiple * multiple, height // multiple * multiple
    if multiple <= 1 or target_w == 0 or target_h == 0 or (target_w, target_h) == (width, height):
        return pixels
    s_w, s_h = target_w / width, target_h / height
    if s_w >= s_h:
        scaled_w, scaled_h = target_w, max(target_h, math.ceil(height * s_w))
    else:
        scaled_w, scaled_h = max(target_w, math.ceil(width * s_h)), target_h
    scaled = _resize(pixels, scaled_w, scaled_h, method)
    x0, y0 = (scaled_w - target_w) // 2, (scaled_h - target_h) // 2
    return scaled[:, y0:y0 + target_h, x0:x0 + target_w]


class ResizeAndPadImage(Node):
    """Fits images into ``target_width`` × ``target_height``, keeping their aspect ratio, and
    pads the rest (centred) with white or black."""

    category = "image/transform"
    display_name = "Resize And Pad Image"
    inputs = {
        "image": Socket("IMAGE"),
        "target_width": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "target_height": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "padding_color": Combo(choices=["white", "black"]),
        "interpolation": Combo(choices=["area", "bicubic", "nearest-exact", "bilinear", "lanczos"]),
    }
    outputs = [Output("IMAGE")]

    def run(self, image, target_width, target_height, padding_color, interpolation):
        import torch

        batch, height, width, channels = image.shape
        scale_w, scale_h = target_width / width, target_height / height
        if scale_w == scale_h:
            new_w, new_h = target_width, target_height
        else:
            scale = min(scale_w, scale_h)
            new_w, new_h = max(1, int(width * scale)), max(1, int(height * scale))
        resized = _resize(image, new_w, new_h, interpolation)
        out = torch.full((batch, target_height, target_width, channels), 0.0 if padding_color == "black" else 1.0,
                         dtype=image.dtype)
        y, x = (target_height - new_h) // 2, (target_width - new_w) // 2
        out[:, y:y + new_h, x:x + new_w, :] = resized
        return (out,)


class ImageScaleToMaxDimension(Node):
    """Scales images so that their longer side is ``largest_size`` pixels (aspect ratio kept)."""

    category = "image/upscaling"
    display_name = "Scale Image to Max Dimension"
    inputs = {
        "image": Socket("IMAGE"),
        # ComfyUI's list, with "bilinear" twice.
        "upscale_method": Combo(choices=["area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic"]),
        "largest_size": Int(default=512, min=0, max=MAX_RESOLUTION, step=1),
    }
    outputs = [Output("IMAGE")]

    def run(self, image, upscale_method, largest_size):
        height, width = int(image.shape[1]), int(image.shape[2])
        if height > width:
            w, h = round(width / height * largest_size), largest_size
        elif width > height:
            w, h = largest_size, round(height / width * largest_size)
        else:
            w = h = largest_size
        return (_resize(image, w, h, upscale_method),)


#: ImageStitch's spacing colours (RGB).
STITCH_COLORS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0),
                 "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class ImageStitch(Node):
    """Joins ``image2`` to ``image1`` on the side ``direction`` names, with an optional strip
    of ``spacing_width`` pixels (made even) between them. With ``match_image_size`` image2 is
    scaled (lanczos) to image1's height (left/right) or width (up/down); without, the smaller
    one is padded, centred. A shorter batch repeats its last image; a missing alpha channel is
    filled with 1. Without image2, image1 passes unchanged."""

    category = "image/transform"
    display_name = "Stitch Images"
    inputs = {
        "image1": Socket("IMAGE"),
        "direction": Combo(choices=["right", "down", "left", "up"], default="right"),
        "match_image_size": Bool(default=True),
        "spacing_width": Int(default=0, min=0, max=1024, step=2),
        "spacing_color": Combo(choices=list(STITCH_COLORS), default="white"),
    }
    optional = {"image2": Socket("IMAGE")}
    outputs = [Output("IMAGE")]

    def run(self, image1, direction, match_image_size, spacing_width, spacing_color, image2=None):
        import torch
        import torch.nn.functional as F

        if image2 is None:
            return (image1,)
        batch = max(image1.shape[0], image2.shape[0])
        image1, image2 = _repeat_last(image1, batch), _repeat_last(image2, batch)
        sideways = direction in ("left", "right")
        if match_image_size:
            h1, w1 = image1.shape[1:3]
            h2, w2 = image2.shape[1:3]
            size = (int(h1 * (w2 / h2)), h1) if sideways else (w1, int(w1 / (w2 / h2)))
            image2 = _resize(image2, max(1, size[0]), max(1, size[1]), "lanczos")
        else:
            # Pad the other axis to the larger of the two, centred (white pads 1, others 0).
            pad_value = 1.0 if spacing_color == "white" else 0.0
            axis = 1 if sideways else 2
            target = max(image1.shape[axis], image2.shape[axis])
            image1, image2 = (_pad_axis(img, axis, target, pad_value, F) for img in (image1, image2))
        channels = max(image1.shape[-1], image2.shape[-1])
        image1, image2 = (F.pad(img, (0, channels - img.shape[-1]), value=1.0) for img in (image1, image2))
        parts = [image2, image1] if direction in ("left", "up") else [image1, image2]
        if spacing_width > 0:
            spacing_width += spacing_width % 2
            shape = (batch, max(image1.shape[1], image2.shape[1]), spacing_width, channels) if sideways else \
                (batch, spacing_width, max(image1.shape[2], image2.shape[2]), channels)
            strip = torch.zeros(shape, dtype=image1.dtype)
            strip[..., :min(3, channels)] = torch.tensor(STITCH_COLORS[spacing_color][:min(3, channels)])
            if channels == 4:
                strip[..., 3] = 1.0
            parts.insert(1, strip)
        return (torch.cat(parts, dim=2 if sideways else 1),)


def _repeat_last(images, batch: int):
    import torch

    if images.shape[0] >= batch:
        return images
    return torch.cat([images, images[-1:].repeat(batch - images.shape[0], 1, 1, 1)])


def _pad_axis(images, axis: int, target: int, value: float, F):
    missing = target - images.shape[axis]
    if missing <= 0:
        return images
    before, after = missing // 2, missing - missing // 2
    pads = (0, 0, 0, 0, before, after) if axis == 1 else (0, 0, before, after)
    return F.pad(images, pads, mode="constant", value=value)
