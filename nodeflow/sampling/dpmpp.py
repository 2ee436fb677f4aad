"""Exponential-integrator samplers in data prediction (DPM-Solver++ and relatives).

With λ = −log σ (half log-SNR of an ε/v model in σ-space) the PF-ODE is linear in x apart
from the denoiser term, and its exact solution from σ_s to σ_t (h = λ_t − λ_s) is

    x_t = (σ_t/σ_s) · x_s + σ_t ∫_{λ_s}^{λ_t} e^λ D(x_λ, λ) dλ

so samplers differ in how they approximate D over the step: one value (first order =
DDIM), a midpoint (2S), past values (2M, 3M), with or without an SDE noise term that
replaces part of the deterministic decay e^{−h} by fresh noise (η > 0). Lu et al. 2022,
"DPM-Solver++: Fast solver for guided sampling of diffusion probabilistic models" (arXiv
2211.01095) and the papers named in each docstring.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nodeflow.sampling.samplers import lagrange_integrals
from nodeflow.sampling.steps import (
    ancestral_noise,
    brownian_noise,
    denoise_with_uncond,
    get_ancestral_step,
    report,
    split_extra_args,
    to_d,
)

__all__ = [
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2m_sde_gpu",
    "sample_dpmpp_2m_sde_heun",
    "sample_dpmpp_2m_sde_heun_gpu",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_3m_sde_gpu",
    "sample_dpmpp_sde",
    "sample_dpmpp_sde_gpu",
    "sample_er_sde",
    "sample_exp_heun_2_x0",
    "sample_exp_heun_2_x0_sde",
    "sample_res_multistep",
    "sample_res_multistep_ancestral",
    "sample_sa_solver",
    "sample_sa_solver_pece",
    "sample_seeds_2",
    "sample_seeds_3",
]


def _lam(sigma):
    """λ = −log σ."""
    return sigma.log().neg()


def _sigma(lam):
    """σ = e^{−λ}."""
    return lam.neg().exp()


def _phi_1(h):
    """h·φ₁(h) = e^h − 1."""
    return torch.expm1(h)


def _phi_2(h):
    """h·φ₂(h) = (e^h − 1 − h)/h."""
    return (torch.expm1(h) - h) / h


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                              eta=1.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(2S), ancestral: a second-order singlestep update (midpoint in λ) down to
    σ_down, then noise σ_up (Lu et al. 2022, Algorithm 1 with r = ½)."""
    seed, kwargs = split_extra_args(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            lam, lam_next = _lam(sigmas[i]), _lam(sigma_down)
            h = lam_next - lam
            lam_mid = lam + h / 2
            x_2 = (_sigma(lam_mid) / _sigma(lam)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma(lam_mid) * s_in, **kwargs)
            x = (_sigma(lam_next) / _sigma(lam)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                     eta=1.0, s_noise=1.0, noise_sampler=None, r=0.5, cpu_noise=True):
    """DPM-Solver++ (stochastic, Katherine Crowson's SDE variant of DPM-Solver++(2S)): two
    stages at λ_s + r·h and λ_t, each an ancestral exponential step with Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    seed, kwargs = split_extra_args(extra_args)
    noise = brownian_noise(x, sigmas, seed, noise_sampler, cpu=cpu_noise)
    s_in = x.new_ones([x.shape[0]])
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = _lam(sigmas[i]), _lam(sigmas[i + 1])
            h = lam_t - lam_s
            lam_s1 = lam_s + r * h
            sigma_s1 = _sigma(lam_s1)
            # stage 1: to λ_s + r·h
            sd, su = get_ancestral_step(_sigma(lam_s), sigma_s1, eta)
            h_ = _lam(sd) - lam_s
            x_2 = (-h_).exp() * x - (-h_).expm1() * denoised
            if eta > 0 and s_noise > 0:
                x_2 = x_2 + noise(sigmas[i], sigma_s1) * s_noise * su
            denoised_2 = model(x_2, sigma_s1 * s_in, **kwargs)
            # stage 2: to λ_t with the combined estimate
            sd, su = get_ancestral_step(_sigma(lam_s), _sigma(lam_t), eta)
            h_ = _lam(sd) - lam_s
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (-h_).exp() * x - (-h_).expm1() * denoised_d
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * su
        report(callback, i, x, sigmas, denoised)
    return x


def sample_dpmpp_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """dpmpp_sde with its Brownian noise drawn on the model's device."""
    return sample_dpmpp_sde(model, x, sigmas, extra_args, callback, disable, cpu_noise=False, **options)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep, D extrapolated
    linearly in λ from the previous step: D_d = (1 + 1/2r)·D_i − (1/2r)·D_{i−1}, r = h_{i−1}/h_i."""
    _, kwargs = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam, lam_next = _lam(sigmas[i]), _lam(sigmas[i + 1])
            h = lam_next - lam
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (lam - _lam(sigmas[i - 1])) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        eta=1.0, s_noise=1.0, noise_sampler=None, solver_type="midpoint", cpu_noise=True):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, §4 / appendix, data-prediction SDE solver):

        x_t = (σ_t/σ_s) e^{−ηh} x_s + (1 − e^{−(1+η)h}) D_s + correction + σ_t √(1 − e^{−2ηh}) z

    with the second-order correction from D_{s−1} ("midpoint" or "heun" form)."""
    if len(sigmas) <= 1:
        return x
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    seed, kwargs = split_extra_args(extra_args)
    noise = brownian_noise(x, sigmas, seed, noise_sampler, cpu=cpu_noise)
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _lam(sigmas[i + 1]) - _lam(sigmas[i])
            h_eta = h * (eta + 1)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
        report(callback, i, x, sigmas, denoised)
    return x


def sample_dpmpp_2m_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, cpu_noise=False, **options)


def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, solver_type="heun", **options)


def sample_dpmpp_2m_sde_heun_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, solver_type="heun",
                               cpu_noise=False, **options)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        eta=1.0, s_noise=1.0, noise_sampler=None, cpu_noise=True):
    """DPM-Solver++(3M) SDE: the 2M SDE step with a quadratic (third-order) extrapolation of
    D from the two previous steps, using φ₂ and φ₃ of −(1+η)h."""
    if len(sigmas) <= 1:
        return x
    seed, kwargs = split_extra_args(extra_args)
    noise = brownian_noise(x, sigmas, seed, noise_sampler, cpu=cpu_noise)
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _lam(sigmas[i + 1]) - _lam(sigmas[i])
            h_eta = h * (eta + 1)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        report(callback, i, x, sigmas, denoised)
    return x


def sample_dpmpp_3m_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    return sample_dpmpp_3m_sde(model, x, sigmas, extra_args, callback, disable, cpu_noise=False, **options)


# -- RES, SEEDS, ER-SDE, SA-Solver ------------------------------------------------------------------

def _res_multistep(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, cfg_pp=False):
    """Shared body of res_multistep (and its ancestral / CFG++ forms)."""
    seed, kwargs = split_extra_args(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    old_sigma_down, old_denoised = None, None
    for i in range(len(sigmas) - 1):
        if cfg_pp:
            denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, **kwargs)
        else:
            denoised = uncond = model(x, sigmas[i] * s_in, **kwargs)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:
                x = denoised + to_d(x, sigmas[i], uncond) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            lam, lam_old, lam_next = _lam(sigmas[i]), _lam(old_sigma_down), _lam(sigma_down)
            lam_prev = _lam(sigmas[i - 1])
            h = lam_next - lam
            c2 = (lam_prev - lam_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond)
                x = _sigma(h) * x + h * (b1 * uncond + b2 * old_denoised)
            else:
                x = _sigma(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised = uncond if cfg_pp else denoised
        old_sigma_down = sigma_down
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None,
                         s_noise=1.0, noise_sampler=None):
    """RES second-order multistep (Zhang et al. 2023, "Improved order analysis and design of
    exponential integrator for diffusion models", arXiv:2308.02157): the exponential
    integrator with b₁ = φ₁ − φ₂/c₂, b₂ = φ₂/c₂ weighting the current and previous D."""
    return _res_multistep(model, x, sigmas, extra_args, callback, 0.0, s_noise, noise_sampler)


@torch.no_grad()
def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                   eta=1.0, s_noise=1.0, noise_sampler=None):
    """RES multistep with ancestral steps (down to σ_down, noise σ_up)."""
    return _res_multistep(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_seeds_2(model, x, sigmas, extra_args=None, callback=None, disable=None,
                   eta=1.0, s_noise=1.0, noise_sampler=None, r=0.5, solver_type="phi_1"):
    """SEEDS-2 (Gonzalez et al. 2023, "SEEDS: Exponential SDE solvers for fast high-quality
    sampling from diffusion models", arXiv:2305.14267): a two-stage stochastic exponential
    Runge–Kutta step in data prediction; the stage noise is reused (scaled) in the final
    stage so both stages see one Brownian path."""
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")
    seed, kwargs = split_extra_args(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    inject = eta > 0 and s_noise > 0
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        if sigmas[i + 1] == 0:
            x = denoised
            report(callback, i, x, sigmas, denoised)
            continue
        lam_s, lam_t = _lam(sigmas[i]), _lam(sigmas[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        sigma_s1 = _sigma(torch.lerp(lam_s, lam_t, r))
        x_2 = sigma_s1 / sigmas[i] * (-r * h * eta).exp() * x - _phi_1(-r * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_s1)
            x_2 = x_2 + sde_noise * sigma_s1 * s_noise
        denoised_2 = model(x_2, sigma_s1 * s_in, **kwargs)
        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, 1 / (2 * r))
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - _phi_1(-h_eta) * denoised_d
        else:
            b2 = _phi_2(-h_eta) / r
            b1 = _phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - (b1 * denoised + b2 * denoised_2)
        if inject:
            segment = (r - 1) * h * eta
            sde_noise = sde_noise * segment.exp() + segment.mul(2).expm1().neg().sqrt() * noise(sigma_s1, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_exp_heun_2_x0(model, x, sigmas, extra_args=None, callback=None, disable=None, solver_type="phi_2"):
    """Deterministic exponential Heun (second order, data prediction, λ time): SEEDS-2 with
    r = 1 and η = 0."""
    return sample_seeds_2(model, x, sigmas, extra_args, callback, disable, eta=0.0, s_noise=0.0, r=1.0,
                          solver_type=solver_type)


@torch.no_grad()
def sample_exp_heun_2_x0_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                             eta=1.0, s_noise=1.0, noise_sampler=None, solver_type="phi_2"):
    """Stochastic exponential Heun: SEEDS-2 with r = 1."""
    return sample_seeds_2(model, x, sigmas, extra_args, callback, disable, eta=eta, s_noise=s_noise,
                          noise_sampler=noise_sampler, r=1.0, solver_type=solver_type)


@torch.no_grad()
def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None,
                   eta=1.0, s_noise=1.0, noise_sampler=None, r_1=1.0 / 3, r_2=2.0 / 3):
    """SEEDS-3 (Gonzalez et al. 2023): the three-stage stochastic exponential Runge–Kutta
    step (stages at λ_s + r₁h and λ_s + r₂h)."""
    seed, kwargs = split_extra_args(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    inject = eta > 0 and s_noise > 0
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        if sigmas[i + 1] == 0:
            x = denoised
            report(callback, i, x, sigmas, denoised)
            continue
        lam_s, lam_t = _lam(sigmas[i]), _lam(sigmas[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        sigma_s1 = _sigma(torch.lerp(lam_s, lam_t, r_1))
        sigma_s2 = _sigma(torch.lerp(lam_s, lam_t, r_2))
        # stage 1
        x_2 = sigma_s1 / sigmas[i] * (-r_1 * h * eta).exp() * x - _phi_1(-r_1 * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_s1)
            x_2 = x_2 + sde_noise * sigma_s1 * s_noise
        denoised_2 = model(x_2, sigma_s1 * s_in, **kwargs)
        # stage 2
        a3_2 = r_2 / r_1 * _phi_2(-r_2 * h_eta)
        a3_1 = _phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s2 / sigmas[i] * (-r_2 * h * eta).exp() * x - (a3_1 * denoised + a3_2 * denoised_2)
        if inject:
            segment = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * segment.exp() + segment.mul(2).expm1().neg().sqrt() * noise(sigma_s1, sigma_s2)
            x_3 = x_3 + sde_noise * sigma_s2 * s_noise
        denoised_3 = model(x_3, sigma_s2 * s_in, **kwargs)
        # stage 3
        b3 = _phi_2(-h_eta) / r_2
        b1 = _phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - (b1 * denoised + b3 * denoised_3)
        if inject:
            segment = (r_2 - 1) * h * eta
            sde_noise = sde_noise * segment.exp() + segment.mul(2).expm1().neg().sqrt() * noise(sigma_s2, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
        report(callback, i, x, sigmas, denoised)
    return x


def _er_sde_noise_scaler(x):
    """ER-SDE's default noise-scale function f(x) = x (e^{x^0.3} + 10)."""
    return x * ((x ** 0.3).exp() + 10.0)


@torch.no_grad()
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                  s_noise=1.0, noise_sampler=None, noise_scaler=None, max_stage=3):
    """ER-SDE-Solver-3 (Cui et al. 2023, "Elucidating the solution space of extended
    reverse-time SDE for diffusion models", arXiv:2309.06169), VE form in σ: a first-order
    step x_t = r·x_s + (1 − r)·D with r = f(σ_t)/f(σ_s), plus second/third-order Taylor
    terms of D whose integrals are taken numerically (200 points)."""
    seed, kwargs = split_extra_args(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    scaler = _er_sde_noise_scaler if noise_scaler is None else noise_scaler
    n_points = 200.0
    point_index = torch.arange(0, n_points, dtype=torch.float32, device=x.device)
    s_in = x.new_ones([x.shape[0]])
    old_denoised, old_denoised_d = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            s, t = sigmas[i], sigmas[i + 1]
            r = scaler(t) / scaler(s)
            x = r * x + (1 - r) * denoised
            if stage >= 2:
                dt = t - s
                step = -dt / n_points
                positions = t + point_index * step
                scaled = scaler(positions)
                integral_1 = torch.sum(1 / scaled) * step
                denoised_d = (denoised - old_denoised) / (s - sigmas[i - 1])
                x = x + (dt + integral_1 * scaler(t)) * denoised_d
                if stage >= 3:
                    integral_2 = torch.sum((positions - s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((s - sigmas[i - 2]) / 2)
                    x = x + ((dt ** 2) / 2 + integral_2 * scaler(t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                spread = (t ** 2 - s ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
                x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * spread
        old_denoised = denoised
        report(callback, i, x, sigmas, denoised)
    return x


def _sa_coefficients(lambdas: list[float], lam_s: float, lam_t: float, tau: float, sigma_t: float) -> list[float]:
    """SA-Solver's b_j (Xue et al. 2023, eqs. 15/18, data prediction): the Lagrange basis on
    ``lambdas`` integrated against the SDE's exponential kernel,

        b_j = σ_t e^{λ_t} · (1+τ²) ∫_{λ_s}^{λ_t} e^{−(1+τ²)(λ_t − λ)} ℓ_j(λ) dλ."""
    k = 1.0 + tau ** 2
    weight = lambda lam: k * np.exp(-k * (lam_t - lam))                  # noqa: E731
    integrals = lagrange_integrals(lambdas, lam_s, lam_t, weight=weight)
    alpha_t = sigma_t * math.exp(lam_t)
    return [alpha_t * v for v in integrals]


@torch.no_grad()
def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, tau_func=None,
                     s_noise=1.0, noise_sampler=None, predictor_order=3, corrector_order=4, use_pece=False,
                     schedule=None):
    """SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams solver for fast sampling of
    diffusion models", arXiv:2309.05019): stochastic Adams–Bashforth predictor and
    Adams–Moulton corrector in λ, noise strength τ = 1 for σ between the 20 % and 80 % points
    of the schedule and 0 outside. ``use_pece`` re-evaluates the model after each correction."""
    if len(sigmas) <= 1:
        return x
    seed, kwargs = split_extra_args(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    if tau_func is None:
        if schedule is not None:
            start_sigma, end_sigma = schedule.percent_to_sigma(0.2), schedule.percent_to_sigma(0.8)
        else:
            start_sigma, end_sigma = float("inf"), 0.0
        tau_func = lambda sigma: 1.0 if start_sigma >= float(sigma) >= end_sigma else 0.0  # noqa: E731
    sig = [float(s) for s in sigmas]
    lambdas = [-math.log(s) if s > 0 else float("inf") for s in sig]
    max_order = max(predictor_order, corrector_order)
    lower_order_to_end = sig[-1] == 0
    x_pred = x
    h, tau_t, last_noise = 0.0, 0.0, 0.0
    preds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i] * s_in, **kwargs)
        preds = (preds + [denoised])[-max_order:]
        p_order = min(predictor_order, len(preds))
        c_order = 0 if i == 0 or (sig[i + 1] == 0 and not use_pece) else min(corrector_order, len(preds))
        if lower_order_to_end:
            p_order = min(p_order, len(sigmas) - 2 - i)
            c_order = min(c_order, len(sigmas) - 1 - i)
        # corrector (implicit Adams through the new value D_i)
        if c_order == 0:
            x = x_pred
        else:
            b = _sa_coefficients(lambdas[i - c_order + 1:i + 1], lambdas[i - 1], lambdas[i], tau_t, sig[i])
            x = sig[i] / sig[i - 1] * math.exp(-(tau_t ** 2) * h) * x + sum(c * d for c, d in zip(b, preds[-c_order:]))
            if tau_t > 0 and s_noise > 0:
                x = x + last_noise
            if use_pece:
                denoised = model(x, sigmas[i] * s_in, **kwargs)
                preds[-1] = denoised
        # predictor (explicit Adams)
        if sig[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            b = _sa_coefficients(lambdas[i - p_order + 1:i + 1], lambdas[i], lambdas[i + 1], tau_t, sig[i + 1])
            h = lambdas[i + 1] - lambdas[i]
            x_pred = (sig[i + 1] / sig[i] * math.exp(-(tau_t ** 2) * h) * x
                      + sum(c * d for c, d in zip(b, preds[-p_order:])))
            if tau_t > 0 and s_noise > 0:
                last_noise = (noise(sigmas[i], sigmas[i + 1]) * sig[i + 1]
                              * math.sqrt(-math.expm1(-2 * tau_t ** 2 * h)) * s_noise)
                x_pred = x_pred + last_noise
        report(callback, i, x_pred, sigmas, denoised)
    return x_pred


@torch.no_grad()
def sample_sa_solver_pece(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """SA-Solver in PECE mode (predict, evaluate, correct, evaluate)."""
    return sample_sa_solver(model, x, sigmas, extra_args, callback, disable, use_pece=True, **options)
