"""DPM-Solver (Lu et al. 2022, "DPM-Solver: A fast ODE solver for diffusion probabilistic
model sampling in around 10 steps", arXiv:2206.00927), noise-prediction form in σ-space.

With t = −log σ (= λ) and ε̂ = (x − D)/σ, the exact solution x_t = x_s − σ_t ∫ e^{τ−t}… gives
the k-th order singlestep updates (h = t_next − t):

    DPM-Solver-1:  x' = x − σ_{t'} (e^h − 1) ε̂(x, t)
    DPM-Solver-2:  u  = x − σ_{s₁}(e^{r₁h} − 1) ε̂(x, t);
                   x' = x − σ_{t'}(e^h − 1) ε̂ − σ_{t'}/(2r₁) (e^h − 1)(ε̂(u, s₁) − ε̂)
    DPM-Solver-3:  two intermediate points at r₁ = ⅓, r₂ = ⅔ (Algorithm 2 of the paper)

``dpm_fast`` spends exactly ``steps`` model evaluations on uniform steps in t between the
schedule's end points (orders 3, 3, …, then 2/1 to use the budget); ``dpm_adaptive`` picks
step sizes with an embedded (2,3) pair and a PID controller. Both ignore the scheduler's
spacing, as in ComfyUI; both stop at the smallest non-zero σ of the schedule.
"""

from __future__ import annotations

import math

import torch

from nodeflow.sampling.steps import default_noise_sampler, get_ancestral_step, split_extra_args

__all__ = ["DPMSolver", "sample_dpm_adaptive", "sample_dpm_fast"]


class PIDStepSizeController:
    """A PID controller for ODE step sizes (Söderlind 2003): proposes h·factor from the last
    three inverse errors and accepts the step when the factor is at least ``accept_safety``."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    @staticmethod
    def limiter(x):
        return 1 + math.atan(x - 1)

    def propose_step(self, error) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.limiter(self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


class DPMSolver:
    """DPM-Solver-1/2/3 steps on a denoiser, caching ε̂ evaluations within a step."""

    def __init__(self, model, kwargs: dict, on_eval=None):
        self.model, self.kwargs, self.on_eval = model, kwargs, on_eval
        self.nfe = 0

    @staticmethod
    def t(sigma):
        return -sigma.log()

    @staticmethod
    def sigma(t):
        return t.neg().exp()

    def eps(self, cache: dict, key: str, x, t):
        if key not in cache:
            sigma = self.sigma(t) * x.new_ones([x.shape[0]])
            denoised = self.model(x, sigma, **self.kwargs)
            cache[key] = (x - denoised) / self.sigma(t)
            self.nfe += 1
            if self.on_eval is not None:
                self.on_eval(x, denoised)
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - self.sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def step(self, order, x, t, t_next, cache):
        return {1: self.step_1, 2: self.step_2, 3: self.step_3}[order](x, t, t_next, cache)


def _end_points(sigmas):
    """(σ_max, σ_min > 0) of a schedule, as ComfyUI's dpm_fast / dpm_adaptive wrappers take them."""
    sigma_min = sigmas[-1] if sigmas[-1] > 0 else sigmas[-2]
    return sigmas[0], sigma_min


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, extra_args=None, callback=None, disable=None,
                    eta=0.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver-fast (Lu et al. 2022, §3.4): ``len(sigmas) − 1`` model evaluations spent on
    ⌊n/3⌋ + 1 uniform steps in t = −log σ, third order except the last one or two."""
    if len(sigmas) <= 1:
        return x
    seed, kwargs = split_extra_args(extra_args)
    noise = default_noise_sampler(x, seed) if noise_sampler is None else noise_sampler
    nfe = len(sigmas) - 1
    sigma_max, sigma_min = _end_points(sigmas)
    last = {}
    solver = DPMSolver(model, kwargs, on_eval=lambda xx, d: last.update(denoised=d))
    t_start, t_end = solver.t(torch.as_tensor(sigma_max)), solver.t(torch.as_tensor(sigma_min))
    m = math.floor(nfe / 3) + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        cache = {}
        t, t_next = ts[i], ts[i + 1]
        if eta:
            sd, su = get_ancestral_step(solver.sigma(t), solver.sigma(t_next), eta)
            t_next_ = torch.minimum(t_end.to(x.device), solver.t(sd))
            su = (solver.sigma(t_next) ** 2 - solver.sigma(t_next_) ** 2) ** 0.5
        else:
            t_next_, su = t_next, 0.0
        x = solver.step(order, x, t, t_next_, cache)
        x = x + su * s_noise * noise(solver.sigma(t), solver.sigma(t_next))
        if callback is not None:
            callback({"i": i, "step": solver.nfe, "x": x, "sigma": solver.sigma(t), "sigma_next": solver.sigma(t_next),
                      "denoised": last["denoised"]})
    return x


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, eta=0.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver-12/23 with adaptive steps (Lu et al. 2022, Algorithm 4): each step computes
    a lower- and a higher-order solution sharing evaluations; their scaled difference drives
    a PID step-size controller. Progress is reported as the fraction of t covered."""
    if len(sigmas) <= 1:
        return x
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    seed, kwargs = split_extra_args(extra_args)
    noise = default_noise_sampler(x, seed) if noise_sampler is None else noise_sampler
    total = len(sigmas) - 1
    sigma_max, sigma_min = _end_points(sigmas)
    last = {}
    solver = DPMSolver(model, kwargs, on_eval=lambda xx, d: last.update(denoised=d))
    t_start = solver.t(torch.as_tensor(sigma_max)).to(x.device)
    t_end = solver.t(torch.as_tensor(sigma_min)).to(x.device)
    forward = t_end > t_start
    if not forward and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    h_init = abs(h_init) * (1 if forward else -1)
    atol_t, rtol_t = torch.tensor(atol, device=x.device), torch.tensor(rtol, device=x.device)
    s, x_prev, steps = t_start, x, 0
    pid = PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    while (s < t_end - 1e-5) if forward else (s > t_end + 1e-5):
        cache = {}
        t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
        if eta:
            sd, su = get_ancestral_step(solver.sigma(s), solver.sigma(t), eta)
            t_ = torch.minimum(t_end, solver.t(sd))
            su = (solver.sigma(t) ** 2 - solver.sigma(t_) ** 2) ** 0.5
        else:
            t_, su = t, 0.0
        if order == 2:
            x_low, x_high = solver.step_1(x, s, t_, cache), solver.step_2(x, s, t_, cache)
        else:
            x_low, x_high = solver.step_2(x, s, t_, cache, r1=1 / 3), solver.step_3(x, s, t_, cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + su * s_noise * noise(solver.sigma(s), solver.sigma(t))
            s = t
            steps += 1
            if callback is not None:
                done = float((s - t_start) / (t_end - t_start))
                callback({"i": steps - 1, "step": max(1, min(total, round(done * total))), "x": x,
                          "sigma": solver.sigma(s), "sigma_next": solver.sigma(s), "denoised": last["denoised"]})
    return x
