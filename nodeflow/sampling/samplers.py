"""Samplers that integrate the probability-flow ODE in σ (Karras et al. 2022, eq. 3)

    dx/dσ = d(x, σ) = (x − D(x, σ)) / σ

with one-step (Euler, Heun, DPM-2), linear multistep (LMS, iPNDM, DEIS) or ancestral
(noise-injecting) updates, plus the DDPM/DDIM/LCM steps written in the same σ-space.
The shared signature and callback are described in ``nodeflow.sampling.steps``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nodeflow.sampling.steps import (
    ancestral_noise,
    default_noise_sampler,
    get_ancestral_step,
    report,
    split_extra_args,
    to_d,
)

__all__ = [
    "sample_ddim",
    "sample_ddpm",
    "sample_deis",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_gradient_estimation",
    "sample_heun",
    "sample_heunpp2",
    "sample_ipndm",
    "sample_ipndm_v",
    "sample_lcm",
    "sample_lms",
]


def _churn(x, sigma, n_steps, s_churn, s_tmin, s_tmax, s_noise, noise):
    """Karras et al. Algorithm 2, lines 4–6: raise σ to σ̂ = σ(1 + γ) by adding fresh noise."""
    gamma = min(s_churn / n_steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise(sigma, sigma_hat) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler's method on the PF-ODE: Karras et al. (2022) Algorithm 2 with first-order steps,
    x_{i+1} = x_i + (σ_{i+1} − σ̂_i) · d(x_i, σ̂_i)."""
    seed, kwargs = split_extra_args(extra_args)
    noise = default_noise_sampler(x, seed) if s_churn > 0 else None
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        if s_churn > 0:
            x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = model(x, sigma_hat * s_in, **kwargs)
        d = to_d(x, sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    """Ancestral sampling with Euler steps: an Euler step down to σ_down, then fresh noise of
    std σ_up (Ho et al. 2020's reverse process seen in σ-space; see get_ancestral_step)."""
    seed, kwargs = split_extra_args(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i]) + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's method (explicit trapezoid), Karras et al. (2022) Algorithm 2: an Euler
    predictor, then the average of the slopes at both ends; Euler for the last step to 0."""
    seed, kwargs = split_extra_args(extra_args)
    noise = default_noise_sampler(x, seed) if s_churn > 0 else None
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        if s_churn > 0:
            x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = model(x, sigma_hat * s_in, **kwargs)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **kwargs))
            x = x + (d + d_2) / 2 * dt
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Heun++ (Carzit's sd-webui-samplers-scheduler): like Heun, but looks two steps ahead
    and weights the slopes d(σ_i), d(σ_{i+1}), d(σ_{i+2}) by 1 − w₂ − w₃, w₂ = σ_{i+1}/(3σ₀),
    w₃ = σ_{i+2}/(3σ₀) (two-slope Heun with w₂ = σ_{i+1}/(2σ₀) one step before the end,
    Euler on the last step)."""
    _, kwargs = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **kwargs))
            w_2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w_2) + d_2 * w_2) * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **kwargs))
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in, **kwargs))
            w_2, w_3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w_2 - w_3) * d + w_2 * d_2 + w_3 * d_3) * dt
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2 in σ (Lu et al. 2022 with Karras et al.'s Algorithm 2 framing): the slope
    at the log-σ midpoint σ_mid = √(σ̂_i σ_{i+1}) carries the whole step (midpoint method)."""
    seed, kwargs = split_extra_args(extra_args)
    noise = default_noise_sampler(x, seed) if s_churn > 0 else None
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        if s_churn > 0:
            x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = model(x, sigma_hat * s_in, **kwargs)
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **kwargs))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    """Ancestral sampling with DPM-Solver-2 midpoint steps down to σ_down, then noise σ_up."""
    seed, kwargs = split_extra_args(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **kwargs))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        report(callback, i, x, sigmas, denoised)
    return x


# -- linear multistep --------------------------------------------------------------------------

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(16)


def _integrate(f, a: float, b: float) -> float:
    """∫_a^b f by 16-point Gauss–Legendre: exact for polynomials of degree ≤ 31,
    and to float64 rounding for the smooth exponential kernels used here."""
    mid, half = 0.5 * (a + b), 0.5 * (b - a)
    return float(half * np.sum(_GL_WEIGHTS * f(mid + half * _GL_NODES)))


def lagrange_integrals(nodes: list[float], a: float, b: float, weight=None) -> list[float]:
    """∫_a^b ℓ_j(τ) w(τ) dτ for the Lagrange basis ℓ_j of ``nodes`` (w = 1 by default)."""
    out = []
    for j, t_j in enumerate(nodes):
        def basis(tau, j=j, t_j=t_j):
            prod = np.ones_like(tau)
            for k, t_k in enumerate(nodes):
                if k != j:
                    prod = prod * (tau - t_k) / (t_j - t_k)
            return prod if weight is None else prod * weight(tau)
        out.append(_integrate(basis, a, b))
    return out


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (Adams–Bashforth with variable steps) in σ: the last ``order`` slopes
    define a polynomial d(σ) integrated exactly over [σ_i, σ_{i+1}] (k-diffusion's LMS)."""
    _, kwargs = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    sigmas_f = [float(s) for s in sigmas]
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            cur_order = min(i + 1, order)
            nodes = [sigmas_f[i - k] for k in range(cur_order)]            # σ_i, σ_{i−1}, …
            coeffs = lagrange_integrals(nodes, sigmas_f[i], sigmas_f[i + 1])
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """Improved PNDM (Zhang & Chen 2023, "DEIS"; Zhou et al. 2024): Adams–Bashforth with the
    fixed-step coefficients (1), (3, −1)/2, (23, −16, 5)/12, (55, −59, 37, −9)/24 on the slopes,
    warming up from Euler; the step to σ = 0 returns D."""
    _, kwargs = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    coefficients = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    history = []                                         # previous slopes, newest last
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        d = to_d(x, sigmas[i], denoised)
        order = min(max_order, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            slopes = [d] + history[::-1][: order - 1]
            x = x + (sigmas[i + 1] - sigmas[i]) * sum(c * s for c, s in zip(coefficients[order], slopes))
        history = (history + [d])[-(max_order - 1):] if max_order > 1 else []
        report(callback, i, x, sigmas, denoised)
    return x


def _ipndm_v_coefficients(order: int, h: list[float]) -> list[float]:
    """Variable-step iPNDM coefficients (Zhou et al. 2024, diff-solvers) for step sizes
    h = [h_n, h_{n−1}, h_{n−2}, h_{n−3}] (h_n the current step, all signed)."""
    r1 = h[0] / h[1]
    c = [(2 + r1) / 2, -r1 / 2]
    if order == 2:
        return c
    hn, h1, h2 = h[0], h[1], h[2]
    t1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return [c[0] + t1, c[1] - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = h[3]
    t2 = ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2))) \
        * (hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [
        c[0] + t1 + t2,
        c[1] - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
        t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
        -t2 * q * h1 / h2,
    ]


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """iPNDM with variable-step coefficients (Zhou et al. 2024, "Fast ODE-based sampling for
    diffusion models in around 5 steps"): Adams–Bashforth weights adapted to uneven σ steps."""
    _, kwargs = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    sig = [float(s) for s in sigmas]
    history = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        d = to_d(x, sigmas[i], denoised)
        order = min(max_order, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        elif order == 1:
            x = x + (sigmas[i + 1] - sigmas[i]) * d
        else:
            h = [sig[i + 1 - k] - sig[i - k] for k in range(order)]       # h_n, h_{n−1}, …
            coeffs = _ipndm_v_coefficients(order, h)
            slopes = [d] + history[::-1][: order - 1]
            x = x + (sigmas[i + 1] - sigmas[i]) * sum(c * s for c, s in zip(coeffs, slopes))
        history = (history + [d])[-(max_order - 1):] if max_order > 1 else []
        report(callback, i, x, sigmas, denoised)
    return x


def _deis_coefficients(sigmas: list[float], max_order: int, n_points: int = 10000) -> list[list[float]]:
    """DEIS "tab" coefficients (Zhang & Chen 2023) as ComfyUI computes them: σ is mapped to the
    time τ of a VP-SDE (β_min, β_d fitted to σ ∈ [0.002, 80]), the slope is interpolated by a
    Lagrange polynomial in τ, and ∫ ℓ_j(τ) dσ(τ) is summed over ``n_points`` points."""
    eps_s, s_min, s_max = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log(s_min ** 2 + 1) / eps_s - math.log(s_max ** 2 + 1)) / (eps_s - 1)
    beta_min = math.log(s_max ** 2 + 1) - 0.5 * beta_d
    taus = [(math.sqrt(beta_min ** 2 + 2 * beta_d * math.log(s ** 2 + 1)) - beta_min) / beta_d for s in sigmas]

    def dsigma_dtau(tau):      # −½ (d log ᾱ/dτ) / √(ᾱ(1 − ᾱ)),  log ᾱ(τ) = −½ τ² β_d − τ β_min
        log_alpha = -0.5 * tau ** 2 * beta_d - tau * beta_min
        alpha = np.exp(log_alpha)
        return -0.5 * (-tau * beta_d - beta_min) / np.sqrt(alpha * (1 - alpha))

    coeffs = []
    for i in range(len(sigmas) - 1):
        order = min(i + 1, max_order)
        if order == 1 or sigmas[i + 1] <= 0:
            coeffs.append([])
            continue
        grid = np.linspace(taus[i], taus[i + 1], n_points)
        dtau = (taus[i + 1] - taus[i]) / n_points
        integrand = dsigma_dtau(grid)
        nodes = [taus[i - k] for k in range(order)]
        row = []
        for j in range(order):
            basis = np.ones_like(grid)
            for k, t_k in enumerate(nodes):
                if k != j:
                    basis = basis * (grid - t_k) / (nodes[j] - t_k)
            row.append(float(np.sum(integrand * basis) * dtau))
        coeffs.append(row)
    return coeffs


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3):
    """DEIS-AB ("tab", Zhang & Chen 2023, "Fast sampling of diffusion models with exponential
    integrator"): multistep with coefficients integrated in the VP time variable."""
    _, kwargs = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    coeffs = _deis_coefficients([float(s) for s in sigmas], max_order)
    history = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        d = to_d(x, sigmas[i], denoised)
        order = min(max_order, i + 1)
        if sigmas[i + 1] <= 0 or order == 1:
            x = x + (sigmas[i + 1] - sigmas[i]) * d
        else:
            slopes = [d] + history[::-1][: order - 1]
            x = x + sum(c * s for c, s in zip(coeffs[i], slopes))
        history = (history + [d])[-(max_order - 1):] if max_order > 1 else []
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.0):
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and improving diffusion models
    from an optimization perspective"): Euler with the slope d̄ = γ·d_i + (1 − γ)·d_{i−1}."""
    _, kwargs = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
        report(callback, i, x, sigmas, denoised)
    return x


# -- DDIM / DDPM / LCM ---------------------------------------------------------------------------

@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DDIM with η = 0 (Song et al. 2021, eq. 12): x_{t−1} = √ᾱ_{t−1} x̂₀ + √(1 − ᾱ_{t−1}) ε̂.
    Divided by √ᾱ_{t−1} this is  x' = D + σ_{i+1} · (x − D)/σ_i  — an Euler step in σ-space,
    which is how ComfyUI runs "ddim" too."""
    _, kwargs = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        eps = to_d(x, sigmas[i], denoised)
        x = x + eps * (sigmas[i + 1] - sigmas[i])
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) in VP form between the schedule's
    noise levels: with ᾱ = 1/(1+σ²) and α = ᾱ_t/ᾱ_{t−1},
    x_{t−1} = (x_t − (1−α)/√(1−ᾱ_t) · ε̂) / √α + √((1−α)(1−ᾱ_{t−1})/(1−ᾱ_t)) · z."""
    seed, kwargs = split_extra_args(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_prev = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **kwargs)
        eps = (x - denoised) / sigma
        x_vp = x / torch.sqrt(1.0 + sigma ** 2)
        abar, abar_prev = 1 / (sigma * sigma + 1), 1 / (sigma_prev * sigma_prev + 1)
        alpha = abar / abar_prev
        mu = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - abar).sqrt())
        if sigma_prev > 0:
            mu = mu + ((1 - alpha) * (1.0 - abar_prev) / (1.0 - abar)).sqrt() * noise(sigma, sigma_prev)
            x = mu * torch.sqrt(1.0 + sigma_prev ** 2)
        else:
            x = mu
        report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1): jump to the
    model's x₀ estimate, then re-noise it to the next level, x = D + σ_{i+1} · z."""
    seed, kwargs = split_extra_args(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
        report(callback, i, x, sigmas, denoised)
    return x
