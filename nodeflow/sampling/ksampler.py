"""The public sampling entry points behind the KSampler and KSamplerAdvanced nodes.

    latent (raw VAE latent) ──process_latent_in──► x_T = latent + σ₀·noise  (√(1+σ₀²)·noise from σ_max)
        ──sampler(D, x_T, σ₀ … σ_N)──► x₀ ──process_latent_out──► LATENT

D is the CFG denoiser (``guidance.py``) wrapped, when the LATENT has a ``noise_mask``, so that
the model sees x·m + (L + σ·noise)·(1 − m) and its prediction becomes D·m + L·(1 − m), with L
the input latent and m the mask resized bilinearly to the latent (ComfyUI's KSamplerX0Inpaint).
A soft mask (0 < m < 1) therefore ends at m·D + (1 − m)·L, and the unmasked region (m = 0)
exactly where it started. Sampling runs on the model's device; noise is made on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nodeflow.sampling import handle
from nodeflow.sampling.guidance import CFGDenoiser, repeat_to_batch_size
from nodeflow.sampling.handle import ModelHandle
from nodeflow.sampling.model_sampling import DiscreteSchedule
from nodeflow.sampling.noise import prepare_noise
from nodeflow.sampling.registry import get_sampler
from nodeflow.sampling.schedules import SCHEDULER_NAMES, ksampler_sigmas

__all__ = ["MaskedDenoiser", "ksampler", "prepare_mask", "sample"]

ProgressCallback = Callable[[int, int, Tensor, Tensor], None]   # (step done, total, x, denoised)


def prepare_mask(mask: Tensor, shape, device) -> Tensor:
    """A MASK ([H, W] or [B, H, W], any size; 1 = change) as a [B, C, h, w] latent mask:
    bilinear resize, repeated over channels and to the batch."""
    mask = torch.as_tensor(mask).to(device=device, dtype=torch.float32)
    mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:]))
    if tuple(mask.shape[-2:]) != tuple(shape[-2:]):
        mask = F.interpolate(mask, size=tuple(shape[-2:]), mode="bilinear")
    return repeat_to_batch_size(mask.repeat(1, shape[1], 1, 1), shape[0])


class MaskedDenoiser:
    """Inpainting by noise mask: outside the mask (m = 0) the model input is the input latent
    noised to σ, and the prediction is the input latent itself."""

    def __init__(self, inner, latent_image: Tensor, noise: Tensor, mask: Tensor | None):
        self.inner, self.latent_image, self.noise, self.mask = inner, latent_image, noise, mask
        if mask is not None:                                  # the per-call constants, computed once
            self._keep = 1.0 - mask
            self._latent_kept = latent_image * self._keep

    def _input(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
        return x * self.mask + (self.latent_image + self.noise * s) * self._keep

    def _output(self, denoised: Tensor) -> Tensor:
        return denoised * self.mask + self._latent_kept

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        if self.mask is None:
            return self.inner(x, sigma, **kwargs)
        return self._output(self.inner(self._input(x, sigma), sigma, **kwargs))

    def denoise_with_uncond(self, x: Tensor, sigma: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        if self.mask is None:
            return self.inner.denoise_with_uncond(x, sigma, **kwargs)
        denoised, uncond = self.inner.denoise_with_uncond(self._input(x, sigma), sigma, **kwargs)
        return self._output(denoised), uncond


def fix_empty_latent_channels(model: ModelHandle, latent: Tensor) -> Tensor:
    """An all-zero latent with the wrong channel count (EmptyLatentImage for another family)
    becomes zeros of the model's latent channels."""
    channels = handle.latent_channels(model, latent.shape[1])
    if latent.shape[1] != channels and torch.count_nonzero(latent) == 0:
        return torch.zeros((latent.shape[0], channels) + tuple(latent.shape[2:]), dtype=latent.dtype)
    return latent


@torch.no_grad()
def sample(model: ModelHandle, noise: Tensor, positive, negative, *, cfg: float, sampler_name: str, scheduler: str,
           steps: int, latent_image: Tensor, denoise: float = 1.0, start_step: int | None = None,
           last_step: int | None = None, force_full_denoise: bool = False, disable_noise: bool = False,
           noise_mask: Tensor | None = None, seed: int = 0, callback: ProgressCallback | None = None, device=None,
           sigmas: Tensor | None = None) -> Tensor:
    """Sample a RAW latent (CPU, float32) — ComfyUI's ``comfy.sample.sample``.

    ``noise`` is the initial noise (``prepare_noise``); ``latent_image`` the RAW input latent
    (zeros for txt2img). ``denoise`` < 1 runs the tail of a longer schedule (img2img);
    ``start_step``/``last_step`` cut the schedule (KSamplerAdvanced), ``force_full_denoise``
    sets the last σ of a cut schedule to 0. ``callback(step, total, x, denoised)`` is called
    after each step (``step`` = steps done, 1 … total; x and denoised in the model's
    processed latent space) and may raise to interrupt. ``sigmas`` overrides the scheduler.
    """
    spec = get_sampler(sampler_name)
    if sigmas is None and scheduler not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULER_NAMES}")
    schedule = DiscreteSchedule.from_model(model)
    device = handle.device(model, device)
    latent_image = torch.as_tensor(latent_image).detach().to("cpu", torch.float32)

    if sigmas is None:
        sigmas = ksampler_sigmas(schedule, scheduler, steps, denoise, spec.discard_penultimate)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).detach().clone().cpu()
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1]
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return latent_image.clone()
        sigmas = sigmas[start_step:]
    if len(sigmas) == 0:
        return latent_image.clone()

    if disable_noise:
        noise = torch.zeros_like(latent_image)
    else:
        noise = torch.as_tensor(noise).detach().to("cpu", torch.float32)
    latent = model.process_latent_in(latent_image.to(device))
    noise_d = noise.to(device)
    mask = prepare_mask(noise_mask, latent.shape, device) if noise_mask is not None else None

    denoiser = CFGDenoiser(model, schedule, positive, negative, cfg, latent.shape, device,
                           latent_image=latent, denoise_mask=mask, seed=seed)
    inpaint_noise = noise_d
    if spec.inpaint_random_noise:      # ComfyUI's "ddim": masked areas are re-noised with fresh noise
        generator = torch.Generator("cpu").manual_seed((int(seed) + 1) & 0xFFFF_FFFF_FFFF_FFFF)
        inpaint_noise = torch.randn(noise.shape, generator=generator).to(device)
    model_k = MaskedDenoiser(denoiser, latent, inpaint_noise, mask)

    x = schedule.noise_scaling(sigmas[0], noise_d, latent, schedule.is_max_denoise(sigmas[0]))
    total = len(sigmas) - 1

    def on_step(info: dict) -> None:
        callback(int(info.get("step", info["i"] + 1)), total, info["x"], info["denoised"])

    options = {"schedule": schedule} if spec.needs_schedule else {}
    samples = spec.function(model_k, x, sigmas.to(device), extra_args={"seed": seed},
                            callback=on_step if callback is not None else None, **options)
    out = model.process_latent_out(samples.float()).float().cpu()
    if mask is not None and float(sigmas[-1]) == 0.0:
        # The last step already lands on the masked denoiser's blend m·D + (1 − m)·L, which
        # is ComfyUI's result (blending again would give m²·D + (1 − m²)·L in soft cells).
        # Only where m = 0 is the exact input restored: the sampler's arithmetic leaves
        # rounding there, and dpm_fast/dpm_adaptive stop at σ_min > 0. A schedule cut before
        # σ = 0 (return_with_leftover_noise) is returned as sampled, as in ComfyUI.
        out = torch.where(mask.cpu() == 0, latent_image, out)
    return out


def ksampler(model: ModelHandle, latent: dict, positive, negative, *, seed: int, steps: int, cfg: float,
             sampler_name: str, scheduler: str, denoise: float = 1.0, add_noise: bool = True, start_at_step: int = 0,
             end_at_step: int = 10000, return_with_leftover_noise: bool = False,
             callback: ProgressCallback | None = None, device=None) -> dict:
    """The KSampler / KSamplerAdvanced nodes: LATENT dict in, LATENT dict out (keeping
    ``noise_mask`` and ``batch_index``). KSampler is the defaults; KSamplerAdvanced sets
    ``add_noise``, ``start_at_step``, ``end_at_step`` and ``return_with_leftover_noise``."""
    latent_image = fix_empty_latent_channels(model, torch.as_tensor(latent["samples"]).detach().cpu().float())
    if add_noise:
        noise = prepare_noise(latent_image, seed, latent.get("batch_index"))
    else:
        noise = torch.zeros_like(latent_image)
    samples = sample(model, noise, positive, negative, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                     steps=steps, latent_image=latent_image, denoise=denoise, start_step=start_at_step,
                     last_step=end_at_step, force_full_denoise=not return_with_leftover_noise,
                     disable_noise=not add_noise, noise_mask=latent.get("noise_mask"), seed=seed,
                     callback=callback, device=device)
    out = dict(latent)
    out["samples"] = samples
    return out
