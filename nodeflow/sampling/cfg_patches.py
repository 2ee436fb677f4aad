"""Guidance beyond plain CFG, as model patches (``nodeflow.models.model_patches``), each with
ComfyUI's formula and order of operations. D_c, D_u: the positive and negative predictions
of the clean latent; x the noisy input; s the guidance scale.

- RescaleCFG (Lin et al. 2024, "Common diffusion noise schedules…", §3.4): guidance in
  v-space, v_cfg = v_u + s·(v_c − v_u), rescaled towards the positive's spread:
  v = φ·v_cfg·std(v_c)/std(v_cfg) + (1 − φ)·v_cfg.
- Perp-Neg (Armandpour et al. 2023): the negative counts only through its part orthogonal
  to the positive, both taken against an empty prompt's prediction D_∅:
  D = D_∅ + s·(p − w·(n − ⟨n, p⟩/‖p‖²·p)), p = D_c − D_∅, n = D_u − D_∅.
- Perturbed-Attention Guidance (Ahn et al. 2024): D += w·(D_c − D_pag), D_pag the positive
  prediction with the middle block's self-attention replaced by the identity (out = v).
- Self-Attention Guidance (Hong et al. 2023): the negative prediction is blurred where the
  middle block's self-attention concentrates, re-noised and predicted again:
  D += w·(D̃ − D(D̃ + x − D_u)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nodeflow.models.model_patches import ModelPatches


def rescale_cfg(multiplier: float):
    """A CFG function (returns x − D) for RescaleCFG."""

    def cfg_function(args: dict) -> Tensor:
        x = args["input"]
        sigma = args["sigma"].reshape((-1,) + (1,) * (x.ndim - 1))
        cond_eps, uncond_eps, scale = args["cond"], args["uncond"], args["cond_scale"]
        # v-prediction of each side: v = (x/(σ²+1) − (x − ε·…)) · √(σ²+1)/σ, from x − D
        x_v = x / (sigma * sigma + 1.0)
        v_c = (x_v - (x - cond_eps)) * (sigma ** 2 + 1.0) ** 0.5 / sigma
        v_u = (x_v - (x - uncond_eps)) * (sigma ** 2 + 1.0) ** 0.5 / sigma
        v_cfg = v_u + scale * (v_c - v_u)
        dims = tuple(range(1, x.ndim))
        rescaled = v_cfg * (torch.std(v_c, dim=dims, keepdim=True) / torch.std(v_cfg, dim=dims, keepdim=True))
        v = multiplier * rescaled + (1.0 - multiplier) * v_cfg
        return x - (x_v - v * sigma / (sigma * sigma + 1.0) ** 0.5)

    return cfg_function


def perp_neg(noise_pos: Tensor, noise_neg: Tensor, noise_empty: Tensor, neg_scale: float, cond_scale: float) -> Tensor:
    """Perp-Neg's combination (the inner product over the whole batch, as ComfyUI takes it)."""
    pos = noise_pos - noise_empty
    neg = noise_neg - noise_empty
    perp = neg - (torch.mul(neg, pos).sum() / torch.norm(pos) ** 2) * pos
    return noise_empty + cond_scale * (pos - perp * neg_scale)


def perp_neg_cfg(empty_conditioning, neg_scale: float):
    """A CFG function for Perp-Neg: D_∅ from ``empty_conditioning``, prepared as a negative."""

    def cfg_function(args: dict) -> Tensor:
        denoiser, x = args["denoiser"], args["input"]
        empty = denoiser.predict(denoiser.prepare(empty_conditioning, negative=True), x, args["sigma"])
        return x - perp_neg(args["cond_denoised"], args["uncond_denoised"], empty, neg_scale, args["cond_scale"])

    return cfg_function


def perturbed_attention(scale: float):
    """A post-CFG function for PAG (the middle block's self-attention becomes the identity)."""
    identity = ModelPatches()
    identity.set_attention_replace("attn1", lambda q, k, v, info: v, "middle", 0)

    def post_cfg(args: dict) -> Tensor:
        if scale == 0:
            return args["denoised"]
        pag = args["denoiser"].predict(args["cond"], args["input"], args["sigma"], identity)
        return args["denoised"] + (args["cond_denoised"] - pag) * scale

    return post_cfg


def attention_with_scores(q: Tensor, k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """(attention output (B, T, h·d), softmaxed scores (B·heads, T, S))."""
    B, T, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(B, -1, heads, d).permute(0, 2, 1, 3).reshape(B * heads, -1, d) for t in (q, k, v))
    sim = (torch.einsum("bid,bjd->bij", q, k) * d ** -0.5).softmax(dim=-1)    # (B·heads, T, S)
    out = torch.einsum("bij,bjd->bid", sim.to(v.dtype), v)
    return out.reshape(B, heads, -1, d).permute(0, 2, 1, 3).reshape(B, -1, heads * d), sim


def gaussian_blur_2d(img: Tensor, kernel_size: int, sigma: float) -> Tensor:
    half = (kernel_size - 1) * 0.5
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, steps=kernel_size) / sigma).pow(2))
    kernel = (pdf / pdf.sum()).to(device=img.device, dtype=img.dtype)
    kernel2d = torch.mm(kernel[:, None], kernel[None, :]).expand(img.shape[-3], 1, kernel_size, kernel_size)
    img = F.pad(img, [kernel_size // 2] * 4, mode="reflect")
    return F.conv2d(img, kernel2d, groups=img.shape[-3])


def blur_where_attended(x0: Tensor, attn: Tensor, sigma: float, threshold: float = 1.0) -> Tensor:
    """x0 blurred (9×9 Gaussian) where the summed attention each key receives, averaged over
    heads, exceeds ``threshold``; the key grid's shape is found from the latent's aspect."""
    _, hw1, hw2 = attn.shape
    b, _, lh, lw = x0.shape
    mask = attn.reshape(b, -1, hw1, hw2).mean(1).sum(1) > threshold            # (b, keys)
    total = mask.shape[-1]
    rows = round(math.sqrt((lh / lw) * total))
    found = None
    for i in range(math.floor(math.sqrt(total) / 2)):
        for j in (rows + i, max(1, rows - i)):
            if total % j == 0:
                found = j
                break
        if found is not None:
            break
    mask = mask.reshape(b, found, total // found).unsqueeze(1).type(attn.dtype)
    mask = F.interpolate(mask, (lh, lw))
    blurred = gaussian_blur_2d(x0, kernel_size=9, sigma=sigma)
    return blurred * mask + x0 * (1 - mask)


def self_attention_guidance(scale: float, blur_sigma: float) -> ModelPatches:
    """Patches for SAG: the first self-attention of the middle block records the negative's
    attention scores, and a post-CFG function uses them (needs the negative even at cfg 1)."""
    recorded: dict[str, Tensor] = {}

    def record(q: Tensor, k: Tensor, v: Tensor, info: dict) -> Tensor:
        flags = info["cond_or_uncond"]
        heads = info["n_heads"]
        if 1 not in flags:
            from nodeflow.models.unet import attention

            return attention(q, k, v, heads)
        out, sim = attention_with_scores(q, k, v, heads)
        rows = heads * (q.shape[0] // len(flags))
        i = flags.index(1)
        recorded["scores"] = sim[rows * i:rows * (i + 1)]
        return out

    def post_cfg(args: dict) -> Tensor:
        result = args["denoised"]
        scores = recorded.get("scores")
        if min(result.shape[2:]) <= 4 or scores is None or not args["uncond"]:
            return result                              # too small to pad for the blur
        x, uncond_pred = args["input"], args["uncond_denoised"]
        degraded = blur_where_attended(uncond_pred, scores, blur_sigma, 1.0)
        sag = args["denoiser"].predict(args["uncond"], degraded + x - uncond_pred, args["sigma"])
        return result + (degraded - sag) * scale

    patches = ModelPatches()
    patches.set_attention_replace("attn1", record, "middle", 0, 0)
    patches.add_post_cfg_function(post_cfg, disable_cfg1_optimization=True)
    return patches
