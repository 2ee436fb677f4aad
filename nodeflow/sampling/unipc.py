"""UniPC (Zhao et al. 2023, "UniPC: A unified predictor-corrector framework for fast sampling
of diffusion models", arXiv:2302.04867), multistep, data prediction, order ≤ 3.

Each step from λ_s to λ_t (λ = log α − log σ_VP, h = λ_t − λ_s) is

    x̃_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) D_s                      (first-order part)
    UniP:  x_t = x̃_t − α_t B(h) Σ_k ρ^p_k D1_k                       (predictor)
    UniC:  x_t = x̃_t − α_t B(h) (Σ_k ρ^c_k D1_k + ρ^c_K (D_t − D_s))  (corrector, reuses D_t)

with D1_k = (D_{s−k} − D_s)/r_k, r_k = (λ_{s−k} − λ_s)/h and ρ solving R ρ = b(h), where
R_ik = r_k^{i−1} and b_i = i! φ_{i+1}(−h)·(−h)/B(h). B(h) = −h ("bh1") or e^{−h} − 1 ("bh2").
The corrector's model value D_t is the next step's D_s, so UniC costs no extra evaluation; the
last step runs no corrector.

As in ComfyUI this runs in variance-preserving coordinates (x_VP = x/√(1+σ²), α = 1/√(1+σ²))
and, when the schedule ends at 0, stops at σ = 0.001 instead.
"""

from __future__ import annotations

import torch

from nodeflow.sampling.steps import split_extra_args

__all__ = ["sample_uni_pc", "sample_uni_pc_bh2"]


def _log_alpha(sigma):
    return 0.5 * torch.log(1 / (sigma * sigma + 1))


def _alpha(sigma):
    return torch.exp(_log_alpha(sigma))


def _std(sigma):
    """σ_VP = √(1 − α²)."""
    return torch.sqrt(1.0 - torch.exp(2.0 * _log_alpha(sigma)))


def _lambda(sigma):
    """λ = log α − log σ_VP (= −log σ)."""
    log_alpha = _log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


def _uni_pc_update(model_fn, x, model_prev, t_prev, t, order, variant, use_corrector):
    """One UniP(-C) step of the given order from t_prev[-1] to t; returns (x_t, D_t or None)."""
    s0, m0 = t_prev[-1], model_prev[-1]
    lam_s, lam_t = _lambda(s0), _lambda(t)
    h = lam_t - lam_s
    rks, d1s = [], []
    for k in range(1, order):
        rk = (_lambda(t_prev[-(k + 1)]) - lam_s) / h
        rks.append(rk)
        d1s.append((model_prev[-(k + 1)] - m0) / rk)
    rks = torch.stack(rks + [torch.ones_like(h)])

    hh = -h
    h_phi_1 = torch.expm1(hh)                 # h·φ₁(h) = e^h − 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rows, b, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(rows), torch.stack(b)

    alpha_t = _alpha(t)
    x_t_ = _std(t) / _std(s0) * x - alpha_t * h_phi_1 * m0
    if d1s:
        rhos_p = torch.tensor([0.5], device=b.device) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        x_t = x_t_ - alpha_t * b_h * sum(r * d for r, d in zip(rhos_p, d1s))
    else:
        x_t = x_t_
    if not use_corrector:
        return x_t, None
    rhos_c = torch.tensor([0.5], device=b.device) if order == 1 else torch.linalg.solve(R, b)
    model_t = model_fn(x_t, t)
    corr = sum(r * d for r, d in zip(rhos_c[:-1], d1s)) if d1s else 0
    x_t = x_t_ - alpha_t * b_h * (corr + rhos_c[-1] * (model_t - m0))
    return x_t, model_t


@torch.no_grad()
def sample_uni_pc(model, x, sigmas, extra_args=None, callback=None, disable=None, variant="bh1"):
    """UniPC-3 multistep with lower orders for warm-up and the final steps (``variant`` bh1/bh2).

    One step (``len(sigmas) == 2``) differs from ComfyUI on purpose: ComfyUI's order is
    min(3, steps − 1) = 0 there, so it evaluates the model once and returns x_T rescaled to
    σ = 0.001 — essentially the scaled starting noise. Here a single step is a first-order
    UniP step (DDIM in data prediction) from σ₀ to the end: the model's x₀ estimate, a usable
    image. For two or more steps the two agree.
    """
    _, kwargs = split_extra_args(extra_args)
    ts = sigmas.clone().float()
    if ts[-1] == 0:
        ts[-1] = 0.001
    steps = len(ts) - 1
    if steps < 1:
        return x
    s_in = x.new_ones([x.shape[0]])

    def model_fn(x_vp, sigma):                 # D at the σ-space point x_VP·√(1+σ²)
        return model(x_vp * torch.sqrt(sigma ** 2 + 1.0), sigma * s_in, **kwargs)

    order = max(1, min(3, steps - 1))           # ComfyUI: min(3, steps − 1): 0 for one step (see above)
    x = x / torch.sqrt(1.0 + ts[0] ** 2)
    model_prev = [model_fn(x, ts[0])]
    t_prev = [ts[0]]
    for step_index in range(steps):
        if step_index == 0 and steps > 1:
            pass                                # the first step only evaluates D(x_T)
        elif 0 < step_index < order:            # warm-up with lower orders
            x, model_x = _uni_pc_update(model_fn, x, model_prev, t_prev, ts[step_index], step_index, variant, True)
            model_prev.append(model_x)
            t_prev.append(ts[step_index])
        else:                                   # the last index also takes the final step
            last = step_index == steps - 1
            for step in range(max(step_index, 1), step_index + 1 + (1 if last else 0)):
                step_order = min(order, steps + 1 - step)
                x, model_x = _uni_pc_update(model_fn, x, model_prev, t_prev, ts[step], step_order, variant,
                                            use_corrector=step != steps)
                model_prev = model_prev[1:] + [model_x if model_x is not None else model_prev[-1]]
                t_prev = t_prev[1:] + [ts[step]]
        if callback is not None:
            sigma_now = ts[steps] if step_index == steps - 1 else ts[step_index]
            callback({"i": step_index, "x": x * torch.sqrt(1.0 + sigma_now ** 2), "sigma": sigmas[step_index],
                      "sigma_next": sigmas[step_index + 1], "denoised": model_prev[-1]})
    return x / _alpha(ts[-1])


@torch.no_grad()
def sample_uni_pc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """UniPC with B(h) = e^{−h} − 1 (recommended for guided sampling by the paper)."""
    return sample_uni_pc(model, x, sigmas, extra_args, callback, disable, variant="bh2")
