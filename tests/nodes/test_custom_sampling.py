"""The SamplerCustom family, checked against independent expectations: the schedules'
closed forms, the KSampler's own result for the same settings, samplers that reduce to
others when their noise is off, and guidance formulas evaluated by hand."""

from __future__ import annotations

import math

import pytest
import torch

from nodeflow import Executor, default_registry
from nodeflow import context as run_context
from nodeflow.models.diffusion import sd_alphas_cumprod
from nodeflow.sampling import DiscreteSchedule, ksampler
from nodes.custom_sampling import (
    BasicGuider,
    BasicScheduler,
    CFGGuider,
    DisableNoise,
    DualCFGGuider,
    ExponentialScheduler,
    FlipSigmas,
    KarrasScheduler,
    KSamplerSelect,
    PolyexponentialScheduler,
    RandomNoise,
    SamplerCustom,
    SamplerCustomAdvanced,
    SamplerDPMPP_2M_SDE,
    SamplerDPMPP_SDE,
    SamplerEulerAncestral,
    SDTurboScheduler,
    SplitSigmas,
    SplitSigmasDenoise,
)

SD_SIGMAS = ((1 - sd_alphas_cumprod().double()) / sd_alphas_cumprod().double()).sqrt()   # σ_t, t = 0 … 999


def latent(seed=0, shape=(1, 4, 8, 8), scale=0.0):
    return {"samples": torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale}


# -- schedules ---------------------------------------------------------------------------------------

def test_karras_exponential_polyexponential_closed_forms():
    (k,) = KarrasScheduler().run(steps=5, sigma_max=10.0, sigma_min=0.1, rho=7.0)
    expected = [(10 ** (1 / 7) + i / 4 * (0.1 ** (1 / 7) - 10 ** (1 / 7))) ** 7 for i in range(5)] + [0.0]
    assert torch.allclose(k, torch.tensor(expected), rtol=1e-5)
    (e,) = ExponentialScheduler().run(steps=4, sigma_max=8.0, sigma_min=1.0)
    assert torch.allclose(e, torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0]), rtol=1e-5)   # log-uniform: halving
    (p1,) = PolyexponentialScheduler().run(steps=4, sigma_max=8.0, sigma_min=1.0, rho=1.0)
    assert torch.allclose(p1, e, rtol=1e-5)                                         # ρ = 1 is exponential
    (p2,) = PolyexponentialScheduler().run(steps=3, sigma_max=16.0, sigma_min=1.0, rho=2.0)
    # log2 σ = 4 · (1 − i/2)²: 4, 1, 0
    assert torch.allclose(p2, torch.tensor([16.0, 2.0, 1.0, 0.0]), rtol=1e-5)


def test_exponential_schedules_need_positive_sigmas():
    assert ExponentialScheduler.validate_inputs(steps=4, sigma_max=8.0, sigma_min=0.0)
    assert PolyexponentialScheduler.validate_inputs(steps=4, sigma_max=8.0, sigma_min=0.5, rho=1.0) is None
    assert KarrasScheduler.validate_inputs(steps=4, sigma_max=8.0, sigma_min=0.0) is None   # Karras allows 0


def test_basic_scheduler_is_the_ksampler_schedule(stub_model):
    from nodeflow.sampling import ksampler_sigmas

    (full,) = BasicScheduler().run(stub_model, "karras", steps=10, denoise=1.0)
    assert torch.equal(full, ksampler_sigmas(stub_model, "karras", 10, 1.0))
    assert len(full) == 11 and full[-1] == 0
    (part,) = BasicScheduler().run(stub_model, "normal", steps=6, denoise=0.5)
    (longer,) = BasicScheduler().run(stub_model, "normal", steps=12, denoise=1.0)
    assert torch.equal(part, longer[-7:])                     # the last 6 steps of a 12-step schedule
    assert len(BasicScheduler().run(stub_model, "normal", steps=6, denoise=0.0)[0]) == 0


def test_sd_turbo_schedule_uses_timesteps_999_899_and_so_on(stub_model):
    (one,) = SDTurboScheduler().run(stub_model, steps=1, denoise=1.0)
    assert torch.allclose(one, torch.tensor([SD_SIGMAS[999].item(), 0.0]), rtol=1e-5)
    (four,) = SDTurboScheduler().run(stub_model, steps=4, denoise=1.0)
    assert torch.allclose(four[:-1], SD_SIGMAS[[999, 899, 799, 699]].float(), rtol=1e-5)
    (half,) = SDTurboScheduler().run(stub_model, steps=2, denoise=0.5)  # starts 5 places in
    assert torch.allclose(half[:-1], SD_SIGMAS[[499, 399]].float(), rtol=1e-5)


def test_split_and_flip_sigmas():
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    high, low = SplitSigmas().run(s, step=2)
    assert high.tolist() == [5.0, 4.0, 3.0] and low.tolist() == [3.0, 2.0, 1.0, 0.0]
    high, low = SplitSigmasDenoise().run(s, denoise=0.4)       # 5 steps · 0.4 = the last 2
    assert high.tolist() == [5.0, 4.0, 3.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    high, low = SplitSigmasDenoise().run(s, denoise=0.0)
    assert high.tolist() == s.tolist() and low.tolist() == [0.0]
    (flipped,) = FlipSigmas().run(s)
    assert flipped.tolist() == pytest.approx([0.0001, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert s[-1] == 0.0                                        # the input is not changed


# -- sampling ------------------------------------------------------------------------------------------

def test_sampler_custom_matches_the_ksampler(stub_model, make_cond):
    pos, neg = make_cond(0.7), make_cond(-0.3)
    lat = latent(scale=0.0)
    for sampler_name, scheduler in (("euler", "normal"), ("euler_ancestral", "karras"), ("dpmpp_2m", "simple")):
        expected = ksampler(stub_model, lat, pos, neg, seed=11, steps=6, cfg=4.0, sampler_name=sampler_name,
                            scheduler=scheduler)["samples"]
        (sigmas,) = BasicScheduler().run(stub_model, scheduler, 6, 1.0)
        (sampler,) = KSamplerSelect().run(sampler_name)
        out, denoised = SamplerCustom().run(stub_model, True, 11, 4.0, pos, neg, sampler, sigmas, lat)
        assert torch.allclose(out["samples"], expected, atol=1e-5), sampler_name
        (noise,) = RandomNoise().run(11)
        (guider,) = CFGGuider().run(stub_model, pos, neg, 4.0)
        adv, _ = SamplerCustomAdvanced().run(noise, guider, sampler, sigmas, lat)
        assert torch.allclose(adv["samples"], expected, atol=1e-5), sampler_name
        # The last step lands on σ = 0, where the sample is the model's last prediction.
        assert torch.allclose(denoised["samples"], out["samples"], atol=1e-4)


def test_img2img_denoise_and_inpainting_mask_match_the_ksampler(stub_model, make_cond):
    pos, neg = make_cond(0.5), make_cond(0.0)
    lat = latent(seed=3, scale=1.0)
    lat["noise_mask"] = torch.zeros(1, 1, 8, 8)
    lat["noise_mask"][..., 2:6, 2:6] = 1.0
    expected = ksampler(stub_model, lat, pos, neg, seed=5, steps=4, cfg=3.0, sampler_name="euler",
                        scheduler="normal", denoise=0.5)["samples"]
    (sigmas,) = BasicScheduler().run(stub_model, "normal", 4, 0.5)
    out, _ = SamplerCustom().run(stub_model, True, 5, 3.0, pos, neg, KSamplerSelect().run("euler")[0], sigmas, lat)
    assert torch.allclose(out["samples"], expected, atol=1e-5)
    keep = lat["noise_mask"][0, 0] == 0
    assert torch.equal(out["samples"][..., keep], lat["samples"][..., keep])        # outside the mask: the input
    assert "noise_mask" in out and torch.equal(out["noise_mask"], lat["noise_mask"])


def test_no_noise_and_empty_schedule(stub_model, make_cond):
    pos = make_cond(0.5)
    lat = latent(seed=4, scale=1.0)
    (sampler,) = KSamplerSelect().run("euler")
    out, denoised = SamplerCustom().run(stub_model, True, 0, 1.0, pos, pos, sampler, torch.zeros(0), lat)
    assert torch.equal(out["samples"], lat["samples"]) and torch.equal(denoised["samples"], lat["samples"])
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    a, _ = SamplerCustom().run(stub_model, False, 1, 1.0, pos, pos, sampler, sigmas, lat)
    b, _ = SamplerCustomAdvanced().run(DisableNoise().run()[0], BasicGuider().run(stub_model, pos)[0], sampler,
                                       sigmas, lat)
    assert torch.allclose(a["samples"], b["samples"], atol=1e-6)   # no noise, cfg 1 = the basic guider


def test_sampler_options_reach_the_sampler(stub_model, make_cond):
    pos, neg = make_cond(0.4), make_cond(-0.4)
    lat = latent(scale=0.0)
    (sigmas,) = BasicScheduler().run(stub_model, "karras", 5, 1.0)

    def run(sampler, seed=7):
        return SamplerCustom().run(stub_model, True, seed, 3.0, pos, neg, sampler, sigmas, lat)[0]["samples"]

    # Ancestral sampling without its fresh noise (η = 0) is plain Euler.
    euler = run(KSamplerSelect().run("euler")[0])
    assert torch.allclose(run(SamplerEulerAncestral().run(0.0, 1.0)[0]), euler, atol=1e-5)
    assert not torch.allclose(run(SamplerEulerAncestral().run(1.0, 1.0)[0]), euler, atol=1e-3)
    # DPM-Solver++(2M) SDE with η = 0 and the midpoint correction is DPM-Solver++(2M).
    (sde,) = SamplerDPMPP_2M_SDE().run("midpoint", 0.0, 1.0, "cpu")
    assert sde.name == "dpmpp_2m_sde" and sde.options["solver_type"] == "midpoint"
    assert torch.allclose(run(sde), run(KSamplerSelect().run("dpmpp_2m")[0]), atol=1e-4)
    assert SamplerDPMPP_2M_SDE().run("heun", 1.0, 1.0, "gpu")[0].name == "dpmpp_2m_sde_gpu"
    # DPM++ SDE: with η = 0 the per-step noise (and so its seed) no longer matters.
    (quiet,) = SamplerDPMPP_SDE().run(0.0, 1.0, 0.5, "cpu")
    assert quiet.name == "dpmpp_sde" and quiet.options == {"eta": 0.0, "s_noise": 1.0, "r": 0.5}
    no_noise = latent(seed=9, scale=1.0)
    sample = [SamplerCustom().run(stub_model, False, seed, 3.0, pos, neg, sampler, sigmas, no_noise)[0]["samples"]
              for seed in (1, 2) for sampler in (quiet, SamplerDPMPP_SDE().run(1.0, 1.0, 0.5, "cpu")[0])]
    assert torch.allclose(sample[0], sample[2], atol=1e-6) and not torch.allclose(sample[1], sample[3], atol=1e-3)


def test_guiders_combine_predictions_as_their_formulas_say(stub_model, make_cond):
    from nodeflow.sampling import CFGDenoiser

    c1, c2, neg = make_cond(0.9), make_cond(0.2), make_cond(-0.5)
    schedule = DiscreteSchedule.from_model(stub_model)
    shape = (1, 4, 8, 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.tensor([2.5])

    def prediction(cond):   # D(x, σ | cond) of the model alone, no guidance
        return CFGDenoiser(stub_model, schedule, cond, [], 1.0, shape, "cpu")(x, sigma)

    d1, d2, dn = prediction(c1), prediction(c2), prediction(neg)
    (dual,) = DualCFGGuider().run(stub_model, c1, c2, neg, 3.0, 5.0, "regular")
    got = dual.denoiser(schedule, shape, "cpu", torch.zeros(shape), None)(x, sigma)
    assert torch.allclose(got, dn + 5.0 * (d2 - dn) + 3.0 * (d1 - d2), atol=1e-5)
    (cfg,) = CFGGuider().run(stub_model, c1, neg, 6.0)
    got = cfg.denoiser(schedule, shape, "cpu", torch.zeros(shape), None)(x, sigma)
    assert torch.allclose(got, dn + 6.0 * (d1 - dn), atol=1e-5)
    (basic,) = BasicGuider().run(stub_model, c2)
    assert torch.allclose(basic.denoiser(schedule, shape, "cpu", torch.zeros(shape), None)(x, sigma), d2, atol=1e-6)
    # cfg 1 on both scales: only cond1 is evaluated.
    stub_model.calls = 0
    (ones,) = DualCFGGuider().run(stub_model, c1, c2, neg, 1.0, 1.0, "regular")
    got = ones.denoiser(schedule, shape, "cpu", torch.zeros(shape), None)(x, sigma)
    assert torch.allclose(got, d1, atol=1e-6) and stub_model.calls == 1


def test_schemas_are_comfyuis():
    reg = default_registry()
    info = reg.object_info("SamplerCustom")["SamplerCustom"]
    assert info["input_order"]["required"] == ["model", "add_noise", "noise_seed", "cfg", "positive", "negative",
                                               "sampler", "sigmas", "latent_image"]
    assert info["output"] == ["LATENT", "LATENT"] and info["output_name"] == ["output", "denoised_output"]
    adv = reg.object_info("SamplerCustomAdvanced")["SamplerCustomAdvanced"]
    assert adv["input_order"]["required"] == ["noise", "guider", "sampler", "sigmas", "latent_image"]
    karras = reg.object_info("KarrasScheduler")["KarrasScheduler"]["input"]["required"]
    assert karras["sigma_max"][1]["default"] == 14.614642 and karras["sigma_min"][1]["default"] == 0.0291675
    assert karras["rho"][1]["default"] == 7.0
    turbo = reg.object_info("SDTurboScheduler")["SDTurboScheduler"]["input"]["required"]
    assert (turbo["steps"][1]["default"], turbo["steps"][1]["min"], turbo["steps"][1]["max"]) == (1, 1, 10)
    split = reg.object_info("SplitSigmas")["SplitSigmas"]
    assert split["output_name"] == ["high_sigmas", "low_sigmas"]
    for name, kind in (("KSamplerSelect", "SAMPLER"), ("RandomNoise", "NOISE"), ("DisableNoise", "NOISE"),
                       ("CFGGuider", "GUIDER"), ("BasicGuider", "GUIDER"), ("DualCFGGuider", "GUIDER"),
                       ("SamplerEulerAncestral", "SAMPLER"), ("SamplerDPMPP_2M_SDE", "SAMPLER"),
                       ("SamplerDPMPP_SDE", "SAMPLER"), ("PolyexponentialScheduler", "SIGMAS"),
                       ("ExponentialScheduler", "SIGMAS"), ("FlipSigmas", "SIGMAS"), ("SplitSigmasDenoise", "SIGMAS")):
        assert reg.object_info(name)[name]["output"][0] == kind


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    import nodeflow.folders as folders_mod
    from nodeflow.models.testing import write_tiny_sd1

    base = tmp_path_factory.mktemp("custom_sampling")
    write_tiny_sd1(base / "models" / "checkpoints" / "tiny_sd1.safetensors")
    saved = run_context.default()._folders
    folders_mod.configure(base)
    yield base
    run_context.default()._folders = saved


def test_sdxl_turbo_style_workflow_runs(tiny_base):
    """SDXL-Turbo's example graph (SamplerCustom + SDTurboScheduler + KSamplerSelect), in API
    format with ComfyUI's class names, on a tiny SD 1.x checkpoint."""
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd1.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "SDTurboScheduler", "inputs": {"model": ["1", 0], "steps": 1, "denoise": 1.0}},
        "6": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}},
        "7": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 0, "cfg": 1.0, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["6", 0], "sigmas": ["5", 0], "latent_image": ["4", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    result = Executor(default_registry()).run(wf)
    assert result.ok, result.error
    image = result.output("8")
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    assert math.isclose(float(result.output("5")[0]), float(SD_SIGMAS[999]), rel_tol=1e-5)
