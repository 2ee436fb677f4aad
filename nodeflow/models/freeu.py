"""FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net") as a UNet output-block patch.

Before the output blocks of the two deepest widths (4× and 2× the first level's), the backbone
features h are amplified and the skip features s damped at their lowest frequencies:

    h[:, :C/2] ← b · h[:, :C/2]                      (FreeU)
    h[:, :C/2] ← ((b − 1) · ĥ + 1) · h[:, :C/2]      (FreeU v2; ĥ: the channel mean of h, min-max
                                                       normalised over each image)
    s ← IFFT( FFT(s) · m ),  m = s_scale inside the central 2×2 of the shifted spectrum, else 1

with (b, s_scale) = (b1, s1) at 4× the model width and (b2, s2) at 2×, as ComfyUI does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fourier_filter(x: Tensor, threshold: int, scale: float) -> Tensor:
    """x with its centred (2·threshold)² lowest spatial frequencies multiplied by ``scale``."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    B, C, H, W = freq.shape
    mask = torch.ones((B, C, H, W), device=x.device)
    crow, ccol = H // 2, W // 2
    mask[..., crow - threshold:crow + threshold, ccol - threshold:ccol + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


def freeu_patch(model_channels: int, b1: float, b2: float, s1: float, s2: float, version: int = 1):
    """An ``output_block`` patch ``fn(h, skip, info) -> (h, skip)``."""
    scales = {model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}

    def patch(h: Tensor, skip: Tensor, info: dict) -> tuple[Tensor, Tensor]:
        found = scales.get(int(h.shape[1]))
        if found is None:
            return h, skip
        b, s = found
        half = h.shape[1] // 2
        h = h.clone()
        if version == 1:
            h[:, :half] = h[:, :half] * b
        else:
            mean = h.mean(1, keepdim=True)                                     # (B, 1, H, W)
            flat = mean.view(mean.shape[0], -1)
            lo, hi = flat.min(dim=-1).values, flat.max(dim=-1).values
            mean = (mean - lo[:, None, None, None]) / (hi - lo)[:, None, None, None]
            h[:, :half] = h[:, :half] * ((b - 1) * mean + 1)
        if skip.device.type == "mps":           # no FFT there: filter on the CPU
            return h, fourier_filter(skip.cpu(), 1, s).to(skip.device)
        return h, fourier_filter(skip, 1, s)

    patch.compile_key = ("freeu", version, model_channels, b1, b2, s1, s2)    # pure tensor maths: compilable
    return patch
