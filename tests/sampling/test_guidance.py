"""Classifier-free guidance, combined and area/mask conditioning, batching.

FakeModel's denoised prediction for a conditioning tensor c is exactly c.mean() at every
latent cell when σ is one of the training σ, so each expected value is a hand computation."""

import pytest
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


def _feather(length: int) -> torch.Tensor:
    """Weight along one axis of an area starting at the border and ending inside the latent:
    ComfyUI ramps it (t+1)/rr over the rr = min(8, length // 4) cells before its inner edge."""
    rr = min(8, length // 4)
    i = torch.arange(length, dtype=torch.float32)
    return torch.clamp((length - i) / rr, max=1.0) if rr else torch.ones(length)


def test_area_conditioning_with_feathered_edges_and_matching_uncond(fake_model, make_cond):
    model = fake_model()
    positive = [[make_cond(0.0), {}], [make_cond(4.0), {"area": (12, 12, 0, 0)}]]
    negative = [[make_cond(1.0), {}]]
    out, den = denoise(model, positive, negative, cfg=3.0)
    w = _feather(12)[:, None] * _feather(12)[None, :]                      # (12, 12) weight: ramps over 3 cells
    assert torch.equal(_feather(12)[8:], torch.tensor([1.0, 1.0, 2 / 3, 1 / 3]))
    d_cond = torch.zeros(16, 16)
    d_cond[:12, :12] = 4.0 * w / (1.0 + w)
    expected = 1.0 + 3.0 * (d_cond - 1.0)                                   # D_u = 1 everywhere
    assert torch.allclose(out[0, 0], expected, atol=1e-4)
    assert torch.allclose(out[1, 3], expected, atol=1e-4)
    # the negative side got an entry with the same area, so both sides share the weighting
    assert sum(e.uncond and e.area == (12, 12, 0, 0) for e in den.entries) == 1
    shapes = sorted(tuple(c["x"].shape) for c in model.calls)
    assert shapes == [(4, 4, 12, 12), (4, 4, 16, 16)]                      # one pass per input shape


def _ramp_weights(size: int, rr: int, inner_start: bool, inner_end: bool) -> torch.Tensor:
    """Hand-written weights along one axis: 1 inside, k/rr on the k-th cell from an inner edge."""
    w = torch.ones(size, dtype=torch.float64)
    for t in range(rr):
        if inner_start:
            w[t] *= (t + 1) / rr
        if inner_end:
            w[size - 1 - t] *= (t + 1) / rr
    return w


# (area size, feather width): rr = min(8, size // 4); areas under 4 cells get none
@pytest.mark.parametrize("size,rr", [(40, 8), (32, 8), (16, 4), (12, 3), (7, 1), (3, 0)])
def test_area_feather_width_is_a_quarter_of_the_area_up_to_8(fake_model, make_cond, size, rr):
    """An area strictly inside a 64×64 latent: one entry of value 4 over a background of 0,
    so D = 4·w / (1 + w) where w is the area's weight (ramps at all four inner edges)."""
    y0, x0 = 10, 13
    positive = [[make_cond(0.0), {}], [make_cond(4.0), {"area": (size, size, y0, x0)}]]
    out, den = denoise(fake_model(), positive, [], cfg=1.0, shape=(1, 4, 64, 64))
    ramp = _ramp_weights(size, rr, True, True)
    w = ramp[:, None] * ramp[None, :]
    expected = torch.zeros(64, 64, dtype=torch.float64)
    expected[y0:y0 + size, x0:x0 + size] = 4.0 * w / (1.0 + w)
    assert torch.allclose(out[0, 2].double(), expected, atol=1e-4)


def test_area_at_the_latent_border_is_not_feathered_there(fake_model, make_cond):
    """Only inner edges ramp: an area in the bottom-right corner ramps at its top and left."""
    positive = [[make_cond(0.0), {}], [make_cond(4.0), {"area": (20, 24, 44, 40)}]]
    out, _ = denoise(fake_model(), positive, [], cfg=1.0, shape=(1, 4, 64, 64))
    w = _ramp_weights(20, 5, True, False)[:, None] * _ramp_weights(24, 6, True, False)[None, :]
    assert torch.allclose(out[0, 0, 44:, 40:].double(), 4.0 * w / (1.0 + w), atol=1e-4)
    assert torch.allclose(out[0, 0, :44], torch.zeros(44, 64), atol=1e-4)


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


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_per_call_shortcuts_change_no_bit(fake_model, make_cond, prediction_type):
    """The σ factors worked out once per σ value and the whole-latent entries scaled once
    give exactly the numbers of the plain per-row computation."""
    positive = [[make_cond(0.7), {}], [make_cond(2.0), {"area": (8, 12, 4, 2), "strength": 1.5}]]
    negative = [[make_cond(-0.4), {}], [make_cond(0.3), {"strength": 0.5}]]
    shape = (2, 4, 16, 16)
    fast = CFGDenoiser(fake_model(prediction_type), SD, positive, negative, 4.5, shape, "cpu")
    plain = CFGDenoiser(fake_model(prediction_type), SD, positive, negative, 4.5, shape, "cpu")

    def per_row(sigma, n, like):
        rows = sigma.repeat(n)
        return rows, SD.timestep(rows), SD.terms(rows, like)

    plain._sigma_terms = per_row
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 3
    for value in (14.6, 3.3, float(SD.sigmas[400]), 0.05, 0.0293):
        sigma = torch.full((2,), value)
        assert torch.equal(fast(x, sigma), plain(x, sigma))
        assert torch.equal(fast(x, sigma), plain(x, sigma))            # and again, from the cache


class _CoarseSchedule(DiscreteSchedule):
    """A schedule subclass with its own σ → t map (every 20th training step, as LCM's) and a
    denoised form that reads σ per row, as model-patch schedules do."""

    def timestep(self, sigma):
        return super().timestep(sigma).div(20).round().mul(20).clamp(max=980)

    def calculate_denoised(self, sigma, model_output, x, terms=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        # σ, its terms, the output and x, all given per row (as nodes' LCM schedule needs)
        assert s.shape[0] == x.shape[0] == model_output.shape[0] == (terms.sigma.shape[0] if terms else s.shape[0])
        return x - model_output * s


def test_schedule_subclasses_keep_their_own_sigma_maps(fake_model, make_cond):
    """The per-call shortcuts are DiscreteSchedule's: a subclass overriding timestep or
    calculate_denoised is called with σ per row, and its timesteps reach the model."""
    schedule = _CoarseSchedule(1.0 / (1.0 + SD.sigmas.double() ** 2))
    model = fake_model()
    den = CFGDenoiser(model, schedule, [[make_cond(1.0), {}]], [[make_cond(0.0), {}]], 3.0, (2, 4, 8, 8), "cpu")
    sigma = torch.full((2,), float((SD.sigmas[431] * SD.sigmas[432]).sqrt()))
    den(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), sigma)
    assert model.calls[-1]["t"].tolist() == [440.0] * 4
