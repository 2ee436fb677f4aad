"""Classifier-free guidance, combined and area/mask conditioning, batching.

FakeModel's denoised prediction for a conditioning tensor c is exactly c.mean() at every
latent cell when σ is one of the training σ, so each expected value is a hand computation."""

import torch

from nodeflow.sampling import CFGDenoiser, DiscreteSchedule

SD = DiscreteSchedule.scaled_linear()
SIGMA = SD.sigmas[600].reshape(1)          # a training σ: FakeModel is then exact


def denoise(model, positive, negative, cfg, shape=(2, 4, 16, 16), sigma=SIGMA, x=None):
    den = CFGDenoiser(model, SD, positive, negative, cfg, shape, "cpu")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) if x is None else x
    return den(x, sigma.expand(shape[0])), den


def test_cfg_combines_cond_and_uncond_in_one_batched_forward(fake_model, make_cond):
    model = fake_model()
    out, den = denoise(model, [[make_cond(1.0), {}]], [[make_cond(-0.5), {}]], cfg=7.0)
    assert torch.allclose(out, torch.full_like(out, -0.5 + 7.0 * (1.0 + 0.5)), atol=1e-4)
    assert len(model.calls) == 1 and model.calls[0]["x"].shape[0] == 4        # cond and uncond, batch 2 each
    contexts = model.calls[0]["context"].mean(dim=(1, 2))
    assert sorted(contexts.tolist()) == [-0.5, -0.5, 1.0, 1.0]
    assert torch.all(model.calls[0]["t"] == 600)


def test_cfg_1_skips_the_unconditional_pass(fake_model, make_cond):
    model = fake_model()
    out, den = denoise(model, [[make_cond(2.0), {}]], [[make_cond(-3.0), {}]], cfg=1.0)
    assert torch.allclose(out, torch.full_like(out, 2.0), atol=1e-4)
    assert len(model.calls) == 1 and model.calls[0]["x"].shape[0] == 2
    # CFG++ samplers ask for D_u even at cfg 1
    guided, uncond = den.denoise_with_uncond(torch.zeros(2, 4, 16, 16), SIGMA.expand(2))
    assert torch.allclose(uncond, torch.full_like(uncond, -3.0), atol=1e-4)
    assert torch.allclose(guided, torch.full_like(guided, 2.0), atol=1e-4)


def test_conditioning_combine_averages_by_strength(fake_model, make_cond):
    model = fake_model()
    out, _ = denoise(model, [[make_cond(1.0), {}], [make_cond(3.0), {}]], [], cfg=1.0)
    assert torch.allclose(out, torch.full_like(out, 2.0), atol=1e-4)
    out, _ = denoise(fake_model(), [[make_cond(1.0), {}], [make_cond(3.0), {"strength": 3.0}]], [], cfg=1.0)
    assert torch.allclose(out, torch.full_like(out, (1 * 1.0 + 3 * 3.0) / 4), atol=1e-4)


def _feather(n_inner: int, length: int = 12) -> torch.Tensor:
    """Weight along one axis of an area starting at the border: ramps (t+1)/8 over the 8
    cells before its inner edge."""
    i = torch.arange(length, dtype=torch.float32)
    return torch.clamp((length - i) / 8, max=1.0)


def test_area_conditioning_with_feathered_edges_and_matching_uncond(fake_model, make_cond):
    model = fake_model()
    positive = [[make_cond(0.0), {}], [make_cond(4.0), {"area": (12, 12, 0, 0)}]]
    negative = [[make_cond(1.0), {}]]
    out, den = denoise(model, positive, negative, cfg=3.0)
    w = _feather(12)[:, None] * _feather(12)[None, :]                      # (12, 12) weight of the area entry
    d_cond = torch.zeros(16, 16)
    d_cond[:12, :12] = 4.0 * w / (1.0 + w)
    expected = 1.0 + 3.0 * (d_cond - 1.0)                                   # D_u = 1 everywhere
    assert torch.allclose(out[0, 0], expected, atol=1e-4)
    assert torch.allclose(out[1, 3], expected, atol=1e-4)
    # the negative side got an entry with the same area, so both sides share the weighting
    assert sum(e.uncond and e.area == (12, 12, 0, 0) for e in den.entries) == 1
    shapes = sorted(tuple(c["x"].shape) for c in model.calls)
    assert shapes == [(4, 4, 12, 12), (4, 4, 16, 16)]                      # one pass per input shape


def test_area_in_percent(fake_model, make_cond):
    model = fake_model()
    positive = [[make_cond(2.0), {"area": ("percentage", 0.5, 0.25, 0.5, 0.0)}]]
    _, den = denoise(model, positive, [], cfg=1.0)
    assert den.entries[0].area == (8, 4, 8, 0)


def test_mask_conditioning(fake_model, make_cond):
    model = fake_model()
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0                                                 # left half, pixel-sized: resized to 16×16
    positive = [[make_cond(0.0), {}], [make_cond(4.0), {"mask": mask, "mask_strength": 1.0}]]
    out, _ = denoise(model, positive, [], cfg=1.0)
    assert torch.allclose(out[:, :, :, :8], torch.full((2, 4, 16, 8), 2.0), atol=1e-4)
    assert torch.allclose(out[:, :, :, 8:], torch.zeros(2, 4, 16, 8), atol=1e-4)


def test_mask_set_area_to_bounds(fake_model, make_cond):
    mask = torch.zeros(16, 16)
    mask[2:5, 3:13] = 1.0
    positive = [[make_cond(1.0), {"mask": mask, "set_area_to_bounds": True}]]
    _, den = denoise(fake_model(), positive, [], cfg=1.0)
    assert den.entries[0].area == (8, 10, 2, 3)                          # height raised to the minimum of 8


def test_start_and_end_percent(fake_model, make_cond):
    positive = [[make_cond(4.0), {"start_percent": 0.0, "end_percent": 0.5}],
                [make_cond(-2.0), {"start_percent": 0.5, "end_percent": 1.0}]]
    high, _ = denoise(fake_model(), positive, [], cfg=1.0, sigma=SD.sigmas[900].reshape(1))
    low, _ = denoise(fake_model(), positive, [], cfg=1.0, sigma=SD.sigmas[100].reshape(1))
    assert torch.allclose(high, torch.full_like(high, 4.0), atol=1e-4)
    assert torch.allclose(low, torch.full_like(low, -2.0), atol=1e-4)


def test_different_token_lengths_batch_at_their_lcm(fake_model, make_cond):
    model = fake_model()
    out, _ = denoise(model, [[make_cond(1.0, tokens=77), {}]], [[make_cond(0.0, tokens=154), {}]], cfg=2.0)
    assert len(model.calls) == 1 and model.calls[0]["context"].shape[1] == 154
    assert torch.allclose(out, torch.full_like(out, 2.0), atol=1e-4)
    model = fake_model()
    denoise(model, [[make_cond(1.0, tokens=77), {}]], [[make_cond(0.0, tokens=100), {}]], cfg=2.0)
    assert len(model.calls) == 2                                           # lcm would repeat 100×: run apart


def test_pooled_output_reaches_the_model_as_y(fake_model, make_cond):
    model = fake_model()
    positive = [[make_cond(1.0), {"pooled_output": torch.full((1, 6), 5.0)}]]
    negative = [[make_cond(0.0), {"pooled_output": torch.full((1, 6), -5.0)}]]
    denoise(model, positive, negative, cfg=2.0)
    y = model.calls[0]["y"]
    assert y.shape == (4, 6) and sorted(y[:, 0].tolist()) == [-5.0, -5.0, 5.0, 5.0]
