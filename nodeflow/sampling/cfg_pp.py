"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained classifier free guidance
for diffusion models", arXiv:2406.08070).

Classifier-free guidance extrapolates D_c + w (D_c − D_u); CFG++ keeps that guided estimate
for the "denoise" half of a step but re-noises along the *unconditional* direction
(x − D_u)/σ, which stays on the data manifold at much lower guidance scales (≈ 0.5–1.5 here,
not 5–10). The denoiser must expose ``denoise_with_uncond`` (the CFG denoiser does; without
guidance D_u = D and these reduce to the plain samplers). As in ComfyUI, the unconditional
pass runs even at cfg = 1.
"""

from __future__ import annotations

import torch

from nodeflow.sampling.dpmpp import _lam, _res_multistep, _sigma
from nodeflow.sampling.steps import (
    ancestral_noise,
    denoise_with_uncond,
    get_ancestral_step,
    report,
    split_extra_args,
    to_d,
)

__all__ = [
    "sample_dpmpp_2m_cfg_pp",
    "sample_dpmpp_2s_ancestral_cfg_pp",
    "sample_euler_ancestral_cfg_pp",
    "sample_euler_cfg_pp",
    "sample_gradient_estimation_cfg_pp",
    "sample_res_multistep_ancestral_cfg_pp",
    "sample_res_multistep_cfg_pp",
]


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                  eta=1.0, s_noise=1.0, noise_sampler=None):
    """Euler ancestral, CFG++: x = D_guided + σ_down · (x − D_u)/σ, then noise σ_up."""
    seed, kwargs = split_extra_args(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, **kwargs)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], uncond)
            sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
            x = denoised + sigma_down * d
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler, CFG++ (the DDIM form of Chung et al., Algorithm 1): x = D_guided + σ_{i+1}·(x − D_u)/σ_i."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args, callback, disable, eta=0.0, s_noise=0.0)


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                     eta=1.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(2S) ancestral, CFG++: both stages follow D_u; the guidance difference
    D_guided − D_u of the step's first evaluation is added at the end."""
    seed, kwargs = split_extra_args(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, **kwargs)
        guidance = denoised - uncond
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], uncond) * (sigma_down - sigmas[i])
        else:
            lam, lam_next = _lam(sigmas[i]), _lam(sigma_down)
            h = lam_next - lam
            lam_mid = lam + h / 2
            x_2 = (_sigma(lam_mid) / _sigma(lam)) * x - (-h / 2).expm1() * uncond
            _, uncond_2 = denoise_with_uncond(model, x_2, _sigma(lam_mid) * s_in, **kwargs)
            x = (_sigma(lam_next) / _sigma(lam)) * x - (-h).expm1() * uncond_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        x = x + guidance
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M), CFG++: x = D_guided + e^{−h}(x − D_u) with the 2M correction
    −(e^{−h} − 1)/(2r) · (D_guided − D_u,prev)."""
    _, kwargs = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    old_uncond = None
    for i in range(len(sigmas) - 1):
        denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, **kwargs)
        lam, lam_next = _lam(sigmas[i]), _lam(sigmas[i + 1])
        h = lam_next - lam
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            mix = -torch.exp(-h) * uncond
            if old_uncond is not None:
                r = (lam - _lam(sigmas[i - 1])) / h
                mix = mix - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
            x = denoised + mix + torch.exp(-h) * x
        old_uncond = uncond
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_res_multistep_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                s_noise=1.0, noise_sampler=None):
    """RES multistep, CFG++."""
    return _res_multistep(model, x, sigmas, extra_args, callback, 0.0, s_noise, noise_sampler, cfg_pp=True)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                          eta=1.0, s_noise=1.0, noise_sampler=None):
    """RES multistep ancestral, CFG++."""
    return _res_multistep(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, cfg_pp=True)


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.0):
    """Gradient estimation, CFG++: x = D_guided + σ_{i+1} d_u + (γ − 1)(d_u − d_u,prev)(σ_{i+1} − σ_i)."""
    _, kwargs = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, **kwargs)
        d = to_d(x, sigmas[i], uncond)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1]
            if old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * (sigmas[i + 1] - sigmas[i])
        old_d = d
        report(callback, i, x, sigmas, denoised)
    return x
