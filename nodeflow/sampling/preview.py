"""A cheap latent → RGB preview for live progress images: a fixed linear map of the 4 latent
channels (fitted to the VAE by the community; the same factors ComfyUI's "latent2rgb"
previewer uses), no decoder.

Input: the sampler's x₀ estimate in the model's *processed* latent space (the ``denoised``
of the progress callback), [B, 4, h, w]. Output: [B, h, w, 3] in 0 … 1 (an IMAGE, 1/8 size).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LATENT_RGB_FACTORS", "latent_to_rgb_preview"]

#: (4 × 3 matrix, RGB bias) per model family.
LATENT_RGB_FACTORS: dict[str, tuple[list[list[float]], list[float]]] = {
    "sd1": ([[0.3512, 0.2297, 0.3227],
             [0.3250, 0.4974, 0.2350],
             [-0.2829, 0.1762, 0.2721],
             [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0]),
    "sdxl": ([[0.3651, 0.4232, 0.4341],
              [-0.2533, -0.0042, 0.1068],
              [0.1076, 0.1111, -0.0362],
              [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
}
LATENT_RGB_FACTORS["sd2"] = LATENT_RGB_FACTORS["sd1"]


def latent_to_rgb_preview(x0: Tensor, family: str = "sd1") -> Tensor:
    """[B, 4, h, w] processed latent → [B, h, w, 3] float image in 0 … 1 (CPU). ``family``:
    "sd1", "sd2", "sdxl" (or a DiffusionModel.family such as "sd1_inpaint", "sdxl_refiner")."""
    base = family.replace("_inpaint", "").replace("_v", "").replace("_refiner", "")   # DiffusionModel.family
    try:
        factors, bias = LATENT_RGB_FACTORS[base]
    except KeyError:
        raise ValueError(f"no preview factors for family {family!r}; known: {sorted(LATENT_RGB_FACTORS)}") from None
    x0 = x0.detach().float()
    if x0.ndim == 3:
        x0 = x0.unsqueeze(0)
    matrix = torch.tensor(factors, dtype=torch.float32, device=x0.device)    # (4, 3)
    rgb = torch.einsum("bchw,cr->bhwr", x0, matrix) + torch.tensor(bias, device=x0.device)   # (B, h, w, 3)
    return ((rgb + 1.0) / 2.0).clamp(0, 1).cpu()
