"""Latent utilities that need no model: scaling, batches, crops, composites, the noise mask.

A LATENT is a dict ``{"samples": tensor [B, C, h, w]}`` of raw VAE latents (one latent pixel
per 8 image pixels), optionally with ``"noise_mask"`` (where to sample; any size, stretched
by the sampler) and ``"batch_index"`` (which noise each entry gets, for batches cut from a
larger one). Nodes copy the dict and never modify their input. Pixel positions and sizes
are given in image pixels and divided by 8, as in ComfyUI.
"""

from __future__ import annotations

from nodeflow import Bool, Combo, Float, Int, Node, Output, Socket

MAX_RESOLUTION = 16384

LATENT_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
CROP_METHODS = ["disabled", "center"]


class ScaleLatent(Node):
    """Resizes latents to ``width`` × ``height`` image pixels (each at least 64; a side of 0
    keeps the aspect ratio; both 0 leave the latent as it is)."""

    category = "latent"
    display_name = "ScaleLatent"
    aliases = ("LatentUpscale",)
    alias_display_names = {"LatentUpscale": "Upscale Latent"}
    inputs = {
        "samples": Socket("LATENT"),
        "upscale_method": Combo(choices=LATENT_METHODS),
        "width": Int(default=512, min=0, max=MAX_RESOLUTION, step=8),
        "height": Int(default=512, min=0, max=MAX_RESOLUTION, step=8),
        "crop": Combo(choices=CROP_METHODS),
    }
    outputs = [Output("LATENT")]

    def run(self, samples, upscale_method, width, height, crop):
        from nodeflow.imaging import resize

        if width == 0 and height == 0:
            return (samples,)
        x = samples["samples"]
        if width == 0:
            height = max(64, height)
            width = max(64, round(x.shape[3] * height / x.shape[2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(x.shape[2] * width / x.shape[3]))
        else:
            width, height = max(64, width), max(64, height)
        out = dict(samples)
        out["samples"] = resize(x, width // 8, height // 8, upscale_method, crop)
        return (out,)


class ScaleLatentBy(Node):
    """Resizes latents by a factor (each side rounded to whole latent pixels)."""

    category = "latent"
    display_name = "ScaleLatentBy"
    aliases = ("LatentUpscaleBy",)
    alias_display_names = {"LatentUpscaleBy": "Upscale Latent By"}
    inputs = {
        "samples": Socket("LATENT"),
        "upscale_method": Combo(choices=LATENT_METHODS),
        "scale_by": Float(default=1.5, min=0.01, max=8.0, step=0.01),
    }
    outputs = [Output("LATENT")]

    def run(self, samples, upscale_method, scale_by):
        from nodeflow.imaging import resize

        x = samples["samples"]
        width, height = max(1, round(x.shape[3] * scale_by)), max(1, round(x.shape[2] * scale_by))
        out = dict(samples)
        out["samples"] = resize(x, width, height, upscale_method)
        return (out,)


def _noise_mask_batch(mask, size: int):
    """A noise mask ``[b, 1, H, W]`` cyclically repeated to ``size`` entries."""
    from nodeflow.imaging import repeat_to_batch

    return repeat_to_batch(mask, size) if mask.shape[0] > 1 else mask


class LatentFromBatch(Node):
    """Takes ``length`` latents starting at ``batch_index`` (clamped to the batch; a negative
    index counts from the end, as in ComfyUI); they keep the noise they would have had in the
    whole batch (``batch_index`` is recorded)."""

    category = "latent/batch"
    display_name = "Get Latent From Batch"
    inputs = {
        "samples": Socket("LATENT"),
        "batch_index": Int(default=0, min=-16384, max=16384),
        "length": Int(default=1, min=1, max=64),
    }
    outputs = [Output("LATENT")]

    def run(self, samples, batch_index, length):
        x = samples["samples"]
        if batch_index < 0:
            batch_index += x.shape[0]
        start = max(0, min(x.shape[0] - 1, batch_index))
        length = min(x.shape[0] - start, length)
        out = dict(samples)
        out["samples"] = x[start:start + length].clone()
        if "noise_mask" in samples:
            mask = samples["noise_mask"]
            if mask.shape[0] == 1:
                out["noise_mask"] = mask.clone()
            else:
                out["noise_mask"] = _noise_mask_batch(mask, x.shape[0])[start:start + length].clone()
        if "batch_index" in samples:
            out["batch_index"] = list(samples["batch_index"][start:start + length])
        else:
            out["batch_index"] = list(range(start, start + length))
        return (out,)


class RepeatLatentBatch(Node):
    """Repeats a latent batch ``amount`` times (copies get the next noise indices)."""

    category = "latent/batch"
    display_name = "Repeat Latent Batch"
    inputs = {"samples": Socket("LATENT"), "amount": Int(default=1, min=1, max=64)}
    outputs = [Output("LATENT")]

    def run(self, samples, amount):
        x = samples["samples"]
        out = dict(samples)
        out["samples"] = x.repeat(amount, 1, 1, 1)
        mask = samples.get("noise_mask")
        if mask is not None and mask.shape[0] > 1:
            mask = _noise_mask_batch(mask, x.shape[0])     # [B, H, W] or [B, 1, H, W]: kept as is
            out["noise_mask"] = mask.repeat((amount,) + (1,) * (mask.ndim - 1))
        if "batch_index" in samples:
            idx = list(samples["batch_index"])
            offset = max(idx) - min(idx) + 1
            out["batch_index"] = idx + [i + k * offset for k in range(1, amount) for i in idx]
        return (out,)


class LatentBatch(Node):
    """Joins two latent batches; ``samples2`` is resized (bilinear, centre crop) to
    ``samples1``'s size if they differ."""

    category = "latent/batch"
    display_name = "Latent Batch"
    inputs = {"samples1": Socket("LATENT"), "samples2": Socket("LATENT")}
    outputs = [Output("LATENT")]

    def run(self, samples1, samples2):
        import torch

        from nodeflow.imaging import resize

        s1, s2 = samples1["samples"], samples2["samples"]
        if s1.shape[1:] != s2.shape[1:]:
            s2 = resize(s2, s1.shape[3], s1.shape[2], "bilinear", "center")
        out = dict(samples1)
        out["samples"] = torch.cat((s1, s2), dim=0)
        out["batch_index"] = list(samples1.get("batch_index", range(s1.shape[0]))) + \
            list(samples2.get("batch_index", range(s2.shape[0])))
        return (out,)


class LatentComposite(Node):
    """Pastes ``samples_from`` into ``samples_to`` at (``x``, ``y``) image pixels; with
    ``feather`` the pasted edges that lie inside the target fade in linearly over that many
    pixels."""

    category = "latent"
    display_name = "Latent Composite"
    inputs = {
        "samples_to": Socket("LATENT"),
        "samples_from": Socket("LATENT"),
        "x": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "y": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "feather": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
    }
    outputs = [Output("LATENT")]

    def run(self, samples_to, samples_from, x, y, feather):
        import torch

        x, y, feather = x // 8, y // 8, feather // 8
        dest = samples_to["samples"].clone()
        src = samples_from["samples"]
        src = src[:, :, :max(0, dest.shape[2] - y), :max(0, dest.shape[3] - x)]
        h, w = src.shape[2], src.shape[3]
        if h and w:
            weight = torch.ones_like(src)
            # Step t fades row/column t from each open side by (t + 1) / feather. The far
            # sides are taken as Python slices [n - 1 - t : n - t], as ComfyUI does: with a
            # feather wider than the pasted latent, those slices wrap round and fade rows
            # (columns) 2n - 1 - t again, so wide feathers give ComfyUI's exact result.
            for t in range(feather):
                rate = (1.0 / feather) * (t + 1)
                if y != 0:
                    weight[:, :, t:t + 1, :] *= rate
                if y + h < dest.shape[2]:
                    weight[:, :, h - 1 - t:h - t, :] *= rate
                if x != 0:
                    weight[:, :, :, t:t + 1] *= rate
                if x + w < dest.shape[3]:
                    weight[:, :, :, w - 1 - t:w - t] *= rate
            region = dest[:, :, y:y + h, x:x + w]
            dest[:, :, y:y + h, x:x + w] = src * weight + region * (1.0 - weight)
        out = dict(samples_to)
        out["samples"] = dest
        return (out,)


class LatentCompositeMasked(Node):
    """Pastes ``source`` into ``destination`` at (``x``, ``y``) image pixels through an
    optional mask (1 = source; stretched to the source's size)."""

    category = "latent"
    display_name = "LatentCompositeMasked"
    inputs = {
        "destination": Socket("LATENT"),
        "source": Socket("LATENT"),
        "x": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "y": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "resize_source": Bool(default=False),
    }
    optional = {"mask": Socket("MASK")}
    outputs = [Output("LATENT")]

    def run(self, destination, source, x, y, resize_source, mask=None):
        from nodeflow.imaging import composite

        out = dict(destination)
        out["samples"] = composite(destination["samples"], source["samples"], x, y, mask, 8, resize_source)
        return (out,)


class LatentBlend(Node):
    """``samples1`` × ``blend_factor`` + ``samples2`` × (1 − ``blend_factor``); ``samples2``
    is resized (bicubic, centre crop) to ``samples1``'s size if needed."""

    category = "_for_testing"
    display_name = "Latent Blend"
    inputs = {
        "samples1": Socket("LATENT"),
        "samples2": Socket("LATENT"),
        "blend_factor": Float(default=0.5, min=0.0, max=1.0, step=0.01),
    }
    outputs = [Output("LATENT")]

    def run(self, samples1, samples2, blend_factor):
        from nodeflow.imaging import resize

        s1, s2 = samples1["samples"], samples2["samples"]
        if s1.shape != s2.shape:
            s2 = resize(s2, s1.shape[3], s1.shape[2], "bicubic", "center")
        out = dict(samples1)
        out["samples"] = s1 * blend_factor + s2 * (1.0 - blend_factor)
        return (out,)


class LatentCrop(Node):
    """Cuts ``width`` × ``height`` image pixels at (``x``, ``y``) out of latents (the corner is
    kept at least 64 pixels inside)."""

    category = "latent/transform"
    display_name = "Crop Latent"
    inputs = {
        "samples": Socket("LATENT"),
        "width": Int(default=512, min=64, max=MAX_RESOLUTION, step=8),
        "height": Int(default=512, min=64, max=MAX_RESOLUTION, step=8),
        "x": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "y": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
    }
    outputs = [Output("LATENT")]

    def run(self, samples, width, height, x, y):
        s = samples["samples"]
        x, y = min(x // 8, max(0, s.shape[3] - 8)), min(y // 8, max(0, s.shape[2] - 8))
        out = dict(samples)
        out["samples"] = s[:, :, y:y + height // 8, x:x + width // 8]
        return (out,)


class LatentFlip(Node):
    """Mirrors latents: ``x-axis`` flips top to bottom, ``y-axis`` left to right."""

    category = "latent/transform"
    display_name = "Flip Latent"
    inputs = {"samples": Socket("LATENT"),
              "flip_method": Combo(choices=["x-axis: vertically", "y-axis: horizontally"])}
    outputs = [Output("LATENT")]

    def run(self, samples, flip_method):
        import torch

        out = dict(samples)
        out["samples"] = torch.flip(samples["samples"], dims=[2] if flip_method.startswith("x") else [3])
        return (out,)


class LatentRotate(Node):
    """Rotates latents clockwise by a quarter turn, a half or three quarters."""

    category = "latent/transform"
    display_name = "Rotate Latent"
    inputs = {"samples": Socket("LATENT"),
              "rotation": Combo(choices=["none", "90 degrees", "180 degrees", "270 degrees"])}
    outputs = [Output("LATENT")]

    def run(self, samples, rotation):
        import torch

        turns = {"none": 0, "90 degrees": 1, "180 degrees": 2, "270 degrees": 3}[rotation]
        out = dict(samples)
        out["samples"] = torch.rot90(samples["samples"], k=turns, dims=[3, 2])
        return (out,)


class SetLatentNoiseMask(Node):
    """Limits sampling to the masked area (1 = resample, 0 = keep the latent): the mask is
    stored as the latent's ``noise_mask`` ``[B, 1, H, W]``, at any size (the sampler
    stretches it to the latent)."""

    category = "latent/inpaint"
    display_name = "Set Latent Noise Mask"
    inputs = {"samples": Socket("LATENT"), "mask": Socket("MASK")}
    outputs = [Output("LATENT")]

    def run(self, samples, mask):
        from nodeflow.imaging import mask_batch

        out = dict(samples)
        out["noise_mask"] = mask_batch(mask).unsqueeze(1).float()
        return (out,)


def _match(s1, s2):
    """``s2`` resized (bilinear, centre crop) and batch-repeated to ``s1``'s shape."""
    from nodeflow.imaging import repeat_to_batch, resize

    if s1.shape[1:] != s2.shape[1:]:
        s2 = resize(s2, s1.shape[3], s1.shape[2], "bilinear", "center")
    return repeat_to_batch(s2, s1.shape[0])


class LatentAdd(Node):
    """``samples1`` + ``samples2``."""

    category = "latent/advanced"
    inputs = {"samples1": Socket("LATENT"), "samples2": Socket("LATENT")}
    outputs = [Output("LATENT")]

    def run(self, samples1, samples2):
        out = dict(samples1)
        out["samples"] = samples1["samples"] + _match(samples1["samples"], samples2["samples"])
        return (out,)


class LatentSubtract(Node):
    """``samples1`` − ``samples2``."""

    category = "latent/advanced"
    inputs = {"samples1": Socket("LATENT"), "samples2": Socket("LATENT")}
    outputs = [Output("LATENT")]

    def run(self, samples1, samples2):
        out = dict(samples1)
        out["samples"] = samples1["samples"] - _match(samples1["samples"], samples2["samples"])
        return (out,)


class LatentMultiply(Node):
    """``samples`` × ``multiplier``."""

    category = "latent/advanced"
    inputs = {"samples": Socket("LATENT"), "multiplier": Float(default=1.0, min=-10.0, max=10.0, step=0.01)}
    outputs = [Output("LATENT")]

    def run(self, samples, multiplier):
        out = dict(samples)
        out["samples"] = samples["samples"] * multiplier
        return (out,)


class LatentInterpolate(Node):
    """Interpolates two latents per pixel: the directions of the channel vectors linearly
    (renormalised), their lengths linearly; ``ratio`` 1 gives ``samples1``."""

    category = "latent/advanced"
    inputs = {
        "samples1": Socket("LATENT"),
        "samples2": Socket("LATENT"),
        "ratio": Float(default=1.0, min=0.0, max=1.0, step=0.01),
    }
    outputs = [Output("LATENT")]

    def run(self, samples1, samples2, ratio):
        import torch

        s1 = samples1["samples"]
        s2 = _match(s1, samples2["samples"])
        m1 = torch.linalg.vector_norm(s1, dim=1, keepdim=True)
        m2 = torch.linalg.vector_norm(s2, dim=1, keepdim=True)
        t = torch.nan_to_num(s1 / m1) * ratio + torch.nan_to_num(s2 / m2) * (1.0 - ratio)
        direction = torch.nan_to_num(t / torch.linalg.vector_norm(t, dim=1, keepdim=True))
        out = dict(samples1)
        out["samples"] = direction * (m1 * ratio + m2 * (1.0 - ratio))
        return (out,)


class LatentBatchSeedBehavior(Node):
    """``fixed``: every latent of the batch gets the first one's noise; ``random``: each gets
    its own (the batch index is dropped)."""

    category = "latent/advanced"
    inputs = {"samples": Socket("LATENT"), "seed_behavior": Combo(choices=["random", "fixed"], default="fixed")}
    outputs = [Output("LATENT")]

    def run(self, samples, seed_behavior):
        out = dict(samples)
        if seed_behavior == "random":
            out.pop("batch_index", None)
        else:
            first = next(iter(samples.get("batch_index", [0])))
            out["batch_index"] = [first] * samples["samples"].shape[0]
        return (out,)
