"""Samplers on problems with known answers: a Gaussian mixture (exact denoiser in closed
form) and a Gaussian (exact probability-flow ODE solution)."""

import math

import pytest
import torch

from nodeflow.sampling import SAMPLER_NAMES, SAMPLERS, DiscreteSchedule, ksampler_sigmas
from nodeflow.sampling.schedules import exponential_sigmas

SD = DiscreteSchedule.scaled_linear()

# Samplers that are not meant to reproduce the data law with a denoiser: LCM expects a
# consistency model (tested below with one).
CONSISTENCY = {"lcm"}
ODE = ["euler", "heun", "dpm_2", "lms", "dpm_fast", "dpmpp_2m", "ipndm", "ipndm_v", "deis", "res_multistep",
       "exp_heun_2_x0", "uni_pc", "uni_pc_bh2", "ddim", "euler_cfg_pp", "dpmpp_2m_cfg_pp"]
HIGHER_ORDER = ["heun", "dpm_2", "lms", "dpm_fast", "dpmpp_2m", "ipndm", "ipndm_v", "deis", "res_multistep",
                "exp_heun_2_x0", "uni_pc", "uni_pc_bh2"]


def run(name, model, x, sigmas, seed=0):
    spec = SAMPLERS[name]
    options = {"schedule": SD} if spec.needs_schedule else {}
    return spec.function(model, x, sigmas, extra_args={"seed": seed}, **options)


# Euler-ancestral (= DDPM) and gradient estimation converge slowly in law: they get more steps.
SLOW_IN_LAW = {"euler_ancestral", "euler_ancestral_cfg_pp", "ddpm", "gradient_estimation", "gradient_estimation_cfg_pp"}


@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if n not in CONSISTENCY])
def test_lands_on_the_mixture_mean_and_variance(name, mixture):
    """From the exact noisy marginal at σ_max, enough steps reproduce the data law: mean,
    variance per dimension, and the weight of each component."""
    n = 3000
    spec = SAMPLERS[name]
    steps = 200 if name in SLOW_IN_LAW else 60
    sigmas = ksampler_sigmas(SD, "karras", steps, discard_penultimate=spec.discard_penultimate)
    x = mixture.sample_noisy(n, float(sigmas[0]), torch.Generator().manual_seed(1))
    out = run(name, mixture.denoiser, x, sigmas, seed=2).double().reshape(n, -1)
    assert torch.isfinite(out).all()
    mean, var = mixture.mean, mixture.variance
    se_mean = (var / n).sqrt()
    assert torch.all((out.mean(0) - mean).abs() < 4 * se_mean), (out.mean(0), mean)
    assert torch.all((out.var(0) / var - 1).abs() < 0.07), (out.var(0), var)
    # which component each sample ended in (the modes are well separated)
    nearest = ((out[:, None, :] - mixture.means[None]) ** 2).sum(-1).argmin(1)
    share = (nearest == 0).double().mean()
    assert abs(float(share) - 0.3) < 0.035


def test_lcm_with_a_consistency_model():
    """LCM's multistep sampling needs a consistency function f(x, σ) (the PF-ODE's map to
    σ = 0); for N(μ, s²) data that is μ + (x − μ)·s/√(s² + σ²)."""
    mu, s, n = 0.5, 0.8, 20000
    f = lambda x, sigma, **kw: mu + (x - mu) * s / torch.sqrt(s ** 2 + sigma.reshape(-1, 1, 1, 1) ** 2)  # noqa: E731
    sigmas = ksampler_sigmas(SD, "simple", 4)
    g = torch.Generator().manual_seed(0)
    x = mu + math.sqrt(s ** 2 + float(sigmas[0]) ** 2) * torch.randn(n, 1, 1, 1, generator=g)
    out = run("lcm", f, x, sigmas, seed=3)
    assert float(out.mean()) == pytest.approx(mu, abs=0.03)
    assert float(out.std()) == pytest.approx(s, rel=0.03)


def _gaussian_ode_error(name, steps, mu=1.0, s=0.5, with_count=False):
    """Max error against the exact PF-ODE solution for N(μ, s²) data, σ from 14.6 to 0.0292
    (a schedule without the final jump to 0, whose error does not shrink with steps)."""
    sigmas = exponential_sigmas(steps + 1, 0.0292, 14.6)[:-1]
    calls = [0]

    def denoiser(x, sigma, **kw):
        calls[0] += 1
        var = sigma.double().reshape(-1, 1, 1, 1) ** 2
        return (mu + s ** 2 / (s ** 2 + var) * (x.double() - mu)).float()

    z = torch.linspace(-3, 3, 501).reshape(-1, 1, 1, 1)
    x = mu + z * math.sqrt(s ** 2 + float(sigmas[0]) ** 2)
    out = run(name, denoiser, x, sigmas)
    exact = mu + (x - mu) * math.sqrt(s ** 2 + float(sigmas[-1]) ** 2) / math.sqrt(s ** 2 + float(sigmas[0]) ** 2)
    err = float((out - exact).abs().max())
    return (err, calls[0]) if with_count else err


@pytest.mark.parametrize("name", ODE)
def test_ode_samplers_converge_to_the_exact_solution(name):
    assert _gaussian_ode_error(name, 160) < 0.02


def test_convergence_orders():
    """Doubling the steps halves Euler's error and quarters that of second-order methods."""
    ratio = lambda name: _gaussian_ode_error(name, 20) / _gaussian_ode_error(name, 40)  # noqa: E731
    assert 1.6 < ratio("euler") < 2.5
    for name in ("heun", "dpm_2", "dpmpp_2m", "exp_heun_2_x0"):
        assert ratio(name) > 3.2, name
    for name in ("lms", "deis"):
        assert ratio(name) > 3.5, name
    # UniPC-3 reaches ComfyUI's float32 VP-coordinate floor (~1e-4) by 20 steps
    assert _gaussian_ode_error("uni_pc", 10) / _gaussian_ode_error("uni_pc", 20) > 3.5


@pytest.mark.parametrize("name", HIGHER_ORDER)
def test_higher_order_beats_euler_at_equal_model_evaluations(name):
    err, nfe = _gaussian_ode_error(name, 40, with_count=True)
    assert err < _gaussian_ode_error("euler", nfe) / 3


def test_ancestral_noise_is_comfyuis_per_step_stream():
    """euler_ancestral with D ≡ 0: x' = x·σ_down/σ + σ_up·z, z drawn in turn from a CPU
    generator seeded with seed + 1."""
    sigmas = torch.tensor([10.0, 4.0, 1.0, 0.0])
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 10
    out = run("euler_ancestral", lambda x, s, **k: torch.zeros_like(x), x0, sigmas, seed=42)
    g = torch.Generator().manual_seed(43)
    x = x0
    for i in range(2):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        up = math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
        down = math.sqrt(s_next ** 2 - up ** 2)
        x = x * down / s + up * torch.randn((1, 4, 4, 4), generator=g)
    assert torch.allclose(out, torch.zeros_like(out))          # the last step returns D
    out2 = run("euler_ancestral", lambda x, s, **k: torch.zeros_like(x), x0, sigmas[:-1], seed=42)
    assert torch.allclose(out2, x, atol=1e-5)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_same_seed_same_result_and_callbacks(name, mixture):
    sigmas = ksampler_sigmas(SD, "karras", 6, discard_penultimate=SAMPLERS[name].discard_penultimate)
    x = mixture.sample_noisy(8, float(sigmas[0]), torch.Generator().manual_seed(0))
    seen = []
    a = SAMPLERS[name].function(mixture.denoiser, x, sigmas, extra_args={"seed": 5}, callback=seen.append,
                                **({"schedule": SD} if SAMPLERS[name].needs_schedule else {}))
    b = run(name, mixture.denoiser, x, sigmas, seed=5)
    assert torch.equal(a, b)
    assert seen and all(set(info) >= {"i", "x", "denoised"} for info in seen)
    assert torch.equal(x, mixture.sample_noisy(8, float(sigmas[0]), torch.Generator().manual_seed(0)))  # input untouched


STOCHASTIC = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
              "dpmpp_3m_sde", "ddpm", "lcm", "er_sde", "seeds_2", "seeds_3", "sa_solver", "res_multistep_ancestral",
              "exp_heun_2_x0_sde", "euler_ancestral_cfg_pp", "dpmpp_2m_sde_heun"]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_depend_on_the_seed(name, mixture):
    sigmas = ksampler_sigmas(SD, "karras", 6)
    x = mixture.sample_noisy(8, float(sigmas[0]), torch.Generator().manual_seed(0))
    assert not torch.equal(run(name, mixture.denoiser, x, sigmas, seed=1), run(name, mixture.denoiser, x, sigmas, seed=2))
