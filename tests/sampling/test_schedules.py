"""Noise schedules and the discrete model wrapper, against values computed independently."""

import math

import numpy as np
import pytest
import torch

from nodeflow.sampling import SCHEDULER_NAMES, DiscreteSchedule, calculate_sigmas, ksampler_sigmas
from nodeflow.sampling.schedules import beta_cdf, beta_ppf


def sd_sigmas_float64():
    """σ_t of SD's scaled-linear schedule, straight from the definition."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1 - betas)
    return np.sqrt((1 - ac) / ac)


@pytest.fixture(scope="module")
def sd():
    return DiscreteSchedule.scaled_linear()


def test_sd15_sigma_range(sd):
    assert sd.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert sd.sigma_min == pytest.approx(0.0292, abs=1e-4)
    ref = sd_sigmas_float64()
    assert np.allclose(sd.sigmas.numpy(), ref, rtol=1e-6)


def test_float32_alphas_cumprod_gives_the_exact_schedule():
    ac32 = torch.tensor(np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2), dtype=torch.float32)
    s = DiscreteSchedule(ac32, "eps")
    assert s.sigma_min == pytest.approx(float(sd_sigmas_float64()[0]), rel=1e-6)


def test_sigma_timestep_round_trip(sd):
    t = torch.arange(1000, dtype=torch.float32)
    assert torch.equal(sd.timestep(sd.sigmas), t)                       # nearest training step
    assert torch.allclose(sd.sigma(t), sd.sigmas, rtol=1e-6)
    # between steps log σ is linear: σ(t + ½) is the geometric mean of the neighbours
    mid = sd.sigma(torch.tensor([10.5, 500.5]))
    expect = torch.sqrt(sd.sigmas[[10, 500]] * sd.sigmas[[11, 501]])
    assert torch.allclose(mid, expect, rtol=1e-5)
    interp = DiscreteSchedule(torch.tensor(1 / (1 + sd_sigmas_float64() ** 2)), quantize=False)
    assert float(interp.timestep(mid[:1])) == pytest.approx(10.5, abs=1e-3)


def test_timestep_of_one_sigma_value_is_timestep(sd):
    """The host-side timestep_value (used per model call) picks the same training step as the
    tensor computation, near ties included: geometric midpoints between neighbouring σ_t,
    values a float32 step either side of them, and σ beyond both ends."""
    ref = sd.sigmas.double()
    mids = (ref[1:] * ref[:-1]).sqrt().float()
    values = torch.cat([sd.sigmas, mids, torch.nextafter(mids, torch.tensor(0.0)),
                        torch.nextafter(mids, torch.tensor(99.0)),
                        torch.tensor([1e-4, 0.01, 14.7, 100.0]),
                        torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 15])
    expected = sd.timestep(values)
    got = torch.tensor([sd.timestep_value(float(v)) for v in values])
    assert torch.equal(got, expected)


def test_sigma_terms_of_one_value_are_the_per_row_terms(sd):
    like = torch.zeros(3, 4, 2, 2)
    for v in torch.rand(500, generator=torch.Generator().manual_seed(1)) * 15:
        rows = sd.terms(v.repeat(3), like)
        one = sd.terms_value(float(v), like)
        for a, b in zip(rows, one):
            assert torch.equal(a, b.expand_as(a))


def test_percent_to_sigma(sd):
    assert sd.percent_to_sigma(0.0) > sd.sigma_max
    assert sd.percent_to_sigma(1.0) == 0.0
    assert sd.percent_to_sigma(0.5) == pytest.approx(float(sd.sigma(torch.tensor(499.5))), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_parameterisations_recover_x0(sd, prediction_type):
    """With the true ε (or v = α ε − σ_VP x₀) the wrapper's D is x₀ (Salimans & Ho 2022)."""
    s = DiscreteSchedule.scaled_linear(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor([0.1, 1.0, 14.0])
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    alpha = 1 / torch.sqrt(1 + sigma ** 2)
    a, sa = alpha.reshape(-1, 1, 1, 1), (sigma * alpha).reshape(-1, 1, 1, 1)
    out = eps if prediction_type == "eps" else a * eps - sa * x0
    assert torch.allclose(s.calculate_denoised(sigma, out, x), x0, atol=1e-5)
    assert torch.allclose(s.calculate_input(sigma, x), x * alpha.reshape(-1, 1, 1, 1))
    c_skip, c_out, c_in = s.scalings(sigma.reshape(-1, 1, 1, 1))
    assert torch.allclose(c_skip * x + c_out * out, x0, atol=1e-5)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [1, 4, 20, 37])
def test_every_scheduler_decreases_to_zero(sd, name, steps):
    sigmas = calculate_sigmas(sd, name, steps)
    assert sigmas.dtype == torch.float32 and sigmas[-1] == 0
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert sigmas[0] <= sd.sigma_max * (1 + 1e-6)
    if name not in ("ddim_uniform", "beta"):       # these follow the training grid and can differ by a step
        assert len(sigmas) == steps + 1


def test_karras_rho_7(sd):
    sigmas = calculate_sigmas(sd, "karras", 10)
    assert float(sigmas[0]) == pytest.approx(sd.sigma_max, rel=1e-6)
    assert float(sigmas[-2]) == pytest.approx(sd.sigma_min, rel=1e-5)
    ramp = np.linspace(0, 1, 10)
    ref = (sd.sigma_max ** (1 / 7) + ramp * (sd.sigma_min ** (1 / 7) - sd.sigma_max ** (1 / 7))) ** 7
    assert np.allclose(sigmas[:-1].numpy(), ref, rtol=1e-5)


def test_exponential_is_log_uniform(sd):
    sigmas = calculate_sigmas(sd, "exponential", 8)[:-1].double()
    steps = torch.diff(sigmas.log())
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-4)
    assert float(sigmas[0]) == pytest.approx(sd.sigma_max, rel=1e-6)
    assert float(sigmas[-1]) == pytest.approx(sd.sigma_min, rel=1e-5)


def _sigma_at(t: float) -> float:
    ref = np.log(sd_sigmas_float64())
    lo, hi = math.floor(t), math.ceil(t)
    return math.exp(ref[lo] + (t - lo) * (ref[hi] - ref[lo]))


def test_normal_and_sgm_uniform_are_uniform_in_timestep(sd):
    normal = calculate_sigmas(sd, "normal", 5)
    assert np.allclose(normal[:-1].numpy(), [_sigma_at(t) for t in np.linspace(999, 0, 5)], rtol=1e-5)
    sgm = calculate_sigmas(sd, "sgm_uniform", 5)
    assert np.allclose(sgm[:-1].numpy(), [_sigma_at(t) for t in np.linspace(999, 0, 6)[:-1]], rtol=1e-5)


def test_simple_and_ddim_uniform_pick_training_sigmas(sd):
    ref = sd_sigmas_float64()
    simple = calculate_sigmas(sd, "simple", 4)
    assert np.allclose(simple[:-1].numpy(), ref[[999, 749, 499, 249]], rtol=1e-6)
    ddim = calculate_sigmas(sd, "ddim_uniform", 20)
    assert np.allclose(ddim[:-1].numpy(), ref[np.arange(1, 1000, 50)[::-1]], rtol=1e-6)
    assert len(ddim) == 21


def test_kl_optimal_is_uniform_in_arctan(sd):
    sigmas = calculate_sigmas(sd, "kl_optimal", 6)[:-1].double()
    angles = torch.diff(torch.atan(sigmas))
    assert torch.allclose(angles, angles.mean().expand_as(angles), rtol=1e-4)


def test_linear_quadratic_end_points(sd):
    sigmas = calculate_sigmas(sd, "linear_quadratic", 10)
    assert float(sigmas[0]) == pytest.approx(sd.sigma_max)
    # the first half moves linearly by threshold_noise / linear_steps of σ_max per step
    assert float(sigmas[0] - sigmas[1]) == pytest.approx(0.025 / 5 * sd.sigma_max, rel=1e-4)


def test_beta_quantile_function():
    # Beta(1, 1) is uniform; Beta(2, 1) has CDF x²; Beta(0.6, 0.6) is symmetric.
    assert beta_ppf(0.3, 1, 1) == pytest.approx(0.3, abs=1e-12)
    assert beta_ppf(0.25, 2, 1) == pytest.approx(0.5, abs=1e-12)
    assert beta_cdf(0.5, 0.6, 0.6) == pytest.approx(0.5, abs=1e-12)
    for q in (0.05, 0.2, 0.4):
        assert beta_ppf(q, 0.6, 0.6) == pytest.approx(1 - beta_ppf(1 - q, 0.6, 0.6), abs=1e-12)
    stats = pytest.importorskip("scipy.stats")
    for q in np.linspace(0.01, 0.99, 25):
        assert beta_ppf(q, 0.6, 0.6) == pytest.approx(stats.beta.ppf(q, 0.6, 0.6), abs=1e-10)


def test_beta_scheduler_timesteps(sd):
    ref = sd_sigmas_float64()
    sigmas = calculate_sigmas(sd, "beta", 10)
    # t_i = rint(999 · F⁻¹(1 − i/10)); F⁻¹ of Beta(.6, .6) at 0.5 is 0.5 → t = 500 (ties to even)
    assert float(sigmas[0]) == pytest.approx(ref[999], rel=1e-6)
    assert float(sigmas[5]) == pytest.approx(ref[round(999 * 0.5)], rel=1e-6)


# ComfyUI's beta scheduler: t_i = numpy.rint(999 · scipy.stats.beta.ppf(1 − numpy.linspace(0, 1,
# steps, endpoint=False)[i], 0.6, 0.6)), consecutive repeats dropped. These lists were computed
# with exactly that expression (scipy 1.17.1, numpy 2.x), independently of nodeflow's own
# quantile function. With α = β = 0.5 the 10-step list would be [999, 975, 904, 793, 654, 499, …].
BETA_TIMESTEPS = {
    4: [999, 823, 500, 176],
    7: [999, 928, 782, 598, 401, 217, 71],
    10: [999, 959, 876, 765, 637, 500, 362, 234, 123, 40],
    20: [999, 986, 959, 922, 876, 823, 765, 703, 637, 569, 500, 430, 362, 296, 234, 176, 123, 77, 40, 13],
}


@pytest.mark.parametrize("steps", sorted(BETA_TIMESTEPS))
def test_beta_scheduler_is_comfyuis(sd, steps):
    ref = sd_sigmas_float64()
    sigmas = calculate_sigmas(sd, "beta", steps)
    assert sigmas[-1] == 0
    assert np.allclose(sigmas[:-1].numpy(), ref[BETA_TIMESTEPS[steps]], rtol=1e-6)


def test_beta_scheduler_drops_repeated_timesteps(sd):
    """With many steps the quantiles of the ends round to the same timestep: ComfyUI keeps one
    (200 steps → 199 values, 400 → 387, both ending …, 2, 1, 0 before the final 0)."""
    ref = sd_sigmas_float64()
    for steps, count in ((100, 100), (200, 199), (400, 387)):
        sigmas = calculate_sigmas(sd, "beta", steps)
        assert len(sigmas) == count + 1
        assert torch.all(sigmas[:-1] > sigmas[1:])
    tail = calculate_sigmas(sd, "beta", 400)[-7:-1]
    assert np.allclose(tail.numpy(), ref[[5, 4, 3, 2, 1, 0]], rtol=1e-6)


def test_beta_scheduler_against_scipy_when_available(sd):
    stats = pytest.importorskip("scipy.stats")
    for steps in (3, 5, 12, 25, 50, 64, 150):
        ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999)
        keep = [int(t) for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
        assert torch.equal(calculate_sigmas(sd, "beta", steps)[:-1], sd.sigmas[keep])


def test_denoise_runs_the_tail_of_a_longer_schedule(sd):
    for denoise, longer in ((0.5, 20), (0.3, 33), (0.75, 13)):
        tail = ksampler_sigmas(sd, "karras", 10, denoise)
        full = calculate_sigmas(sd, "karras", longer)
        assert len(tail) == 11 and torch.equal(tail, full[-11:])
    assert len(ksampler_sigmas(sd, "normal", 10, 0.0)) == 0
    # the longer schedule has int(steps / denoise) steps, truncated, not rounded (ComfyUI)
    for scheduler in ("karras", "normal"):
        for steps, denoise, longer in ((10, 0.6, 16), (10, 0.35, 28), (20, 0.7, 28), (7, 0.8, 8)):
            assert int(steps / denoise) == longer != round(steps / denoise)
            tail = ksampler_sigmas(sd, scheduler, steps, denoise)
            assert torch.equal(tail, calculate_sigmas(sd, scheduler, longer)[-(steps + 1):]), (scheduler, denoise)
    assert torch.equal(ksampler_sigmas(sd, "normal", 10, 1.0), calculate_sigmas(sd, "normal", 10))


def test_discard_penultimate_samplers_are_comfyuis():
    """ComfyUI's KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS."""
    from nodeflow.sampling import SAMPLERS
    flagged = {name for name, spec in SAMPLERS.items() if spec.discard_penultimate}
    assert flagged == {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}


def test_discard_penultimate(sd):
    sigmas = ksampler_sigmas(sd, "karras", 10, discard_penultimate=True)
    longer = calculate_sigmas(sd, "karras", 11)
    assert len(sigmas) == 11
    assert torch.equal(sigmas, torch.cat([longer[:-2], longer[-1:]]))


def test_accepts_model_handle_and_rejects_unknown_names(fake_model):
    m = fake_model()
    expected = calculate_sigmas(DiscreteSchedule.scaled_linear(), "karras", 5)
    assert torch.equal(calculate_sigmas(m, "karras", 5), expected)
    with pytest.raises(ValueError, match="unknown scheduler"):
        calculate_sigmas(m, "nope", 5)
