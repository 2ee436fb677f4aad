"""Image nodes that need no model: scaling, padding for outpainting, batches, crops, blends.

IMAGE values are float tensors ``[B, H, W, C]`` in 0..1 on the CPU. Input names, defaults,
limits and output order are ComfyUI's; our names are the design card's where it has one,
with ComfyUI's class name as an alias.
"""

from __future__ import annotations

from nodeflow import Bool, Combo, Float, Hidden, Int, Node, Output, Socket

MAX_RESOLUTION = 16384

#: Kept in step with ``nodeflow.imaging`` (which imports torch, so it is not imported here).
IMAGE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]


class ScaleImage(Node):
    """Resizes images to ``width`` × ``height`` pixels; a side of 0 keeps the aspect ratio,
    both 0 leave the image as it is. ``crop="center"`` cuts the source to the target's aspect
    ratio first instead of stretching it."""

    category = "image/upscaling"
    display_name = "ScaleImage"
    aliases = ("ImageScale",)
    alias_display_names = {"ImageScale": "Upscale Image"}
    inputs = {
        "image": Socket("IMAGE"),
        "upscale_method": Combo(choices=IMAGE_METHODS),
        "width": Int(default=512, min=0, max=MAX_RESOLUTION, step=1),
        "height": Int(default=512, min=0, max=MAX_RESOLUTION, step=1),
        "crop": Combo(choices=CROP_METHODS),
    }
    outputs = [Output("IMAGE")]

    def run(self, image, upscale_method, width, height, crop):
        from nodeflow.imaging import keep_aspect, resize_image

        if width == 0 and height == 0:
            return (image,)
        width, height = keep_aspect(width, height, image.shape[2], image.shape[1])
        return (resize_image(image, width, height, upscale_method, crop),)


class ScaleImageBy(Node):
    """Resizes images by a factor (each side rounded to whole pixels)."""

    category = "image/upscaling"
    display_name = "ScaleImageBy"
    aliases = ("ImageScaleBy",)
    alias_display_names = {"ImageScaleBy": "Upscale Image By"}
    inputs = {
        "image": Socket("IMAGE"),
        "upscale_method": Combo(choices=IMAGE_METHODS),
        "scale_by": Float(default=1.0, min=0.01, max=8.0, step=0.01),
    }
    outputs = [Output("IMAGE")]

    def run(self, image, upscale_method, scale_by):
        from nodeflow.imaging import resize_image

        width = max(1, round(image.shape[2] * scale_by))
        height = max(1, round(image.shape[1] * scale_by))
        return (resize_image(image, width, height, upscale_method),)


class ScaleImageToTotalPixels(Node):
    """Resizes images to about ``megapixels`` × 1024² pixels, keeping the aspect ratio; each
    side is rounded to a multiple of ``resolution_steps``."""

    category = "image/upscaling"
    display_name = "ScaleImageToTotalPixels"
    aliases = ("ImageScaleToTotalPixels",)
    alias_display_names = {"ImageScaleToTotalPixels": "Scale Image to Total Pixels"}
    inputs = {
        "image": Socket("IMAGE"),
        "upscale_method": Combo(choices=IMAGE_METHODS),
        "megapixels": Float(default=1.0, min=0.01, max=16.0, step=0.01),
        # Required in current ComfyUI; older editor files without it get its default.
        "resolution_steps": Int(default=1, min=1, max=256),
    }
    outputs = [Output("IMAGE")]

    def run(self, image, upscale_method, megapixels, resolution_steps):
        import math

        from nodeflow.imaging import resize_image

        scale = math.sqrt(megapixels * 1024 * 1024 / (image.shape[1] * image.shape[2]))
        width = max(resolution_steps, round(image.shape[2] * scale / resolution_steps) * resolution_steps)
        height = max(resolution_steps, round(image.shape[1] * scale / resolution_steps) * resolution_steps)
        return (resize_image(image, width, height, upscale_method),)


class PadImageForOutpaint(Node):
    """Grows the canvas by the given margins for outpainting: the new area is mid-grey (0.5)
    and its MASK is 1 (to be painted); with ``feathering`` the mask also fades in over that
    many pixels inside the original image along the padded sides (quadratically)."""

    category = "image"
    display_name = "PadImageForOutpaint"
    aliases = ("ImagePadForOutpaint",)
    alias_display_names = {"ImagePadForOutpaint": "Pad Image for Outpainting"}
    inputs = {
        "image": Socket("IMAGE"),
        "left": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "top": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "right": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "bottom": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "feathering": Int(default=40, min=0, max=MAX_RESOLUTION, step=1),
    }
    outputs = [Output("IMAGE", "IMAGE"), Output("MASK", "MASK")]

    def run(self, image, left, top, right, bottom, feathering):
        import torch

        b, h, w, c = image.shape
        canvas = torch.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=torch.float32)
        canvas[:, top:top + h, left:left + w, :] = image
        mask = torch.ones((h + top + bottom, w + left + right), dtype=torch.float32)
        inner = torch.zeros((h, w), dtype=torch.float32)
        if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
            rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
            cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
            far_h, far_w = torch.full_like(rows, float(h)), torch.full_like(cols, float(w))
            # Distance to each padded side (a side that is not padded does not count).
            d = torch.minimum(
                torch.minimum(rows if top else far_h, (h - rows) if bottom else far_h),
                torch.minimum(cols if left else far_w, (w - cols) if right else far_w))
            ramp = ((feathering - d) / feathering).clamp(min=0)
            inner = torch.where(d < feathering, ramp * ramp, inner)
        mask[top:top + h, left:left + w] = inner
        return canvas, mask.unsqueeze(0)


class ImageInvert(Node):
    """Inverts images (1 − value)."""

    category = "image"
    display_name = "Invert Image Colors"
    inputs = {"image": Socket("IMAGE")}
    outputs = [Output("IMAGE")]

    def run(self, image):
        return (1.0 - image,)


class ImageBatch(Node):
    """Joins two image batches into one; ``image2`` is resized (bilinear, centre crop) to
    ``image1``'s size if they differ. When one batch has an alpha channel and the other not,
    the other gets an opaque one (alpha 1), as recent ComfyUI does."""

    category = "image"
    display_name = "Batch Images (DEPRECATED)"
    inputs = {"image1": Socket("IMAGE"), "image2": Socket("IMAGE")}
    outputs = [Output("IMAGE")]

    def run(self, image1, image2):
        import torch

        from nodeflow.imaging import resize_image

        image1, image2 = _match_channels(image1, image2)
        if image1.shape[1:] != image2.shape[1:]:
            image2 = resize_image(image2, image1.shape[2], image1.shape[1], "bilinear", "center")
        return (torch.cat((image1, image2), dim=0),)


def _match_channels(a, b):
    """Two IMAGE batches with the same channel count: a grey one (1 channel) is repeated to
    RGB, and an RGB one gets an opaque alpha channel when the other has one."""
    def widen(img, channels):
        if img.shape[-1] == 1 and channels >= 3:
            img = img.expand(*img.shape[:-1], 3)
        if img.shape[-1] == 3 and channels == 4:
            import torch

            img = torch.cat([img, torch.ones_like(img[..., :1])], dim=-1)
        return img

    if a.shape[-1] == b.shape[-1]:
        return a, b
    channels = max(a.shape[-1], b.shape[-1])
    a, b = widen(a, channels), widen(b, channels)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"cannot batch images with {a.shape[-1]} and {b.shape[-1]} channels")
    return a, b


class RepeatImageBatch(Node):
    """Repeats an image batch ``amount`` times."""

    category = "image/batch"
    display_name = "Repeat Image Batch"
    inputs = {"image": Socket("IMAGE"), "amount": Int(default=1, min=1, max=4096)}
    outputs = [Output("IMAGE")]

    def run(self, image, amount):
        return (image.repeat(amount, 1, 1, 1),)


class ImageFromBatch(Node):
    """Takes ``length`` images from a batch starting at ``batch_index`` (clamped to the
    batch: an index past the end gives the last image; a negative one counts from the end)."""

    category = "image/batch"
    display_name = "Get Image from Batch"
    inputs = {
        "image": Socket("IMAGE"),
        "batch_index": Int(default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION),
        "length": Int(default=1, min=1, max=4096),
    }
    outputs = [Output("IMAGE")]

    def run(self, image, batch_index, length):
        if batch_index < 0:
            batch_index += image.shape[0]
        start = max(0, min(image.shape[0] - 1, batch_index))
        length = min(image.shape[0] - start, length)
        return (image[start:start + length].clone(),)


class ImageAddNoise(Node):
    """Adds Gaussian noise (``strength`` × N(0, 1), drawn on the CPU from ``seed``), clamped
    to 0..1."""

    category = "image/filters"
    display_name = "Add Noise to Image"
    inputs = {
        "image": Socket("IMAGE"),
        "seed": Int(default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="the random seed used for creating the noise"),
        "strength": Float(default=0.5, min=0.0, max=1.0, step=0.01),
    }
    outputs = [Output("IMAGE")]

    def run(self, image, seed, strength):
        import torch

        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(image.shape, generator=generator).to(image)
        return ((image + strength * noise).clamp(0.0, 1.0),)


class ImageCrop(Node):
    """Cuts a ``width`` × ``height`` rectangle at (``x``, ``y``) out of images (clipped to the
    image; the corner is kept inside it)."""

    category = "image/transform"
    display_name = "Crop Image"
    inputs = {
        "image": Socket("IMAGE"),
        "width": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "height": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "x": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "y": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
    }
    outputs = [Output("IMAGE")]

    def run(self, image, width, height, x, y):
        x = min(x, image.shape[2] - 1)
        y = min(y, image.shape[1] - 1)
        return (image[:, y:y + height, x:x + width, :],)


class GetImageSize(Node):
    """The width, height and batch size of an image batch."""

    category = "image"
    display_name = "Get Image Size"
    inputs = {"image": Socket("IMAGE")}
    hidden = {"unique_id": Hidden("UNIQUE_ID")}  # ComfyUI shows the size on the node through it
    outputs = [Output("INT", "width"), Output("INT", "height"), Output("INT", "batch_size")]

    def run(self, image, unique_id=None):
        return int(image.shape[2]), int(image.shape[1]), int(image.shape[0])


class ImageFlip(Node):
    """Mirrors images: ``x-axis`` flips top to bottom, ``y-axis`` left to right."""

    category = "image/transform"
    display_name = "Image Flip"
    inputs = {"image": Socket("IMAGE"),
              "flip_method": Combo(choices=["x-axis: vertically", "y-axis: horizontally"])}
    outputs = [Output("IMAGE")]

    def run(self, image, flip_method):
        import torch

        return (torch.flip(image, dims=[1] if flip_method.startswith("x") else [2]),)


class ImageRotate(Node):
    """Rotates images clockwise by a quarter turn, a half or three quarters."""

    category = "image/transform"
    display_name = "Image Rotate"
    inputs = {"image": Socket("IMAGE"),
              "rotation": Combo(choices=["none", "90 degrees", "180 degrees", "270 degrees"])}
    outputs = [Output("IMAGE")]

    def run(self, image, rotation):
        import torch

        turns = {"none": 0, "90 degrees": 1, "180 degrees": 2, "270 degrees": 3}[rotation]
        return (torch.rot90(image, k=turns, dims=[2, 1]),)


class EmptyImage(Node):
    """A batch of images of one colour (``color`` is 0xRRGGBB)."""

    category = "image"
    display_name = "Empty Image"
    inputs = {
        "width": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "height": Int(default=512, min=1, max=MAX_RESOLUTION, step=1),
        "batch_size": Int(default=1, min=1, max=4096),
        "color": Int(default=0, min=0, max=0xFFFFFF, step=1),
    }
    outputs = [Output("IMAGE")]

    def run(self, width, height, batch_size, color):
        import torch

        rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 255.0
        return (rgb.view(1, 1, 1, 3).expand(batch_size, height, width, 3).clone(),)


class ImageCompositeMasked(Node):
    """Pastes ``source`` onto ``destination`` at (``x``, ``y``), through ``mask`` if given
    (1 = source). A mask of another size than the source is stretched to it (bilinear). The
    output has the destination's channels: an RGBA source on an RGB destination loses its alpha
    (as in ComfyUI); an RGB source on an RGBA destination is taken as opaque."""

    category = "image"
    display_name = "ImageCompositeMasked"
    inputs = {
        "destination": Socket("IMAGE"),
        "source": Socket("IMAGE"),
        "x": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "y": Int(default=0, min=0, max=MAX_RESOLUTION, step=1),
        "resize_source": Bool(default=False),
    }
    optional = {"mask": Socket("MASK")}
    outputs = [Output("IMAGE")]

    def run(self, destination, source, x, y, resize_source, mask=None):
        from nodeflow.imaging import composite

        if source.shape[-1] > destination.shape[-1]:
            source = source[..., :destination.shape[-1]]    # ComfyUI's rule: the source's alpha is dropped
        destination, source = _match_alpha(destination, source)
        out = composite(destination.movedim(-1, 1), source.movedim(-1, 1), x, y, mask, 1, resize_source)
        return (out.movedim(1, -1),)


def _match_alpha(a, b):
    """Give both images an alpha channel (opaque) if one of them has one."""
    import torch

    def with_alpha(img):
        return torch.cat([img, torch.ones_like(img[..., :1])], dim=-1) if img.shape[-1] == 3 else img

    if a.shape[-1] != b.shape[-1]:
        return with_alpha(a), with_alpha(b)
    return a, b


class JoinImageWithAlpha(Node):
    """Adds an alpha channel to images from a MASK (alpha = 1 − mask, so the masked area
    becomes transparent); a mask of another size is stretched to the image (bilinear). The
    output has the smaller batch of the two, as in ComfyUI (a single mask does not repeat)."""

    category = "mask/compositing"
    display_name = "Join Image with Alpha"
    inputs = {"image": Socket("IMAGE"), "alpha": Socket("MASK")}
    outputs = [Output("IMAGE")]

    def run(self, image, alpha):
        import torch
        import torch.nn.functional as F

        from nodeflow.imaging import mask_batch

        m = mask_batch(alpha).unsqueeze(1).float()
        if m.shape[-2:] != image.shape[1:3]:
            m = F.interpolate(m, size=image.shape[1:3], mode="bilinear")
        n = min(len(image), len(m))     # ComfyUI's rule: the smaller batch of the two
        return (torch.cat([image[:n, ..., :3], 1.0 - m[:n, 0, :, :, None]], dim=-1),)


class SplitImageWithAlpha(Node):
    """Splits RGBA images into the RGB IMAGE and a MASK of 1 − alpha (opaque images give a
    zero mask)."""

    category = "mask/compositing"
    display_name = "Split Image with Alpha"
    inputs = {"image": Socket("IMAGE")}
    outputs = [Output("IMAGE", "IMAGE"), Output("MASK", "MASK")]

    def run(self, image):
        import torch

        alpha = image[..., 3] if image.shape[-1] > 3 else torch.ones_like(image[..., 0])
        return image[..., :3], 1.0 - alpha


class ImageBlend(Node):
    """Blends ``image2`` over ``image1`` with a blend mode; ``blend_factor`` 0 keeps
    ``image1``, 1 gives the blend. ``image2`` is resized (bicubic, centre crop) if needed."""

    category = "image/postprocessing"
    display_name = "Blend Images"
    inputs = {
        "image1": Socket("IMAGE"),
        "image2": Socket("IMAGE"),
        "blend_factor": Float(default=0.5, min=0.0, max=1.0, step=0.01),
        "blend_mode": Combo(choices=["normal", "multiply", "screen", "overlay", "soft_light", "difference"]),
    }
    outputs = [Output("IMAGE")]

    def run(self, image1, image2, blend_factor, blend_mode):
        import torch

        from nodeflow.imaging import resize_image

        if image1.shape != image2.shape:
            image2 = resize_image(image2, image1.shape[2], image1.shape[1], "bicubic", "center")
        a, b = image1, image2
        if blend_mode == "normal":
            mixed = b
        elif blend_mode == "multiply":
            mixed = a * b
        elif blend_mode == "screen":
            mixed = 1 - (1 - a) * (1 - b)
        elif blend_mode == "overlay":
            mixed = torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
        elif blend_mode == "soft_light":
            g = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
            mixed = torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (g - a))
        else:  # difference
            mixed = a - b
        return ((a * (1 - blend_factor) + mixed * blend_factor).clamp(0, 1),)


def _gaussian_kernel(size: int, sigma: float):
    import torch

    # Coordinates span -1..1 across the kernel, as ComfyUI's blur and sharpen nodes use.
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    g = torch.exp(-(xx * xx + yy * yy) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter(image, kernel, radius):
    import torch.nn.functional as F

    channels = image.shape[-1]
    x = image.movedim(-1, 1)
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    weight = kernel.to(x.dtype).expand(channels, 1, *kernel.shape)
    return F.conv2d(x, weight, groups=channels).movedim(1, -1)


class ImageBlur(Node):
    """Gaussian blur over a (2·radius+1)² window (edges reflected)."""

    category = "image/postprocessing"
    display_name = "Blur Image"
    inputs = {
        "image": Socket("IMAGE"),
        "blur_radius": Int(default=1, min=1, max=31, step=1),
        "sigma": Float(default=1.0, min=0.1, max=10.0, step=0.1),
    }
    outputs = [Output("IMAGE")]

    def run(self, image, blur_radius, sigma):
        if blur_radius == 0:
            return (image,)
        return (_filter(image, _gaussian_kernel(2 * blur_radius + 1, sigma), blur_radius),)


class ImageSharpen(Node):
    """Unsharp-mask style sharpening: subtracts ``alpha`` × 10 times a Gaussian of the
    neighbourhood, renormalised so flat areas stay unchanged."""

    category = "image/postprocessing"
    display_name = "Sharpen Image"
    inputs = {
        "image": Socket("IMAGE"),
        "sharpen_radius": Int(default=1, min=1, max=31, step=1),
        "sigma": Float(default=1.0, min=0.1, max=10.0, step=0.01),
        "alpha": Float(default=1.0, min=0.0, max=5.0, step=0.01),
    }
    outputs = [Output("IMAGE")]

    def run(self, image, sharpen_radius, sigma, alpha):
        if sharpen_radius == 0:
            return (image,)
        size = 2 * sharpen_radius + 1
        kernel = _gaussian_kernel(size, sigma) * -(alpha * 10)
        c = size // 2
        kernel[c, c] = kernel[c, c] - kernel.sum() + 1.0
        return (_filter(image, kernel, sharpen_radius).clamp(0, 1),)


def _bayer_thresholds(order: int):
    """The ``order`` × ``order`` ordered-dither (Bayer) matrix as offsets in (−½, ½):
    (index + ½) / order² − ½, the index matrix built by B₂ₙ = [[4B, 4B+2], [4B+3, 4B+1]]."""
    import numpy as np

    index = np.zeros((1, 1), dtype=np.int64)
    while index.shape[0] < order:
        index = np.block([[4 * index, 4 * index + 2], [4 * index + 3, 4 * index + 1]])
    return (index + 0.5) / index.size - 0.5


class ImageQuantize(Node):
    """Reduces each image to a palette of at most ``colors`` colours (PIL's median cut),
    without dithering, with Floyd–Steinberg error diffusion, or with ordered (Bayer) dithering
    of size 2, 4, 8 or 16."""

    category = "image/postprocessing"
    display_name = "Quantize Image"
    inputs = {
        "image": Socket("IMAGE"),
        "colors": Int(default=256, min=1, max=256, step=1),
        "dither": Combo(choices=["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"]),
    }
    outputs = [Output("IMAGE")]

    def run(self, image, colors, dither):
        import numpy as np
        import torch
        from PIL import Image

        out = []
        for frame in image[..., :3]:
            pixels = (frame.clamp(0, 1) * 255).to(torch.uint8).numpy()
            picture = Image.fromarray(pixels)
            palette = picture.quantize(colors=colors)    # the palette; mapping onto it is done below
            if dither.startswith("bayer"):
                order = int(dither.split("-")[1])
                spread = 2 * 256 / (len(palette.getpalette()) // 3)
                offsets = spread * _bayer_thresholds(order) + 0.5
                reps = (-(-pixels.shape[0] // order), -(-pixels.shape[1] // order))
                tiled = np.tile(offsets, reps)[:pixels.shape[0], :pixels.shape[1], None]
                shifted = np.clip(pixels.astype(np.float64) + tiled, 0, 255).astype(np.uint8)
                quantized = Image.fromarray(shifted).quantize(palette=palette, dither=Image.Dither.NONE)
            else:
                mode = Image.Dither.FLOYDSTEINBERG if dither == "floyd-steinberg" else Image.Dither.NONE
                quantized = picture.quantize(palette=palette, dither=mode)
            out.append(torch.from_numpy(np.asarray(quantized.convert("RGB"), dtype=np.float32) / 255.0))
        return (torch.stack(out),)


PORTER_DUFF_MODES = ["ADD", "CLEAR", "DARKEN", "DST", "DST_ATOP", "DST_IN", "DST_OUT", "DST_OVER", "LIGHTEN",
                     "MULTIPLY", "OVERLAY", "SCREEN", "SRC", "SRC_ATOP", "SRC_IN", "SRC_OUT", "SRC_OVER", "XOR"]


def porter_duff(mode: str, s, sa, d, da):
    """(colour, alpha) of compositing source (s, sa) with destination (d, da) by one of
    Porter & Duff's operators (1984) and the blend modes ComfyUI adds, colours taken as
    premultiplied. Each term is ComfyUI's, so results match its node."""
    import torch

    union = sa + da - sa * da
    table = {
        "ADD": lambda: ((s + d).clamp(0, 1), (sa + da).clamp(0, 1)),
        "CLEAR": lambda: (torch.zeros_like(d), torch.zeros_like(da)),
        "DARKEN": lambda: ((1 - da) * s + (1 - sa) * d + torch.minimum(s, d), union),
        "DST": lambda: (d, da),
        "DST_ATOP": lambda: (sa * d + (1 - da) * s, sa),
        "DST_IN": lambda: (d * sa, sa * da),
        "DST_OUT": lambda: ((1 - sa) * d, (1 - sa) * da),
        "DST_OVER": lambda: (d + (1 - da) * s, da + (1 - da) * sa),
        "LIGHTEN": lambda: ((1 - da) * s + (1 - sa) * d + torch.maximum(s, d), union),
        "MULTIPLY": lambda: (s * d, sa * da),
        "OVERLAY": lambda: (torch.where(2 * d < da, 2 * s * d, sa * da - 2 * (da - s) * (sa - d)), union),
        "SCREEN": lambda: (s + d - s * d, union),
        "SRC": lambda: (s, sa),
        "SRC_ATOP": lambda: (da * s + (1 - sa) * d, da),
        "SRC_IN": lambda: (s * da, sa * da),
        "SRC_OUT": lambda: ((1 - da) * s, (1 - da) * sa),
        "SRC_OVER": lambda: (s + (1 - sa) * d, sa + (1 - sa) * da),
        "XOR": lambda: ((1 - da) * s + (1 - sa) * d, (1 - da) * sa + (1 - sa) * da),
    }
    return table[mode]()


class PorterDuffImageComposite(Node):
    """Composites a source image over (or in, out, atop, …) a destination with Porter–Duff
    operators, each image with its own alpha as a MASK in ComfyUI's convention (1 =
    transparent, LoadImage's mask; the output mask likewise). The source, its alpha and the
    destination's alpha are resized (bicubic, centre crop) to the destination's size; the
    batch is the smallest of the four. Outputs the image (not premultiplied) and its mask."""

    category = "mask/compositing"
    display_name = "Porter-Duff Image Composite"
    inputs = {
        "source": Socket("IMAGE"),
        "source_alpha": Socket("MASK"),
        "destination": Socket("IMAGE"),
        "destination_alpha": Socket("MASK"),
        "mode": Combo(choices=PORTER_DUFF_MODES, default="DST"),
    }
    outputs = [Output("IMAGE"), Output("MASK")]

    def run(self, source, source_alpha, destination, destination_alpha, mode):
        import torch

        from nodeflow.imaging import mask_batch, resize_image

        source_alpha, destination_alpha = mask_batch(source_alpha), mask_batch(destination_alpha)
        n = min(len(source), len(source_alpha), len(destination), len(destination_alpha))
        if source.shape[-1] != destination.shape[-1]:
            raise ValueError(f"the source has {source.shape[-1]} channels and the destination "
                             f"{destination.shape[-1]}; they need the same number")
        d = destination[:n]
        h, w = d.shape[1], d.shape[2]

        def fit(image):  # [n, H', W', C] -> [n, h, w, C]
            return image if image.shape[1:3] == (h, w) else resize_image(image, w, h, "bicubic", "center")

        s = fit(source[:n])
        sa = fit(source_alpha[:n].unsqueeze(-1))
        da = fit(destination_alpha[:n].unsqueeze(-1))
        # The MASK inputs follow ComfyUI's convention (1 = transparent, as LoadImage gives):
        # alpha is 1 - mask, colours are premultiplied for the operators and divided back
        # afterwards (0 where nothing is left opaque), and the alpha goes out as a mask again.
        sa, da = 1 - sa, 1 - da
        image, alpha = porter_duff(mode, s * sa, sa, d * da, da)
        image = torch.where(alpha > 1e-5, image / alpha, torch.zeros_like(image)).clamp(0, 1)
        return image, (1 - alpha).squeeze(-1)
