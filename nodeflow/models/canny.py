"""Canny edge detection (Canny 1986), written out in torch with the choices of kornia's
``kornia.filters.canny`` (0.9), which ComfyUI's Canny node calls with its defaults:

1. grey = 0.299 R + 0.587 G + 0.114 B;
2. a separable 5×5 Gaussian blur, σ = 1, reflected borders;
3. unnormalised Sobel gradients (replicated borders), magnitude √(gx² + gy² + 10⁻⁶);
4. non-maximum suppression along the gradient direction rounded to 45°: a pixel must beat both
   neighbours on that line, strictly, except that it may tie the right / lower one;
5. thresholds (strict): weak above ``low``, strong above ``high``; hysteresis promotes weak
   pixels 8-connected to strong ones until nothing changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

GREY = (0.299, 0.587, 0.114)
# neighbour offsets (dy, dx) for the eight directions k·45° (0 = right, 2 = down), and the pixel itself
OFFSETS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 0))


def gaussian_blur(x: Tensor, size: int = 5, sigma: float = 1.0) -> Tensor:
    t = torch.arange(size, dtype=x.dtype, device=x.device) - size // 2
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    c, half = x.shape[1], size // 2
    row, column = k.reshape(1, 1, 1, -1).expand(c, 1, 1, size), k.reshape(1, 1, -1, 1).expand(c, 1, size, 1)
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="reflect"), row, groups=c)          # along x first, as kornia
    return F.conv2d(F.pad(x, (0, 0, half, half), mode="reflect"), column, groups=c)


def sobel(x: Tensor) -> tuple[Tensor, Tensor]:
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    kernels = torch.stack([kx, kx.T])[:, None]                                      # (2, 1, 3, 3)
    b, c, h, w = x.shape
    g = F.conv2d(F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate"), kernels)
    g = g.reshape(b, c, 2, h, w)
    return g[:, :, 0], g[:, :, 1]


def canny(image: Tensor, low: float, high: float, eps: float = 1e-6) -> Tensor:
    """Edges (B, 1, H, W) of 0 and 1 of an image (B, 1 | 3, H, W) in 0..1."""
    x = image.float()
    if x.shape[1] == 3:
        w = torch.tensor(GREY, dtype=x.dtype, device=x.device)
        x = torch.addcmul(torch.addcmul(x[:, 0:1] * w[0], x[:, 1:2], w[1]), x[:, 2:3], w[2])
    gx, gy = sobel(gaussian_blur(x))
    padded = torch.sqrt(F.pad(gx, (1, 1, 1, 1)) ** 2 + F.pad(gy, (1, 1, 1, 1)) ** 2 + eps)
    h, w = gx.shape[-2:]
    window = torch.stack([padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in OFFSETS], 2)
    magnitude = window[:, :, 8]
    direction = (torch.nan_to_num(torch.atan2(gy, gx)) * (4 / math.pi)).round()
    forward, backward = (direction % 8).long(), ((direction + 4) % 8).long()
    neighbours = torch.gather(window, 2, torch.stack([forward, backward], 2))

    def beats(neighbour: Tensor, d: Tensor) -> Tensor:
        return (magnitude > neighbour) | (((d == 0) | (d == 2)) & (magnitude == neighbour))

    keep = beats(neighbours[:, :, 0], forward) & beats(neighbours[:, :, 1], backward)
    keep &= magnitude > padded[..., :1, :1]                    # the zero-gradient floor √eps
    magnitude = magnitude * keep
    strong = magnitude > high
    weak = (magnitude > low) & ~strong
    while True:                                                # hysteresis
        grown = strong | (weak & (F.max_pool2d(strong.float(), 3, 1, 1) > 0))
        if torch.equal(grown, strong):
            return strong.to(image.dtype if image.is_floating_point() else torch.float32)
        strong = grown
