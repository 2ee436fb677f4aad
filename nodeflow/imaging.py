"""Tensor helpers shared by the image, mask and latent nodes.

This module imports torch, so node modules import it inside ``run`` only: the registry
(and with it the CLI, the server and the UI-format converter) stays torch-free.

Conventions (DESIGN §3): IMAGE is float ``[B, H, W, C]`` in 0..1 on the CPU, MASK is float
``[B, H, W]`` (``[H, W]`` accepted) with 1 = the area to change, LATENT samples are
``[B, C, h, w]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: Resampling methods of ComfyUI's image scaling nodes, in its order.
IMAGE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
#: ... and of its latent scaling nodes ("bislerp" instead of "lanczos").
LATENT_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
CROP_METHODS = ["disabled", "center"]


# -- conversions ------------------------------------------------------------------------------


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image ``[H, W, C]`` (C = 1, 3 or 4) in 0..1 as an 8-bit PIL image."""
    array = np.clip(255.0 * image.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array)


def from_pil(image: Image.Image) -> torch.Tensor:
    """An 8-bit PIL image as a float tensor ``[H, W, C]`` (or ``[H, W]``) in 0..1."""
    return torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0)


def mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """A MASK as ``[B, H, W]`` (``[H, W]`` and ``[B, 1, H, W]`` accepted)."""
    if mask.ndim < 2:
        raise ValueError(f"a mask has 2 or 3 dimensions [B, H, W], got shape {list(mask.shape)}")
    return mask.reshape(-1, mask.shape[-2], mask.shape[-1])


def repeat_to_batch(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Cut or cyclically repeat ``tensor`` along dim 0 to ``size`` entries (ComfyUI's rule)."""
    n = tensor.shape[0]
    if n == size:
        return tensor
    if n > size:
        return tensor[:size]
    reps = [math.ceil(size / n)] + [1] * (tensor.ndim - 1)
    return tensor.repeat(*reps)[:size]


# -- resizing -------------------------------------------------------------------------------------


def resize(samples: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """Resize ``[B, C, H, W]`` to ``height`` × ``width`` (ComfyUI's ``common_upscale``).

    ``crop="center"`` first cuts the source to the target's aspect ratio around its centre.
    ``lanczos`` goes through PIL at 8 bits (images only); ``bislerp`` interpolates latent
    vectors spherically; the others are ``torch.nn.functional.interpolate`` without
    anti-aliasing, as in ComfyUI.
    """
    if width < 1 or height < 1:
        raise ValueError(f"cannot resize to {width}x{height}: both sides must be at least 1")
    if crop == "center":
        old_h, old_w = samples.shape[-2], samples.shape[-1]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples[..., y:old_h - y, x:old_w - x]
    if method == "lanczos":
        return _lanczos(samples, width, height)
    if method == "bislerp":
        return bislerp(samples, width, height)
    if method not in ("nearest-exact", "bilinear", "area", "bicubic", "nearest"):
        raise ValueError(f"unknown resize method {method!r}")
    return F.interpolate(samples, size=(height, width), mode=method)


def resize_image(image: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """``resize`` for an IMAGE ``[B, H, W, C]``."""
    return resize(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1)


def _lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    frames = []
    for frame in samples:  # [C, H, W]
        pil = to_pil(frame.movedim(0, -1)).resize((width, height), resample=Image.Resampling.LANCZOS)
        out = from_pil(pil)
        frames.append(out.unsqueeze(0) if out.ndim == 2 else out.movedim(-1, 0))
    return torch.stack(frames).to(samples.dtype)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear resize of ``[B, C, H, W]`` that interpolates each pixel's channel vector
    spherically (direction by slerp, length linearly): for latents, where a plain average
    shrinks the vectors' norms. Done as two 1-D passes, along the width then the height.
    As in ComfyUI (for the same pictures), nearly parallel neighbours give the first one as
    it is, and nearly opposite ones their linear interpolation."""
    dtype = samples.dtype
    x = _slerp_resize_last(samples.float(), width)                       # (B, C, H, width)
    x = _slerp_resize_last(x.transpose(-1, -2), height).transpose(-1, -2)  # (B, C, height, width)
    return x.to(dtype)


def _slerp_resize_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the last axis of ``(B, C, H, W)`` to ``size`` with bilinear sample positions
    (half-pixel centres, as ``F.interpolate(align_corners=False)``) and slerp between the two
    neighbouring channel vectors."""
    b, c, h, w = x.shape
    pos = ((torch.arange(size, dtype=torch.float32) + 0.5) * (w / size) - 0.5).clamp(0, w - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=w - 1)
    t = (pos - lo.float()).view(1, 1, 1, size)
    v0 = x[..., lo].movedim(1, -1)  # (B, H, size, C)
    v1 = x[..., hi].movedim(1, -1)
    out = _slerp(v0, v1, t.movedim(1, -1))
    return out.movedim(-1, 1)


def _slerp(v0: torch.Tensor, v1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Slerp of vectors along the last axis; ``t`` broadcasts with a trailing axis of 1."""
    n0 = v0.norm(dim=-1, keepdim=True)
    n1 = v1.norm(dim=-1, keepdim=True)
    u0 = torch.where(n0 > 0, v0 / n0.clamp_min(1e-30), torch.zeros_like(v0))
    u1 = torch.where(n1 > 0, v1 / n1.clamp_min(1e-30), torch.zeros_like(v1))
    dot = (u0 * u1).sum(-1, keepdim=True)
    omega = torch.acos(dot.clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    safe = sin_omega.abs() > 1e-8
    w0 = torch.where(safe, torch.sin((1.0 - t) * omega) / torch.where(safe, sin_omega, 1.0), 1.0 - t)
    w1 = torch.where(safe, torch.sin(t * omega) / torch.where(safe, sin_omega, 1.0), t)
    out = (w0 * u0 + w1 * u1) * (n0 * (1.0 - t) + n1 * t)
    # Nearly parallel: keep the first vector; nearly opposite: plain linear interpolation.
    out = torch.where(dot > 1 - 1e-5, v0.expand_as(out), out)
    out = torch.where(dot < -1 + 1e-5, (v0 * (1.0 - t) + v1 * t).expand_as(out), out)
    return out


def keep_aspect(width: int, height: int, src_width: int, src_height: int) -> tuple[int, int]:
    """Fill in a side given as 0 from the other one and the source's aspect ratio."""
    if width == 0:
        width = max(1, round(src_width * height / src_height))
    elif height == 0:
        height = max(1, round(src_height * width / src_width))
    return width, height


# -- compositing ------------------------------------------------------------------------------


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None,
              multiplier: int = 1, resize_source: bool = False) -> torch.Tensor:
    """Paste ``source`` onto a copy of ``destination`` (both ``[B, C, H, W]``) with its top-left
    corner at pixel (``x``, ``y``) (divided by ``multiplier``: 8 for latents), through ``mask``
    (1 = take the source). A mask of another size is stretched to the source (bilinear) and its
    batch repeated to the source's, as in ComfyUI; the source batch is repeated likewise."""
    out = destination.clone()
    if resize_source:
        source = F.interpolate(source, size=out.shape[-2:], mode="bilinear")
    source = repeat_to_batch(source.to(out.dtype), out.shape[0])
    left, top = x // multiplier, y // multiplier
    if mask is None:
        weight = torch.ones_like(source)
    else:
        weight = mask_batch(mask).unsqueeze(1).float()
        if weight.shape[-2:] != source.shape[-2:]:
            weight = F.interpolate(weight, size=source.shape[-2:], mode="bilinear")
        weight = repeat_to_batch(weight, source.shape[0])
    # The part of the source that lands inside the destination.
    h = min(source.shape[-2], out.shape[-2] - top)
    w = min(source.shape[-1], out.shape[-1] - left)
    if h <= 0 or w <= 0:
        return out
    src, wgt = source[..., :h, :w], weight[..., :h, :w]
    region = out[..., top:top + h, left:left + w]
    out[..., top:top + h, left:left + w] = src * wgt + region * (1.0 - wgt)
    return out
