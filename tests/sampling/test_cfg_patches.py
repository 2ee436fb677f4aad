"""CFG functions and post-CFG functions on the model handle: RescaleCFG, Perp-Neg, and the
order in which the denoiser applies them. FakeModel predicts each conditioning's mean exactly
(at training σ), so the expected values are written here from the papers' formulas."""

import math

import torch

from nodeflow.models.model_patches import ModelPatches
from nodeflow.sampling import CFGDenoiser, DiscreteSchedule
from nodeflow.sampling.cfg_patches import perp_neg_cfg, rescale_cfg

SD = DiscreteSchedule.scaled_linear()
SIGMA = SD.sigmas[500].reshape(1)
SHAPE = (2, 4, 8, 8)


def run(model, positive, negative, cfg, x=None):
    den = CFGDenoiser(model, SD, positive, negative, cfg, SHAPE, "cpu")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) if x is None else x
    return den(x, SIGMA.expand(SHAPE[0])), x


def patched(fake_model, **kw):
    model = fake_model()
    model.model_patches = ModelPatches(**kw)
    return model


PATTERN = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)


def varying(fake_model):
    """A FakeModel whose clean-latent answer is the conditioning's mean times a fixed spatial
    pattern (so guidance changes the spread, which RescaleCFG reacts to)."""

    class Varying(fake_model):
        def apply_model(self, x, t, context, **_):
            self.calls.append({"x": x})
            sigma = SD.sigmas[t.long()].double().reshape(-1, 1, 1, 1)
            x_full = x.double() * (sigma ** 2 + 1).sqrt()
            d = self.target(context).double().reshape(-1, 1, 1, 1) * PATTERN
            return ((x_full - d) / sigma).float()

    return Varying


def test_rescale_cfg_follows_the_paper_in_v_space(fake_model, make_cond):
    fake_model = varying(fake_model)
    pos, neg, cfg, phi = [[make_cond(0.8), {}]], [[make_cond(-0.3), {}]], 6.0, 0.7
    out, x = run(patched(fake_model, cfg_function=rescale_cfg(phi)), pos, neg, cfg)
    # Lin et al.: x_t = α x₀ + s ε with α = 1/√(σ²+1), s = σ/√(σ²+1) on the VP scale of x;
    # v = α ε − s x₀; x₀ = α x_t − s v.
    s2 = float(SIGMA) ** 2
    alpha, s = 1 / math.sqrt(s2 + 1), math.sqrt(s2) / math.sqrt(s2 + 1)
    x_t = alpha * x.double()

    def v_of(x0):
        eps = (x.double() - x0) / math.sqrt(s2)
        return alpha * eps - s * x0

    v_c, v_u = v_of(0.8 * PATTERN.double()), v_of(-0.3 * PATTERN.double())
    v_cfg = v_u + cfg * (v_c - v_u)
    ratio = v_c.std(dim=(1, 2, 3), keepdim=True) / v_cfg.std(dim=(1, 2, 3), keepdim=True)
    v = phi * v_cfg * ratio + (1 - phi) * v_cfg
    expected = alpha * x_t - s * v
    assert torch.allclose(out.double(), expected, atol=2e-4)
    plain, _ = run(fake_model(), pos, neg, cfg, x)
    assert not torch.allclose(out, plain, atol=1e-2)
    # φ = 0 is plain CFG again
    unscaled, _ = run(patched(fake_model, cfg_function=rescale_cfg(0.0)), pos, neg, cfg, x)
    assert torch.allclose(unscaled, plain, atol=2e-4)


def test_perp_neg_keeps_only_the_perpendicular_part_of_the_negative(fake_model, make_cond):
    empty = [[make_cond(0.1), {}]]
    # varying conditionings: FakeModel's answer is the tensor's mean, the same in every cell;
    # make the positive and negative point in different directions over the batch
    pos_t = torch.cat([torch.full((1, 77, 8), 1.0), torch.full((1, 77, 8), 0.4)])
    neg_t = torch.cat([torch.full((1, 77, 8), -0.6), torch.full((1, 77, 8), 0.9)])
    pos, neg, cfg, w = [[pos_t, {}]], [[neg_t, {}]], 5.0, 0.8
    model = patched(fake_model, cfg_function=perp_neg_cfg(empty, w))
    out, _ = run(model, pos, neg, cfg)
    d_e = torch.full(SHAPE, 0.1, dtype=torch.float64)
    d_c = torch.tensor([1.0, 0.4], dtype=torch.float64).reshape(2, 1, 1, 1).expand(SHAPE)
    d_u = torch.tensor([-0.6, 0.9], dtype=torch.float64).reshape(2, 1, 1, 1).expand(SHAPE)
    p, n = d_c - d_e, d_u - d_e
    perp = n - (n * p).sum() / (p * p).sum() * p             # Gram–Schmidt over the whole batch
    expected = d_e + cfg * (p - w * perp)
    assert torch.allclose(out.double(), expected, atol=2e-4)
    # a negative parallel to the positive has no perpendicular part: no effect at all
    parallel = [[torch.cat([torch.full((1, 77, 8), 0.1 + 2 * 0.9), torch.full((1, 77, 8), 0.1 + 2 * 0.3)]), {}]]
    pos2 = [[torch.cat([torch.full((1, 77, 8), 1.0), torch.full((1, 77, 8), 0.4)]), {}]]
    out2, _ = run(model, pos2, parallel, cfg)
    assert torch.allclose(out2.double(), d_e + cfg * p, atol=2e-4)


def test_post_cfg_functions_run_in_order_after_the_cfg_function(fake_model, make_cond):
    seen = []

    def cfg_function(args):
        seen.append(("cfg", float(args["cond_denoised"].mean()), float(args["uncond_denoised"].mean())))
        return args["input"] - (args["cond_denoised"] + args["uncond_denoised"])    # D = D_c + D_u

    def double(args):
        seen.append(("post1", float(args["denoised"].mean())))
        return args["denoised"] * 2

    def plus_one(args):
        seen.append(("post2", float(args["denoised"].mean())))
        return args["denoised"] + 1

    model = patched(fake_model, cfg_function=cfg_function, post_cfg_functions=[double, plus_one])
    out, _ = run(model, [[make_cond(0.5), {}]], [[make_cond(0.25), {}]], 3.0)
    assert torch.allclose(out, torch.full_like(out, (0.5 + 0.25) * 2 + 1), atol=1e-4)
    assert [s[0] for s in seen] == ["cfg", "post1", "post2"]
    assert math.isclose(seen[0][1], 0.5, abs_tol=1e-4) and math.isclose(seen[0][2], 0.25, abs_tol=1e-4)


def test_cfg_1_optimization_and_its_opt_out(fake_model, make_cond):
    uncond_seen = []

    def post(args):
        uncond_seen.append(float(args["uncond_denoised"].abs().max()))
        return args["denoised"]

    pos, neg = [[make_cond(0.5), {}]], [[make_cond(-2.0), {}]]
    model = patched(fake_model, post_cfg_functions=[post])
    run(model, pos, neg, 1.0)
    assert uncond_seen[-1] == 0.0 and model.calls[-1]["x"].shape[0] == 2   # negative skipped: D_u = 0
    model = patched(fake_model, post_cfg_functions=[post], disable_cfg1_optimization=True)
    out, _ = run(model, pos, neg, 1.0)
    assert math.isclose(uncond_seen[-1], 2.0, abs_tol=1e-4) and model.calls[-1]["x"].shape[0] == 4
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=1e-4)


def test_perp_neg_guider_is_the_perp_neg_patch(make_cond):
    from nodeflow.models import testing
    from nodeflow.models.diffusion import DiffusionModel
    from nodeflow.models.unet import UNet
    from nodeflow.sampling.custom import Guider, RandomNoise, SamplerChoice, sample_custom
    from nodes.custom_sampling import PerpNegGuider
    from nodes.model_patches import PerpNeg

    unet = UNet(testing.tiny_unet_config("sd1"))
    unet.load_state_dict(testing.random_tensors({k: tuple(v.shape) for k, v in unet.state_dict().items()}, seed=4))
    model = DiffusionModel(unet, family="sd1", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    pos, neg, empty = ([[torch.randn(1, 77, 32, generator=g), {}]] for _ in range(3))
    sigmas = torch.cat([SD.sigmas[[999, 500, 100]], torch.zeros(1)])
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (guider,) = PerpNegGuider().run(model, pos, neg, empty, 5.0, 0.7)
    out, _ = sample_custom(guider, SamplerChoice("euler"), sigmas, latent, RandomNoise(1))
    (patched,) = PerpNeg().run(model, empty, 0.7)
    same, _ = sample_custom(Guider(patched, "cfg", (pos, neg), 5.0), SamplerChoice("euler"), sigmas, latent,
                            RandomNoise(1))
    plain, _ = sample_custom(Guider(model, "cfg", (pos, neg), 5.0), SamplerChoice("euler"), sigmas, latent,
                             RandomNoise(1))
    assert torch.equal(out["samples"], same["samples"])
    assert not torch.allclose(out["samples"], plain["samples"], atol=1e-3)
    assert model.model_patches.cfg_function is None
