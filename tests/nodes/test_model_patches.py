"""ModelSamplingDiscrete, checked with "oracle" models that know the clean latent x₀ and
answer exactly in one parameterisation (ε, v or x₀): sampled with the matching setting, a
single Euler step lands on x₀; read with another, it does not. The schedules are compared
with values computed here from ᾱ directly."""

from __future__ import annotations

import pytest
import torch

from nodeflow.models.diffusion import sd_alphas_cumprod
from nodeflow.sampling import DiscreteSchedule, ksampler
from nodes.model_patches import ModelSamplingDiscrete

# SD's "scaled linear" ᾱ_t in float64: β linear in √β from 0.00085 to 0.012.
ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, dim=0)
TARGET = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))     # the raw latent to find


class Oracle:
    """A model handle whose "network" knows x₀ and returns the exact ε, v or x₀ for it. It
    reads σ off the timestep, so it is exact where the sampler's σ is a training σ (the
    "simple" scheduler)."""

    def __init__(self, answers: str, alphas=ALPHAS):
        self.answers, self.sigmas = answers, ((1 - alphas) / alphas).sqrt()
        self.alphas_cumprod = sd_alphas_cumprod()
        self.prediction_type = "eps"
        self.in_channels = self.latent_channels = 4
        self.device = torch.device("cpu")
        self.patches = {}

    def clone(self):
        import copy

        return copy.copy(self)

    def process_latent_in(self, x):
        return x * 0.18215

    def process_latent_out(self, x):
        return x / 0.18215

    def apply_model(self, x_in, t, context, **_):
        s = self.sigmas[t.long()].reshape(-1, 1, 1, 1)
        x = x_in.double() * (s ** 2 + 1).sqrt()
        x0 = TARGET.double() * 0.18215
        if self.answers == "eps":
            out = (x - x0) / s
        elif self.answers == "v":
            out = (x / (s ** 2 + 1) - x0) * (s ** 2 + 1).sqrt() / s
        else:
            out = x0.expand_as(x)
        return out.float()


def sample(model, sampler="euler", steps=1):
    cond = [[torch.zeros(1, 77, 8), {}]]
    return ksampler(model, {"samples": torch.zeros(1, 4, 8, 8)}, cond, cond, seed=3, steps=steps, cfg=1.0,
                    sampler_name=sampler, scheduler="simple")["samples"]


@pytest.mark.parametrize("answers,sampling", [("v", "v_prediction"), ("x0", "x0"), ("eps", "eps")])
def test_the_matching_setting_finds_x0_and_the_input_is_unchanged(answers, sampling):
    oracle = Oracle(answers)
    (patched,) = ModelSamplingDiscrete().run(oracle, sampling, False)
    assert patched is not oracle
    assert oracle.prediction_type == "eps" and not hasattr(oracle, "_nodeflow_schedule")   # never mutated
    assert torch.allclose(sample(patched), TARGET, atol=1e-3)
    if answers != "eps":
        assert not torch.allclose(sample(oracle), TARGET, atol=0.1)    # read as ε, the answer is wrong


def test_v_prediction_sets_the_handle_and_schedule():
    (patched,) = ModelSamplingDiscrete().run(Oracle("v"), "v_prediction", False)
    assert patched.prediction_type == "v"
    assert DiscreteSchedule.from_model(patched).prediction_type == "v"
    (back,) = ModelSamplingDiscrete().run(patched, "eps", False)
    assert back.prediction_type == "eps" and DiscreteSchedule.from_model(back).prediction_type == "eps"


def test_zero_terminal_snr_schedule():
    (patched,) = ModelSamplingDiscrete().run(Oracle("v"), "v_prediction", True)
    schedule = DiscreteSchedule.from_model(patched)
    # Lin et al. 2024, Algorithm 1, written out here: shift √ᾱ to end at 0, scale to keep √ᾱ₀.
    root = ALPHAS.sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    alphas = root ** 2
    alphas[-1] = 4.8973451890853435e-08                        # ComfyUI's stand-in for 0
    expected = ((1 - alphas) / alphas).sqrt()
    assert torch.allclose(schedule.sigmas.double(), expected, rtol=1e-4)
    assert schedule.sigma_max == pytest.approx(4518.8, rel=1e-3)
    assert schedule.sigma_min == pytest.approx(float(expected[0]), rel=1e-5)
    # The v oracle on that schedule: still found from pure noise at σ ≈ 4519 (float32 at that
    # scale leaves errors of a few 1e-3).
    zsnr_oracle = Oracle("v", alphas)
    (patched,) = ModelSamplingDiscrete().run(zsnr_oracle, "v_prediction", True)
    assert torch.allclose(sample(patched), TARGET, atol=1e-2)


def test_lcm_schedule_is_50_of_the_1000_timesteps_with_the_consistency_output():
    (patched,) = ModelSamplingDiscrete().run(Oracle("eps"), "lcm", False)
    schedule = DiscreteSchedule.from_model(patched)
    sd_sigmas = ((1 - ALPHAS) / ALPHAS).sqrt()
    kept = list(range(19, 1000, 20))
    assert len(schedule.sigmas) == 50
    assert torch.allclose(schedule.sigmas.double(), sd_sigmas[kept], rtol=1e-5)
    assert schedule.timestep(torch.tensor([float(sd_sigmas[499]), float(sd_sigmas[19])])).tolist() == [499.0, 19.0]
    assert float(schedule.sigma(torch.tensor(499.0))) == pytest.approx(float(sd_sigmas[499]), rel=1e-5)
    # D = c_skip·x + c_out·(x − σ·ε) with c_skip = ¼/((10t)² + ¼), c_out = 10t/√((10t)² + ¼)
    sigma = torch.tensor([float(sd_sigmas[499])])
    x, eps = torch.full((1, 4, 2, 2), 3.0), torch.full((1, 4, 2, 2), 0.5)
    t = 4990.0
    c_skip, c_out = 0.25 / (t ** 2 + 0.25), t / (t ** 2 + 0.25) ** 0.5
    expected = c_skip * 3.0 + c_out * (3.0 - float(sigma) * 0.5)
    assert torch.allclose(schedule.calculate_denoised(sigma, eps, x), torch.full_like(x, expected), rtol=1e-5)
    # The LCM sampler with an exact ε answer: c_skip ≈ 0 at these timesteps, so x₀ is found.
    assert torch.allclose(sample(patched, "lcm", steps=4), TARGET, atol=1e-2)


def test_a_later_clone_keeps_the_sampling_patch():
    """A handle patched by ModelSamplingDiscrete and then cloned (LoRA, other patches) must
    keep its sampling. Holds for handles whose ``clone()`` copies the handle's attributes
    (the stand-ins here); ``DiffusionModel.clone()`` must do the same (see the note in
    nodes/model_patches.py)."""
    (patched,) = ModelSamplingDiscrete().run(Oracle("v"), "v_prediction", False)
    clone = patched.clone()
    assert DiscreteSchedule.from_model(clone).prediction_type == "v"


def test_diffusion_model_clone_keeps_the_sampling_patch():
    from nodeflow.models.diffusion import DiffusionModel
    from nodeflow.models.testing import tiny_unet_config
    from nodeflow.models.unet import UNet

    model = DiffusionModel(UNet(tiny_unet_config("sd1")), family="sd1", device=torch.device("cpu"))
    (patched,) = ModelSamplingDiscrete().run(model, "lcm", True)
    assert len(DiscreteSchedule.from_model(patched.clone()).sigmas) == 50
