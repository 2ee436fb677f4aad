"""unCLIP conditioning: CLIP image embeddings, noise-augmented, as the UNet's class vector.

SD 2.1 unCLIP (and SDXL's "revision", which puts them in place of the pooled text) feed the
label embedding ``y = [z, emb(k)]·s``: the image embedding e noised to level k of a cosine
("squaredcos_cap_v2") schedule, z = √ᾱ_k·e + √(1−ᾱ_k)·n, next to the sinusoidal embedding of k,
times the strength s; k = round(999 · noise_augmentation). The noise n is drawn from a CPU
generator seeded with the sampling seed − 10, as ComfyUI does. Several images (or several
unCLIPConditioning nodes) are summed and, for SD 2.1 unCLIP, noised again at level
round(999 · 0.05) (ComfyUI's ``unclip_noise_augment_merge``; SDXL: 0). ComfyUI draws that
second noise without a seed, from torch's global generator of the model's device, which its
seeded draws have just re-seeded with seed − 10 (``torch.manual_seed``): on the CPU it is the
next draw after the last embedding's noise, on a GPU the first draw of that device's generator
seeded with seed − 10. ``unclip_vector`` draws the same numbers from its own generators.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nodeflow.models.unet import timestep_embedding

MAX_NOISE_LEVEL = 1000


def squaredcos_alphas_cumprod(steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """ᾱ of the "squaredcos_cap_v2" schedule (float64): βᵢ = min(1 − f((i+1)/T)/f(i/T), 0.999),
    f(t) = cos²((t + 0.008)/1.008 · π/2)."""
    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.array([min(1 - f((i + 1) / steps) / f(i / steps), max_beta) for i in range(steps)])
    return np.cumprod(1.0 - betas, axis=0)


_ALPHAS = squaredcos_alphas_cumprod()
SQRT_ALPHAS = torch.tensor(np.sqrt(_ALPHAS), dtype=torch.float32)
SQRT_ONE_MINUS = torch.tensor(np.sqrt(1.0 - _ALPHAS), dtype=torch.float32)


def augment(embedding: torch.Tensor, level: int, seed: int | None = None,
            noise: torch.Tensor | None = None) -> torch.Tensor:
    """[z, emb(level)] (1, 2·D) for an embedding (D,) or (1, D), noised with ``noise`` or a draw
    from a CPU generator seeded with ``seed``."""
    x = embedding.reshape(1, -1).float().cpu()
    if noise is None:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        noise = torch.randn(x.shape, generator=generator)
    z = SQRT_ALPHAS[level] * x + SQRT_ONE_MINUS[level] * noise.reshape(x.shape).float().cpu()
    return torch.cat([z, timestep_embedding(torch.tensor([float(level)]), x.shape[1])], dim=1)


def merge_noise(shape: tuple, seed: int, device=None) -> torch.Tensor:
    """The noise ComfyUI's unseeded re-noising of merged embeddings gets (see the module notes):
    on the CPU the draw after one of ``shape`` from a generator seeded with ``seed``; on another
    device the first draw of that device's generator seeded with ``seed``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        generator = torch.Generator().manual_seed(seed)
        torch.randn(shape, generator=generator)                     # the last embedding's noise
        return torch.randn(shape, generator=generator)
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device).cpu()


def unclip_vector(unclip_conditioning: list[dict], seed: int, merge_level: float = 0.0, device=None) -> torch.Tensor:
    """The y vector (1, 2·D) of an entry's ``unclip_conditioning`` list; ``device``: where the
    model runs (it decides the noise of a merge, as in ComfyUI)."""
    parts = []
    for item in unclip_conditioning:
        level = round((MAX_NOISE_LEVEL - 1) * item["noise_augmentation"])
        for embedding in item["clip_vision_output"].image_embeds:
            parts.append(augment(embedding, level, seed - 10) * item["strength"])
    if len(parts) == 1:
        return parts[0]
    total = torch.stack(parts).sum(0)
    dim = total.shape[1] // 2
    # the merged vector is noised again, with the noise ComfyUI's unseeded draw gets
    noise = merge_noise((1, dim), seed - 10, device)
    return augment(total[:, :dim], round((MAX_NOISE_LEVEL - 1) * merge_level), noise=noise)
