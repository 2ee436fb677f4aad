"""The KSampler / KSamplerAdvanced entry points: noise scaling, partial denoising, schedule
windows, noise masks, inpainting inputs, progress and interruption."""

import math

import pytest
import torch

from nodeflow.sampling import (
    SAMPLER_NAMES,
    DiscreteSchedule,
    calculate_sigmas,
    ksampler,
    latent_to_rgb_preview,
    prepare_noise,
    sample,
)

SD = DiscreteSchedule.scaled_linear()
SCALE = 0.18215


def latent(batch=1, h=8, w=8, seed=0):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))


def run(model, make_cond, lat, target=1.0, **kw):
    options = dict(seed=42, steps=10, cfg=1.0, sampler_name="euler", scheduler="simple")
    options.update(kw)
    return ksampler(model, lat, [[make_cond(target), {}]], [[make_cond(0.0), {}]], **options)


def test_txt2img_starts_from_noise_times_sqrt_one_plus_sigma_max_squared(fake_model, make_cond):
    model = fake_model()
    run(model, make_cond, {"samples": torch.zeros(1, 4, 8, 8)})
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(42))
    first = model.calls[0]
    # x_T = √(1 + σ_max²)·noise, and the network sees x_T/√(σ_max² + 1) = noise
    assert torch.allclose(first["x"], noise, atol=1e-5)
    assert float(first["t"][0]) == 999


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_result_is_the_raw_latent_of_the_models_answer(fake_model, make_cond, prediction_type):
    model = fake_model(prediction_type)
    out = run(model, make_cond, {"samples": torch.zeros(2, 4, 8, 8)}, target=0.5)
    assert out["samples"].dtype == torch.float32 and out["samples"].device.type == "cpu"
    assert torch.allclose(out["samples"], torch.full((2, 4, 8, 8), 0.5 / SCALE), atol=1e-3)
    assert len(model.calls) == 10


def test_img2img_denoise_runs_the_tail_and_adds_noise_times_sigma(fake_model, make_cond):
    model = fake_model()
    lat = latent()
    run(model, make_cond, {"samples": lat}, denoise=0.5, steps=10, scheduler="normal")
    sigma0 = float(calculate_sigmas(SD, "normal", 20)[-11])
    noise = prepare_noise(lat, 42)
    expected_x = lat * SCALE + noise * sigma0
    first = model.calls[0]
    assert torch.allclose(first["x"] * math.sqrt(sigma0 ** 2 + 1), expected_x, atol=1e-4)
    assert len(model.calls) == 10


def test_advanced_window_and_leftover_noise(fake_model, make_cond):
    """euler with an exact denoiser m: x_{i+1} − m = (x_i − m)·σ_{i+1}/σ_i."""
    model = fake_model()
    lat = {"samples": latent()}
    sigmas = calculate_sigmas(SD, "simple", 10)
    out = run(model, make_cond, lat, target=0.25, start_at_step=3, end_at_step=6, add_noise=False,
              return_with_leftover_noise=True)
    m = 0.25
    x3 = lat["samples"] * SCALE                                         # add_noise disabled: no noise at all
    expected = m + (x3 - m) * float(sigmas[6]) / float(sigmas[3])
    assert torch.allclose(out["samples"] * SCALE, expected, atol=1e-4)
    assert len(model.calls) == 3 and float(model.calls[0]["t"][0]) == float(SD.timestep(sigmas[3]))
    # without leftover noise the window's last σ is 0: fully denoised
    out = run(fake_model(), make_cond, lat, target=0.25, start_at_step=3, end_at_step=6, add_noise=False)
    assert torch.allclose(out["samples"] * SCALE, torch.full((1, 4, 8, 8), m), atol=1e-4)
    # a window starting at the end returns the input
    out = run(fake_model(), make_cond, lat, start_at_step=10)
    assert torch.equal(out["samples"], lat["samples"])


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "heun"])
def test_two_advanced_stages_equal_one_run(fake_model, make_cond, sampler_name):
    """The common ComfyUI split: stage 1 returns leftover noise, stage 2 continues without
    adding noise — the same as one run over all steps (deterministic samplers)."""
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    kw = dict(sampler_name=sampler_name, scheduler="karras", steps=8, cfg=3.0)
    pos, neg = [[make_cond(0.7), {}]], [[make_cond(-0.2), {}]]
    m1, m2 = fake_model(), fake_model()
    whole = ksampler(m1, lat, pos, neg, seed=9, **kw)
    stage1 = ksampler(m2, lat, pos, neg, seed=9, end_at_step=4, return_with_leftover_noise=True, **kw)
    stage2 = ksampler(m2, stage1, pos, neg, seed=9, start_at_step=4, add_noise=False, **kw)
    assert torch.allclose(whole["samples"], stage2["samples"], atol=1e-4)


@pytest.mark.parametrize("sampler_name", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc",
                                          "dpm_fast", "ddim", "lcm", "dpmpp_sde"])
def test_noise_mask_keeps_the_unmasked_region(fake_model, make_cond, sampler_name):
    lat = latent(batch=2)
    mask = torch.zeros(1, 64, 64)                                       # pixel resolution, as SetLatentNoiseMask gives
    mask[:, 16:48, 16:48] = 1.0
    out = run(fake_model(), make_cond, {"samples": lat, "noise_mask": mask}, sampler_name=sampler_name, target=0.5)
    keep = torch.ones(2, 4, 8, 8, dtype=torch.bool)
    keep[:, :, 2:6, 2:6] = False
    assert torch.equal(out["samples"][keep], lat[keep])
    assert not torch.allclose(out["samples"][~keep], lat[~keep])
    if sampler_name != "dpm_fast":           # dpm_fast stops at the last σ > 0 of the schedule (0.34 here)
        kept = out["samples"][~keep]
        assert torch.allclose(kept, torch.full_like(kept, 0.5 / SCALE), atol=0.05 / SCALE)
    assert torch.equal(out["noise_mask"], mask)


def _bilinear_latent_mask(pixel_mask: torch.Tensor) -> torch.Tensor:
    """A [H, W] pixel mask resized to [H/8, W/8] as bilinear interpolation (half-pixel centres,
    no antialiasing) does for a factor of 8: latent cell i samples pixel coordinate 8i + 3.5,
    i.e. the mean of pixels 8i+3 and 8i+4 along each axis."""
    h, w = pixel_mask.shape
    out = torch.zeros(h // 8, w // 8)
    for i in range(h // 8):
        for j in range(w // 8):
            out[i, j] = pixel_mask[8 * i + 3:8 * i + 5, 8 * j + 3:8 * j + 5].mean()
    return out


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("m", [0.25, 0.5])
def test_soft_noise_mask_ends_at_m_times_d_plus_one_minus_m_times_the_input(fake_model, make_cond, sampler_name, m):
    """ComfyUI applies a soft mask once: the last step lands on KSamplerX0Inpaint's blend
    m·D + (1 − m)·L (not m²·D + (1 − m²)·L)."""
    lat = latent()
    out = run(fake_model(), make_cond, {"samples": lat, "noise_mask": torch.full((1, 8, 8), m)},
              sampler_name=sampler_name, target=0.5)["samples"]
    expected = m * (0.5 / SCALE) + (1 - m) * lat
    assert torch.allclose(out, expected, atol=1e-3)


def test_pixel_mask_off_the_latent_grid_is_resized_bilinearly_and_applied_once(fake_model, make_cond):
    lat = latent()
    pixels = torch.zeros(64, 64)
    pixels[20:44, 20:44] = 1.0                     # edges at 20 and 44: not multiples of 8
    m = _bilinear_latent_mask(pixels)
    assert m[2, 2] == 0.25 and m[2, 3] == 0.5 and m[3, 3] == 1.0 and m[5, 5] == 0.25   # soft cells
    out = run(fake_model(), make_cond, {"samples": lat, "noise_mask": pixels[None]}, target=0.5)["samples"]
    expected = m * (0.5 / SCALE) + (1 - m) * lat
    assert torch.allclose(out, expected, atol=1e-3)
    assert torch.equal(out[:, :, m == 0], lat[:, :, m == 0])      # the unmasked region is the input, exactly


def test_masked_denoiser_prediction_outside_the_mask_is_the_input_latent(fake_model, make_cond):
    """At every step (not only in the final result), D outside the mask is the input latent
    and the state there is the input latent noised to the step's σ."""
    lat = latent()
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1.0
    seen = {}
    run(fake_model(), make_cond, {"samples": lat, "noise_mask": mask}, target=0.5,
        callback=lambda step, total, x, den: seen.setdefault(step, (x.clone(), den.clone())))
    sigmas = calculate_sigmas(SD, "simple", 10)
    noise = prepare_noise(lat, 42)
    # from σ_max the start is L + √(1+σ₀²)·noise; Euler with D = L scales x − L by σ_{i+1}/σ_i
    k = math.sqrt(1 + float(sigmas[0]) ** 2) / float(sigmas[0])
    for step in (1, 4, 7):
        x, den = seen[step]
        assert torch.equal(den[..., :4], (lat * SCALE)[..., :4])
        assert torch.allclose(den[..., 4:], torch.full_like(den[..., 4:], 0.5), atol=1e-4)
        assert torch.allclose(x[..., :4], (lat * SCALE + noise * k * float(sigmas[step]))[..., :4], atol=1e-4)


def test_masked_leftover_noise_is_returned_as_sampled(fake_model, make_cond):
    """With return_with_leftover_noise ComfyUI returns the sampler's state: outside the mask,
    the input latent still noised to the last σ of the window."""
    lat = latent()
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1.0
    out = run(fake_model(), make_cond, {"samples": lat, "noise_mask": mask}, target=0.5, end_at_step=6,
              return_with_leftover_noise=True)["samples"]
    sigmas = calculate_sigmas(SD, "simple", 10)
    k = math.sqrt(1 + float(sigmas[0]) ** 2) / float(sigmas[0])       # started from √(1+σ₀²)·noise
    noise = prepare_noise(lat, 42)
    assert torch.allclose(out[..., :4], (lat + noise * k * float(sigmas[6]) / SCALE)[..., :4], atol=1e-3)


def test_masked_model_inputs_see_the_input_latent_noised_to_sigma(fake_model, make_cond):
    model = fake_model()
    lat = latent()
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1.0
    run(model, make_cond, {"samples": lat, "noise_mask": mask}, scheduler="simple")
    noise = prepare_noise(lat, 42)
    sigmas = calculate_sigmas(SD, "simple", 10)
    for i in (0, 4):
        s = float(sigmas[i])
        seen = model.calls[i]["x"] * math.sqrt(s * s + 1)
        assert torch.allclose(seen[..., :4], (lat * SCALE + noise * s)[..., :4], atol=1e-4)


def test_ddim_renoises_masked_areas_with_fresh_noise(fake_model, make_cond):
    """ComfyUI's "ddim" re-noises the kept area with noise from seed + 1, not the initial noise."""
    model = fake_model()
    lat = latent()
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1.0
    run(model, make_cond, {"samples": lat, "noise_mask": mask}, sampler_name="ddim", seed=7)
    fresh = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(8))
    s = float(calculate_sigmas(SD, "simple", 10)[2])
    seen = model.calls[2]["x"] * math.sqrt(s * s + 1)
    assert torch.allclose(seen[..., :4], (lat * SCALE + fresh * s)[..., :4], atol=1e-4)


def test_inpainting_model_gets_mask_and_masked_image_channels(fake_model, make_cond):
    model = fake_model(in_channels=9)
    lat = latent()
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 0.8                                            # rounded to 1 for the model input
    run(model, make_cond, {"samples": lat, "noise_mask": mask}, cfg=2.0)
    c = model.calls[0]["c_concat"]
    assert c.shape == (2, 5, 8, 8)
    expected_mask = (mask > 0.5).float()
    assert torch.equal(c[:, 0], expected_mask.expand(2, 8, 8))
    assert torch.allclose(c[:, 1:], (lat * SCALE).expand(2, 4, 8, 8))
    # without a mask: everything may change, and the "masked image" is grey's latent
    model = fake_model(in_channels=9)
    run(model, make_cond, {"samples": torch.zeros(1, 4, 8, 8)})
    c = model.calls[0]["c_concat"]
    assert torch.equal(c[:, 0], torch.ones(1, 8, 8))
    assert torch.allclose(c[0, 1:, 0, 0], torch.tensor([0.8223, -0.6876, 0.6364, 0.1380]))


def test_batch_index_noise(fake_model, make_cond):
    model = fake_model()
    run(model, make_cond, {"samples": torch.zeros(2, 4, 8, 8), "batch_index": [1, 3]})
    g = torch.Generator().manual_seed(42)
    draws = [torch.randn((1, 4, 8, 8), generator=g) for _ in range(4)]
    assert torch.allclose(model.calls[0]["x"], torch.cat([draws[1], draws[3]]), atol=1e-5)


def test_progress_and_interruption(fake_model, make_cond):
    seen = []
    run(fake_model(), make_cond, {"samples": torch.zeros(1, 4, 8, 8)}, steps=6,
        callback=lambda step, total, x, den: seen.append((step, total, x.shape, den.shape)))
    assert [s[:2] for s in seen] == [(i, 6) for i in range(1, 7)]
    assert all(s[2] == s[3] == (1, 4, 8, 8) for s in seen)

    class Interrupted(Exception):
        pass

    def stop(step, total, x, den):
        if step == 3:
            raise Interrupted

    lat = {"samples": latent(), "noise_mask": torch.ones(1, 8, 8)}
    before = lat["samples"].clone()
    model = fake_model()
    with pytest.raises(Interrupted):
        run(model, make_cond, lat, callback=stop)
    assert len(model.calls) == 3 and torch.equal(lat["samples"], before)


@pytest.mark.parametrize("sampler_name", SAMPLER_NAMES)
def test_every_sampler_through_ksampler(fake_model, make_cond, sampler_name):
    """Same seed ⇒ identical output; another seed ⇒ a different one (initial noise); progress
    reaches the last step."""
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    steps = []
    a = run(fake_model(), make_cond, lat, sampler_name=sampler_name, scheduler="karras", steps=5, cfg=1.5,
            seed=1, callback=lambda s, t, x, d: steps.append((s, t)))["samples"]
    same = dict(sampler_name=sampler_name, scheduler="karras", steps=5, cfg=1.5)
    b = run(fake_model(), make_cond, lat, seed=1, **same)["samples"]
    c = run(fake_model(), make_cond, lat, seed=2, **same)["samples"]
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, c)
    assert steps[-1][0] == steps[-1][1] == 5


def test_empty_latent_of_other_channel_count_and_unknown_names(fake_model, make_cond):
    out = run(fake_model(), make_cond, {"samples": torch.zeros(1, 16, 8, 8)}, steps=2)
    assert out["samples"].shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="unknown sampler"):
        run(fake_model(), make_cond, {"samples": torch.zeros(1, 4, 8, 8)}, sampler_name="nope")
    with pytest.raises(ValueError, match="unknown scheduler"):
        run(fake_model(), make_cond, {"samples": torch.zeros(1, 4, 8, 8)}, scheduler="nope")


def test_sample_with_disable_noise_and_zero_denoise(fake_model, make_cond):
    lat = latent()
    out = sample(fake_model(), prepare_noise(lat, 1), [[make_cond(1.0), {}]], [], cfg=1.0, sampler_name="euler",
                 scheduler="normal", steps=4, latent_image=lat, denoise=0.0)
    assert torch.equal(out, lat)


def test_latent_to_rgb_preview():
    x0 = torch.zeros(2, 4, 3, 5)
    x0[:, 3] = 1.0                                             # channel 3 alone: (row 3 of the factors + 1) / 2
    rgb = latent_to_rgb_preview(x0)
    assert rgb.shape == (2, 3, 5, 3)
    assert torch.allclose(rgb[0, 0, 0], (torch.tensor([-0.2120, -0.2616, -0.7177]) + 1) / 2)
    xl = latent_to_rgb_preview(torch.zeros(1, 4, 2, 2), family="sdxl")
    assert torch.allclose(xl[0, 0, 0], (torch.tensor([0.1084, -0.0175, -0.0011]) + 1) / 2)
    assert latent_to_rgb_preview(torch.full((1, 4, 2, 2), 100.0)).max() == 1.0
    assert torch.equal(latent_to_rgb_preview(x0, family="sdxl_refiner"), latent_to_rgb_preview(x0, family="sdxl"))


COMFYUI_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
COMFYUI_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                      "linear_quadratic", "kl_optimal"]


def test_names_are_comfyuis():
    from nodeflow.sampling import SCHEDULER_NAMES
    assert SAMPLER_NAMES == COMFYUI_SAMPLERS
    assert SCHEDULER_NAMES == COMFYUI_SCHEDULERS
