"""The mask family: make, convert, crop, combine, grow, feather and threshold masks.

A MASK is a float tensor ``[B, H, W]`` (``[H, W]`` is accepted) where 1 marks the area to
change. Every node here returns ``[B, H, W]``. Names, inputs and defaults are ComfyUI's.
"""

from __future__ import annotations

from nodeflow import Bool, Combo, Float, Int, Node, Output, Socket

MAX_RESOLUTION = 16384


class SolidMask(Node):
    """A ``width`` × ``height`` mask filled with ``value``."""

    category = "mask"
    inputs = {
        "value": Float(default=1.0, min=0.0, max=1.0, step=0.01),
        "width": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "height": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
    }
    outputs = [Output("MASK")]

    def run(self, value, width, height):
        import torch

        return (torch.full((1, height, width), float(value), dtype=torch.float32),)


class InvertMask(Node):
    """1 − mask, of the same shape (a ``[H, W]`` mask stays ``[H, W]``, as in ComfyUI)."""

    category = "mask"
    inputs = {"mask": Socket("MASK")}
    outputs = [Output("MASK")]

    def run(self, mask):
        return (1.0 - mask,)


class CropMask(Node):
    """Cuts a ``width`` × ``height`` rectangle at (``x``, ``y``) out of a mask (clipped to it)."""

    category = "mask"
    inputs = {
        "mask": Socket("MASK"),
        "x": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "y": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "width": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "height": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
    }
    outputs = [Output("MASK")]

    def run(self, mask, x, y, width, height):
        from nodeflow.imaging import mask_batch

        return (mask_batch(mask)[:, y:y + height, x:x + width],)


class MaskComposite(Node):
    """Combines ``source`` into ``destination`` with its top-left corner at (``x``, ``y``):
    multiply, add, subtract (clamped to 0..1), or the logical and / or / xor of the rounded
    masks. Outside the source's footprint the destination is kept."""

    category = "mask"
    inputs = {
        "destination": Socket("MASK"),
        "source": Socket("MASK"),
        "x": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "y": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "operation": Combo(choices=["multiply", "add", "subtract", "and", "or", "xor"]),
    }
    outputs = [Output("MASK")]

    def run(self, destination, source, x, y, operation):
        import torch

        from nodeflow.imaging import mask_batch, repeat_to_batch

        out = mask_batch(destination).clone().float()
        src = mask_batch(source).float()
        if src.shape[0] != out.shape[0]:
            if out.shape[0] == 1:
                out = out.expand(src.shape[0], -1, -1).clone()
            src = repeat_to_batch(src, out.shape[0])
        h = max(0, min(src.shape[1], out.shape[1] - y))
        w = max(0, min(src.shape[2], out.shape[2] - x))
        if h and w:
            d, s = out[:, y:y + h, x:x + w], src[:, :h, :w]
            if operation == "multiply":
                r = d * s
            elif operation == "add":
                r = d + s
            elif operation == "subtract":
                r = d - s
            else:
                db, sb = d.round().bool(), s.round().bool()
                r = {"and": torch.logical_and, "or": torch.logical_or,
                     "xor": torch.logical_xor}[operation](db, sb).float()
            out[:, y:y + h, x:x + w] = r
        return (out.clamp(0.0, 1.0),)


class FeatherMask(Node):
    """Fades a mask out towards its edges: over ``left`` pixels from the left edge (and so
    on), linearly from 1/n at the outermost pixel row or column to 1 at the n-th.

    Deliberate difference from ComfyUI: its ``right`` and ``bottom`` loops index the column
    (row) ``-x`` with x counting from 0, so the first multiplication lands on column 0 (the
    left edge) instead of the last one, and the right (bottom) ramp is shifted by one pixel
    with the far edge left at full strength. Here every side fades symmetrically, the
    outermost column or row getting 1/n."""

    category = "mask"
    inputs = {
        "mask": Socket("MASK"),
        "left": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "top": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "right": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "bottom": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
    }
    outputs = [Output("MASK")]

    def run(self, mask, left, top, right, bottom):
        import torch

        from nodeflow.imaging import mask_batch

        out = mask_batch(mask).clone().float()
        _, h, w = out.shape
        left, right, top, bottom = min(left, w), min(right, w), min(top, h), min(bottom, h)
        if left:
            out[:, :, :left] *= torch.arange(1, left + 1, dtype=out.dtype) / left
        if right:
            out[:, :, w - right:] *= torch.arange(right, 0, -1, dtype=out.dtype) / right
        if top:
            out[:, :top, :] *= (torch.arange(1, top + 1, dtype=out.dtype) / top).view(-1, 1)
        if bottom:
            out[:, h - bottom:, :] *= (torch.arange(bottom, 0, -1, dtype=out.dtype) / bottom).view(-1, 1)
        return (out,)


class GrowMask(Node):
    """Grows a mask by ``expand`` pixels (shrinks it when negative): a grey-level dilation
    (erosion) repeated once per pixel, with a 3×3 cross (``tapered_corners``) or square."""

    category = "mask"
    inputs = {
        "mask": Socket("MASK"),
        "expand": Int(default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1),
        "tapered_corners": Bool(default=True),
    }
    outputs = [Output("MASK")]

    def run(self, mask, expand, tapered_corners):
        import torch.nn.functional as F

        from nodeflow.imaging import mask_batch

        x = mask_batch(mask).float().unsqueeze(1)  # (B, 1, H, W)
        sign = 1.0 if expand >= 0 else -1.0
        x = x * sign  # erosion is a dilation of the negated mask
        for _ in range(abs(expand)):
            if tapered_corners:
                p = F.pad(x, (1, 1, 1, 1), mode="replicate")
                x = p[:, :, 1:-1, 1:-1].maximum(p[:, :, :-2, 1:-1]).maximum(p[:, :, 2:, 1:-1]) \
                    .maximum(p[:, :, 1:-1, :-2]).maximum(p[:, :, 1:-1, 2:])
            else:
                x = F.max_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return ((x * sign).squeeze(1),)


class ThresholdMask(Node):
    """1 where the mask is above ``value``, else 0."""

    category = "mask"
    inputs = {"mask": Socket("MASK"), "value": Float(default=0.5, min=0.0, max=1.0, step=0.01)}
    outputs = [Output("MASK")]

    def run(self, mask, value):
        from nodeflow.imaging import mask_batch

        return ((mask_batch(mask) > value).float(),)


class ImageToMask(Node):
    """One channel of an image as a mask (``alpha`` needs an RGBA image)."""

    category = "mask"
    display_name = "Convert Image to Mask"
    inputs = {"image": Socket("IMAGE"), "channel": Combo(choices=["red", "green", "blue", "alpha"])}
    outputs = [Output("MASK")]

    def run(self, image, channel):
        index = ["red", "green", "blue", "alpha"].index(channel)
        if index >= image.shape[-1]:
            raise ValueError(f"the image has {image.shape[-1]} channels, so it has no {channel} channel")
        return (image[..., index],)


class ImageColorToMask(Node):
    """1 where a pixel has exactly the colour ``color`` (0xRRGGBB, compared at 8 bits), else 0."""

    category = "mask"
    inputs = {"image": Socket("IMAGE"), "color": Int(default=0, min=0, max=0xFFFFFF, step=1)}
    outputs = [Output("MASK")]

    def run(self, image, color):
        import torch

        rgb = (image[..., :3].clamp(0, 1) * 255.0).round().to(torch.int64)
        packed = (rgb[..., 0] << 16) + (rgb[..., 1] << 8) + rgb[..., 2]
        return ((packed == color).float(),)


class MaskToImage(Node):
    """A mask as a grey RGB image."""

    category = "mask"
    display_name = "Convert Mask to Image"
    inputs = {"mask": Socket("MASK")}
    outputs = [Output("IMAGE")]

    def run(self, mask):
        from nodeflow.imaging import mask_batch

        return (mask_batch(mask).unsqueeze(-1).expand(-1, -1, -1, 3).clone(),)
