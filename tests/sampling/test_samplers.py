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


def run(name, model, x, sigmas, seed=0, **options):
    spec = SAMPLERS[name]
    if spec.needs_schedule:
        options.setdefault("schedule", SD)
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


def _gaussian_ode_error(name, steps, mu=1.0, s=0.5, with_count=False, **options):
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
    out = run(name, denoiser, x, sigmas, **options)
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


def test_dpmpp_sde_at_eta_0_is_second_order():
    """η = 0 leaves DPM-Solver++(2S): the midpoint estimate D(x_{s+h/2}) carries the step
    (fac = 1/(2r) = 1), and the error falls as h²."""
    errors = [_gaussian_ode_error("dpmpp_sde", n, eta=0.0) for n in (10, 20, 40)]
    assert errors[0] / errors[1] > 3.2 and errors[1] / errors[2] > 3.2, errors


def test_dpmpp_3m_sde_at_eta_0_beats_second_order():
    """η = 0: DPM-Solver++(3M) multistep. Its quadratic term makes the error fall faster than
    h² over practical step counts (10 → 20 steps: ×6.8) and below 2M's (the published
    formula weights the quadratic term by ½ of its exact integral — see
    test_dpmpp_multistep_sde_steps_are_the_exponential_integrator — so asymptotically, far
    beyond usual step counts, the ratio drifts back towards 4)."""
    e10, e20 = _gaussian_ode_error("dpmpp_3m_sde", 10, eta=0.0), _gaussian_ode_error("dpmpp_3m_sde", 20, eta=0.0)
    assert e10 / e20 > 5.5, (e10, e20)
    assert e20 < _gaussian_ode_error("dpmpp_2m", 20) / 2
    assert e20 < _gaussian_ode_error("dpmpp_2m_sde", 20, eta=0.0) / 2


def _exponential_multistep_reference(denoiser, x, sigmas, eta, order, midpoint=False, quadratic_weight=0.5):
    """Float64 reference for the DPM-Solver++(2M/3M) SDE steps without their noise term,
    written from the exponential-integrator form (Lu et al. 2022): with λ = −log σ,
    h = λ_t − λ_s and k = 1 + η,

        x_t = (σ_t/σ_s) e^{−ηh} x_s + ∫_0^h k e^{−k(h−u)} P(u) du

    where P is the polynomial in u = λ − λ_s through the last ``order`` values of D (fewer
    while they are not there yet), P(u) = c₀ + c₁u + c₂u². The integrals are exact:
    I₀ = 1 − e^{−kh}, I₁ = h − I₀/k, I₂ = h² − 2h/k + 2/k² − 2e^{−kh}/k².
    "midpoint" (2M, DPM-Solver++'s second-order form) replaces c₁I₁ by ½·I₀·h·c₁. The 3M
    update as k-diffusion and ComfyUI compute it uses D₂ = h²c₂ where the Taylor form needs
    h²·P'' = 2h²c₂, i.e. it adds ½·c₂I₂: ``quadratic_weight`` (1 would be the exact integral,
    third order; ComfyUI's numbers are what nodeflow reproduces)."""
    x = x.double()
    values, lambdas = [], []
    for i in range(len(sigmas) - 1):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        d = denoiser(x, torch.full((x.shape[0],), s, dtype=torch.float64))
        if t == 0:
            return d
        lam_s, lam_t = -math.log(s), -math.log(t)
        h, k = lam_t - lam_s, 1.0 + eta
        values.append(d)
        lambdas.append(lam_s)
        p = min(order, len(values))
        nodes = [lam - lam_s for lam in lambdas[-p:]]                       # u of each known D (last is 0)
        vander = torch.tensor([[u ** j for j in range(p)] for u in nodes], dtype=torch.float64)
        weights = torch.linalg.inv(vander)                                  # c_j = Σ_q W[j, q] D_q
        c = [sum(float(weights[j, q]) * values[-p:][q] for q in range(p)) for j in range(p)]
        e = math.exp(-k * h)
        integrals = [1 - e, h - (1 - e) / k, h * h - 2 * h / k + 2 / k ** 2 - 2 * e / k ** 2]
        x = (t / s) * math.exp(-eta * h) * x + c[0] * integrals[0]
        if p >= 2:
            x = x + c[1] * (0.5 * integrals[0] * h if midpoint else integrals[1])
        if p >= 3:
            x = x + quadratic_weight * c[2] * integrals[2]
    return x


@pytest.mark.parametrize("name,order,midpoint", [("dpmpp_2m_sde", 2, True), ("dpmpp_2m_sde_heun", 2, False),
                                                 ("dpmpp_3m_sde", 3, False)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpmpp_multistep_sde_steps_are_the_exponential_integrator(name, order, midpoint, eta, mixture):
    """The deterministic part of each step (noise sampler ≡ 0), against the float64 reference
    above, on the mixture's exact (nonlinear) denoiser; the schedule stops at σ_min so that
    the last step is compared too. ("heun" integrates the linear interpolation of D exactly:
    coefficient 1 − (1 − e^{−kh})/(kh) per unit of h·D′, not "midpoint"'s ½(1 − e^{−kh}).)"""
    sigmas = ksampler_sigmas(SD, "karras", 12)[:-1]
    x = mixture.sample_noisy(64, float(sigmas[0]), torch.Generator().manual_seed(4))
    zero = lambda sigma, sigma_next: torch.zeros_like(x)          # noqa: E731
    out = run(name, mixture.denoiser, x, sigmas, eta=eta, noise_sampler=zero)
    ref = _exponential_multistep_reference(mixture.denoiser, x, sigmas.double(), eta, order, midpoint)
    assert torch.allclose(out.double(), ref, atol=2e-5, rtol=1e-5), float((out.double() - ref).abs().max())


def test_uni_pc_corrector_and_both_b_h_variants():
    """UniC (the corrector) raises each step's order by one at no extra model evaluation: on
    the Gaussian, 16 and 20 steps of UniPC-3 land within 1.5e-3 and 5e-4 of the exact ODE
    solution (UniP alone: 4.4e-3 and 1.5e-3). B(h) = −h (bh1) and e^{−h} − 1 (bh2) give
    different paths, both convergent."""
    for name in ("uni_pc", "uni_pc_bh2"):
        assert _gaussian_ode_error(name, 16) < 1.5e-3, name
        assert _gaussian_ode_error(name, 20) < 5e-4, name
    sigmas = exponential_sigmas(11, 0.0292, 14.6)[:-1]
    x = torch.linspace(-40, 40, 101).reshape(-1, 1, 1, 1)
    gauss = lambda x, sigma, **k: 1.0 + 0.25 / (0.25 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - 1.0)  # noqa: E731
    bh1, bh2 = run("uni_pc", gauss, x, sigmas), run("uni_pc_bh2", gauss, x, sigmas)
    assert float((bh1 - bh2).abs().max()) > 1e-3


def test_uni_pc_one_step_is_a_first_order_step_to_the_estimate():
    """A single UniPC step (unlike ComfyUI, which returns the rescaled noise) lands on the
    model's estimate: for a denoiser that always answers c, c itself (at σ = 0.001)."""
    sigmas = torch.tensor([14.6, 0.0])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 14.6
    for name in ("uni_pc", "uni_pc_bh2"):
        out = run(name, lambda x, sigma, **k: torch.full_like(x, 0.3), x, sigmas)
        assert torch.allclose(out, torch.full_like(out, 0.3), atol=5e-3), name      # 0.001·(x − c)/σ₀ left


def _adaptive_run(rtol, atol, order, mu=1.0, s=0.5):
    sigmas = ksampler_sigmas(SD, "karras", 10)
    calls = [0]

    def denoiser(x, sigma, **kw):
        calls[0] += 1
        var = sigma.double().reshape(-1, 1, 1, 1) ** 2
        return (mu + s ** 2 / (s ** 2 + var) * (x.double() - mu)).float()

    x = mu + torch.linspace(-3, 3, 501).reshape(-1, 1, 1, 1) * math.sqrt(s ** 2 + float(sigmas[0]) ** 2)
    out = run("dpm_adaptive", denoiser, x, sigmas, rtol=rtol, atol=atol, order=order)
    # dpm_adaptive integrates the PF-ODE from σ_max to the last σ > 0; there the exact map is
    # x − μ scaled by √(s² + σ_to²)/√(s² + σ_from²)
    sigma_to = float(sigmas[-2])
    exact = mu + (x - mu) * math.sqrt(s ** 2 + sigma_to ** 2) / math.sqrt(s ** 2 + float(sigmas[0]) ** 2)
    scaled_error = float(((out - exact).abs() / (atol + rtol * exact.abs())).max())
    return scaled_error, calls[0]


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_respects_its_tolerance(order):
    """The embedded pair's error estimate controls the local error to rtol·|x| + atol; summed
    over the steps the global error stays within a few tolerances, and tightening the
    tolerance costs evaluations."""
    errors, nfes = {}, {}
    for tol in (1e-3, 1e-4):
        errors[tol], nfes[tol] = _adaptive_run(tol, tol, order)
        assert errors[tol] < 5, (tol, errors[tol])
    _, nfe_default = _adaptive_run(0.05, 0.0078, order)
    assert nfe_default < nfes[1e-3] < nfes[1e-4]
    assert nfes[1e-4] > 2 * nfe_default


@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES])
def test_every_model_call_sees_the_exact_marginal_of_a_point_mass(name):
    """Data ≡ 0 has the exact denoiser D ≡ 0 and the marginal N(0, σ²) at every σ. Every
    sampler, deterministic, ancestral or SDE, must then present the model at each call with
    x of standard deviation σ (its own σ): the noise each stage adds (e.g. dpmpp_sde's first
    stage, the ancestral σ_up) makes up exactly the variance the deterministic part removes."""
    spec = SAMPLERS[name]
    sigmas = ksampler_sigmas(SD, "karras", 8, discard_penultimate=spec.discard_penultimate)
    z = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    x = z / z.std() * float(sigmas[0])
    ratios = []

    def denoiser(x, sigma, **kw):
        ratios.append(float(x.std()) / float(sigma[0]))
        return torch.zeros_like(x)

    run(name, denoiser, x, sigmas, seed=3)
    assert len(ratios) >= 8
    assert all(abs(r - 1) < 0.03 for r in ratios), [round(r, 3) for r in ratios]


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
    # The input is untouched.
    assert torch.equal(x, mixture.sample_noisy(8, float(sigmas[0]), torch.Generator().manual_seed(0)))


STOCHASTIC = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
              "dpmpp_3m_sde", "ddpm", "lcm", "er_sde", "seeds_2", "seeds_3", "sa_solver", "res_multistep_ancestral",
              "exp_heun_2_x0_sde", "euler_ancestral_cfg_pp", "dpmpp_2m_sde_heun"]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_depend_on_the_seed(name, mixture):
    sigmas = ksampler_sigmas(SD, "karras", 6)
    x = mixture.sample_noisy(8, float(sigmas[0]), torch.Generator().manual_seed(0))
    one, two = (run(name, mixture.denoiser, x, sigmas, seed=seed) for seed in (1, 2))
    assert not torch.equal(one, two)
