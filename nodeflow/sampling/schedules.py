"""Schedulers: the decreasing σ sequence a sampler walks, under the names ComfyUI users know.

Every scheduler returns ``steps + 1`` float32 values σ₀ > σ₁ > … > σ_N = 0 (``ddim_uniform``
and ``beta`` can differ by a step, exactly as in ComfyUI). ``ksampler_sigmas`` adds what the
KSampler node does on top: partial denoising (img2img ``denoise`` < 1 runs the tail of a
longer schedule) and the extra step some samplers discard.

    normal          uniform in timestep t between t(σ_max) and t(σ_min)
    karras          Karras et al. 2022, eq. 5: uniform in σ^(1/ρ), ρ = 7
    exponential     uniform in log σ
    sgm_uniform     uniform in t with the end point left out (Stability's SGM code)
    simple          every (1000/steps)-th training σ from the top
    ddim_uniform    every (1000//steps)-th training σ from t = 1 (DDIM's "uniform" skip)
    beta            timesteps at the quantiles of a Beta(0.6, 0.6) law (Lee et al. 2024,
                    arXiv:2407.12173): more steps at both ends
    linear_quadratic linear then quadratic in 1 − σ/σ_max (Genmo's Mochi schedule)
    kl_optimal      uniform in arctan σ (Sabour et al. 2024, "Align your steps", eq. on KL)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from nodeflow.sampling.model_sampling import DiscreteSchedule

__all__ = [
    "SCHEDULER_NAMES",
    "beta_ppf",
    "beta_sigmas",
    "calculate_sigmas",
    "ddim_uniform_sigmas",
    "exponential_sigmas",
    "karras_sigmas",
    "kl_optimal_sigmas",
    "ksampler_sigmas",
    "linear_quadratic_sigmas",
    "normal_sigmas",
    "simple_sigmas",
]


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# -- schedules that only need the σ range -----------------------------------------------------

def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """σ_i = (σ_max^(1/ρ) + i/(n−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, then 0."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n values uniform in log σ from σ_max to σ_min, then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """σ_i = tan((1 − i/(n−1)) · arctan σ_max + i/(n−1) · arctan σ_min), then 0."""
    u = torch.arange(n, dtype=torch.float32) / max(n - 1, 1)
    sigmas = torch.zeros(n + 1)
    sigmas[:-1] = (u * math.atan(sigma_min) + (1 - u) * math.atan(sigma_max)).tan()
    return sigmas


# -- schedules that read the model's discrete schedule ----------------------------------------

def normal_sigmas(s: DiscreteSchedule, steps: int, sgm: bool = False) -> Tensor:
    """σ(t) at timesteps uniform between t(σ_max) and t(σ_min) (sgm: ``steps+1`` points with
    the last dropped), then 0."""
    start, end = s.timestep(torch.tensor(s.sigma_max)), s.timestep(torch.tensor(s.sigma_min))
    append_zero = True
    if sgm:
        timesteps = torch.linspace(float(start), float(end), steps + 1)[:-1]
    else:
        if math.isclose(float(s.sigma(end)), 0, abs_tol=1e-5):    # zero-terminal-SNR schedules
            steps += 1
            append_zero = False
        timesteps = torch.linspace(float(start), float(end), steps)
    sigmas = torch.tensor([float(s.sigma(t)) for t in timesteps], dtype=torch.float32)
    return _append_zero(sigmas) if append_zero else sigmas


def simple_sigmas(s: DiscreteSchedule, steps: int) -> Tensor:
    """Every (T/steps)-th training σ counted from the top, then 0."""
    stride = len(s.sigmas) / steps
    return _append_zero(torch.tensor([float(s.sigmas[-(1 + int(i * stride))]) for i in range(steps)]))


def ddim_uniform_sigmas(s: DiscreteSchedule, steps: int) -> Tensor:
    """Training σ at t = 1, 1+k, 1+2k, … (k = T // steps), descending, then 0."""
    t = 1
    if math.isclose(float(s.sigmas[t]), 0, abs_tol=1e-5):
        steps += 1
        sigs = []
    else:
        sigs = [0.0]
    stride = max(len(s.sigmas) // steps, 1)
    while t < len(s.sigmas):
        sigs.append(float(s.sigmas[t]))
        t += stride
    return torch.tensor(sigs[::-1], dtype=torch.float32)


def beta_sigmas(s: DiscreteSchedule, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Training σ at t = rint(T_max · F⁻¹(q_i)), q_i = 1 − i/steps (numpy's linspace, so the
    float64 values are ComfyUI's), F the Beta(α, β) CDF; repeated timesteps are dropped; then 0."""
    total = len(s.sigmas) - 1
    quantiles = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)
    sigs, last_t = [], None
    for q in quantiles.tolist():
        t = int(round_half_even(beta_ppf(q, alpha, beta) * total))
        if t != last_t:
            sigs.append(float(s.sigmas[t]))
        last_t = t
    return _append_zero(torch.tensor(sigs, dtype=torch.float32))


def linear_quadratic_sigmas(s: DiscreteSchedule, steps: int, threshold_noise: float = 0.025,
                            linear_steps: int | None = None) -> Tensor:
    """1 − σ/σ_max rises linearly to ``threshold_noise`` over the first half of the steps,
    then quadratically to 1 (Mochi's schedule), scaled by σ_max."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        a = step_diff / (linear_steps * quadratic_steps ** 2)
        b = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps ** 2)
        c = a * linear_steps ** 2
        quadratic = [a * i ** 2 + b * i + c for i in range(linear_steps, steps)]
        schedule = [1.0 - v for v in linear + quadratic + [1.0]]
    return torch.tensor(schedule, dtype=torch.float32) * s.sigma_max


# -- the name table -----------------------------------------------------------------------------

_SCHEDULERS = {
    "simple": simple_sigmas,
    "sgm_uniform": lambda s, n: normal_sigmas(s, n, sgm=True),
    "karras": lambda s, n: karras_sigmas(n, s.sigma_min, s.sigma_max),
    "exponential": lambda s, n: exponential_sigmas(n, s.sigma_min, s.sigma_max),
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": beta_sigmas,
    "normal": normal_sigmas,
    "linear_quadratic": linear_quadratic_sigmas,
    "kl_optimal": lambda s, n: kl_optimal_sigmas(n, s.sigma_min, s.sigma_max),
}

#: Scheduler names in ComfyUI's order.
SCHEDULER_NAMES: list[str] = list(_SCHEDULERS)


def calculate_sigmas(model_sampling_or_model, scheduler: str, steps: int) -> Tensor:
    """The σ schedule (float32, CPU, ending in 0) of ``scheduler`` for ``steps`` steps.
    Accepts a DiscreteSchedule or a model handle."""
    if scheduler not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULER_NAMES}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    s = DiscreteSchedule.from_model(model_sampling_or_model)
    return _SCHEDULERS[scheduler](s, int(steps)).float()


def ksampler_sigmas(model_sampling_or_model, scheduler: str, steps: int, denoise: float = 1.0,
                    discard_penultimate: bool = False) -> Tensor:
    """The schedule the KSampler node runs.

    ``denoise`` < 1: the last ``steps + 1`` values of the ``int(steps / denoise)``-step
    schedule (img2img starts part-way down). ``denoise`` ≤ 0: an empty schedule.
    ``discard_penultimate``: compute one step more and drop the value before the final 0
    (dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2 in ComfyUI: their last step would otherwise be
    tiny).
    """
    def full(n: int) -> Tensor:
        if discard_penultimate:
            sigmas = calculate_sigmas(model_sampling_or_model, scheduler, n + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        return calculate_sigmas(model_sampling_or_model, scheduler, n)

    if denoise is None or denoise > 0.9999:
        return full(steps)
    if denoise <= 0.0:
        return torch.zeros(0)
    return full(int(steps / denoise))[-(steps + 1):]


# -- the Beta law's quantile function, without scipy ------------------------------------------------

def round_half_even(v: float) -> float:
    """numpy.rint: round to nearest, ties to even (Python's round does the same)."""
    return float(round(v))


def _beta_cf(x: float, a: float, b: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method):
    I_x(a,b) = x^a (1−x)^b / (a·B(a,b)) · 1/(1+ d₁/(1+ d₂/(1+ …))), with
    d_{2m+1} = −(a+m)(a+b+m)x / ((a+2m)(a+2m+1)),  d_{2m} = m(b−m)x / ((a+2m−1)(a+2m))."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))            # d_{2m}
        d = 1.0 + num * d
        c = 1.0 + num / c
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = c if abs(c) > tiny else tiny
        f *= d * c
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))  # d_{2m+1}
        d = 1.0 + num * d
        c = 1.0 + num / c
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = c if abs(c) > tiny else tiny
        delta = d * c
        f *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return f


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (the Beta(a, b) CDF)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_cf(1.0 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile function F⁻¹(q), by bisection on the CDF to float64 precision."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    if a == b and q == 0.5:
        return 0.5                      # the median of a symmetric law, exactly
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
