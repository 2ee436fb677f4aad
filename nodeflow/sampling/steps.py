"""Building blocks shared by the sampler modules.

A *denoiser* (``model``) is any callable ``model(x, sigma, **kwargs) -> D(x, σ)`` where x is
[B, …] in σ-space (x = x₀ + σ·ε), ``sigma`` is a [B] vector and D the denoised estimate of x₀.
A sampler walks a decreasing schedule ``sigmas`` (usually ending in 0):

    def sample_xxx(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x

``extra_args`` holds ``seed`` (for per-step noise) and keyword arguments for the model;
``callback(info)`` is called after every step with a dict holding ``i`` (the step just
done, from 0), ``x`` (the state after it), ``sigma``, ``sigma_next`` and ``denoised``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nodeflow.sampling.noise import BrownianTreeNoiseSampler, default_noise_sampler

Denoiser = Callable[..., Tensor]
Callback = Callable[[dict], None]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims to v until it has ``ndim`` dims."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dσ = (x − D(x, σ)) / σ (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / append_dims(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x.ndim)


def get_ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0):
    """Split a step σ_from → σ_to of ancestral sampling into a deterministic step down to
    σ_down and fresh noise of std σ_up, with σ_down² + σ_up² = σ_to²:

        σ_up = min(σ_to, η · √(σ_to² (σ_from² − σ_to²) / σ_from²)),   σ_down = √(σ_to² − σ_up²)

    (η = 1 is DDPM's posterior variance, η = 0 deterministic.)"""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def split_extra_args(extra_args: dict | None) -> tuple[int | None, dict]:
    """(seed, keyword arguments for the model) from a sampler's ``extra_args``."""
    extra_args = {} if extra_args is None else dict(extra_args)
    seed = extra_args.pop("seed", None)
    return seed, extra_args


def ancestral_noise(x: Tensor, seed, noise_sampler=None):
    """The noise source of ancestral samplers: ``noise_sampler`` or ComfyUI's default."""
    return default_noise_sampler(x, seed=seed) if noise_sampler is None else noise_sampler


def brownian_noise(x: Tensor, sigmas: Tensor, seed, noise_sampler=None, cpu: bool = True):
    """The noise source of the DPM-Solver++ SDE samplers: a Brownian tree over
    [min positive σ, max σ] (``cpu=False`` for the ``_gpu`` variants)."""
    if noise_sampler is not None:
        return noise_sampler
    positive = sigmas[sigmas > 0]
    return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=seed, cpu=cpu, sigmas=sigmas)


def denoise_with_uncond(model: Denoiser, x: Tensor, sigma: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
    """(guided D, unconditional D) for CFG++ samplers. A denoiser without classifier-free
    guidance is its own unconditional prediction."""
    both = getattr(model, "denoise_with_uncond", None)
    if both is not None:
        return both(x, sigma, **kwargs)
    denoised = model(x, sigma, **kwargs)
    return denoised, denoised


def report(callback: Callback | None, i: int, x: Tensor, sigmas: Tensor, denoised: Tensor, **more) -> None:
    """Call ``callback`` after step i (it may raise to interrupt sampling)."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised, **more})
