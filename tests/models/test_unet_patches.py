"""UNet patches on a tiny SD 1.x UNet: block and attention patches reach the places ComfyUI
calls them, FreeU's filter, Perturbed-Attention and Self-Attention Guidance, and patches
carried by clones."""

import pytest
import torch

from nodeflow.models import testing
from nodeflow.models.diffusion import DiffusionModel
from nodeflow.models.freeu import fourier_filter
from nodeflow.models.model_patches import ModelPatches
from nodeflow.models.unet import UNet, attention
from nodeflow.sampling import CFGDenoiser, DiscreteSchedule

SD = DiscreteSchedule.scaled_linear()


@pytest.fixture(scope="module")
def model():
    unet = UNet(testing.tiny_unet_config("sd1"))
    unet.load_state_dict(testing.random_tensors({k: tuple(v.shape) for k, v in unet.state_dict().items()}, seed=4))
    return DiffusionModel(unet, family="sd1", device=torch.device("cpu"))


def inputs(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    ctx = torch.randn(batch, 77, 32, generator=g)
    return x, torch.full((batch,), 500.0), ctx


def with_patches(model, **kw):
    clone = model.clone()
    for name, value in kw.items():
        setattr(clone.model_patches, name, value)
    return clone


def test_identity_patches_leave_the_output_unchanged(model):
    x, t, ctx = inputs()
    plain = model.apply_model(x, t, ctx)
    same = with_patches(model, input_block=[lambda h, info: h], output_block=[lambda h, s, info: (h, s)],
                        attn1=[lambda n, c, v, info: (n, c, v)], attn2=[lambda n, c, v, info: (n, c, v)],
                        attn1_output=[lambda n, info: n], transformer_middle=[lambda x_, info: x_],
                        attn1_replace={("middle", 0): lambda q, k, v, info: attention(q, k, v, info["n_heads"])})
    assert torch.allclose(same.apply_model(x, t, ctx), plain, atol=1e-5)
    assert not model.model_patches.touches_unet        # the clone's patches stayed on the clone


def test_block_and_attention_patches_see_comfyui_positions(model):
    seen = []

    def record(kind):
        def patch(*args):
            info = args[-1]
            seen.append((kind, info["block"], info.get("block_index"), info.get("transformer_index"),
                         tuple(info["cond_or_uncond"])))
            return args[0] if len(args) == 2 else args[:-1]
        return patch

    patched = with_patches(model, input_block=[record("input")], attn1=[record("attn1")],
                           output_block=[record("output")])
    x, t, ctx = inputs()
    patched.apply_model(x, t, ctx, info={"cond_or_uncond": [0, 1]})
    blocks = [s[1] for s in seen if s[0] == "input"]
    assert blocks == [("input", i) for i in range(len(model.unet.input_blocks))]
    assert [s[1] for s in seen if s[0] == "output"] == [("output", i) for i in range(len(model.unet.output_blocks))]
    attn = [(s[1], s[3]) for s in seen if s[0] == "attn1"]
    # tiny SD1: transformers after input blocks 1, 2, 4, 5, the middle, output blocks 3 … 8
    assert [a[0] for a in attn] == [("input", 1), ("input", 2), ("input", 4), ("input", 5), ("middle", 0),
                                    *[("output", i) for i in range(3, 9)]]
    assert [a[1] for a in attn] == list(range(11))              # the running SpatialTransformer count
    assert all(s[4] == (0, 1) for s in seen)


def test_a_block_patch_changes_the_output_where_it_acts(model):
    x, t, ctx = inputs()
    plain = model.apply_model(x, t, ctx)
    bumped = with_patches(model, middle_block=[lambda h, info: h + 1.0])
    assert not torch.allclose(bumped.apply_model(x, t, ctx), plain, atol=1e-3)


def test_fourier_filter():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(fourier_filter(x, 1, 1.0), x, atol=1e-5)
    removed = fourier_filter(x, 1, 0.0)
    # scale 0 in the centred 2×2 of the shifted spectrum removes frequency 0 (the mean) and −1
    spectrum = torch.fft.fft2(x.double())
    spectrum[..., [0, 0, 7, 7], [0, 7, 0, 7]] = 0
    assert torch.allclose(removed.double(), torch.fft.ifft2(spectrum).real, atol=1e-5)
    assert removed.mean(dim=(-2, -1)).abs().max() < 1e-5


def test_freeu_nodes(model):
    from nodes.model_patches import FreeU, FreeU_V2

    x, t, ctx = inputs()
    plain = model.apply_model(x, t, ctx)
    (neutral,) = FreeU().run(model, 1.0, 1.0, 1.0, 1.0)
    assert torch.allclose(neutral.apply_model(x, t, ctx), plain, atol=1e-4)
    (freeu,) = FreeU().run(model, 1.1, 1.2, 0.9, 0.2)
    (v2,) = FreeU_V2().run(model, 1.3, 1.4, 0.9, 0.2)
    a, b = freeu.apply_model(x, t, ctx), v2.apply_model(x, t, ctx)
    assert not torch.allclose(a, plain, atol=1e-3) and not torch.allclose(a, b, atol=1e-3)
    assert not model.model_patches.output_block


def denoiser(model, cfg=4.0):
    g = torch.Generator().manual_seed(2)
    pos = [[torch.randn(1, 77, 32, generator=g), {}]]
    neg = [[torch.randn(1, 77, 32, generator=g), {}]]
    return CFGDenoiser(model, SD, pos, neg, cfg, (1, 4, 16, 16), "cpu")


def test_perturbed_attention_guidance_against_a_hand_perturbed_unet(model):
    from nodes.model_patches import PerturbedAttentionGuidance

    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    sigma = SD.sigmas[600].reshape(1)
    (pag,) = PerturbedAttentionGuidance().run(model, 2.5)
    out = denoiser(pag)(x, sigma)
    plain = denoiser(model)
    d = plain(x, sigma)
    d_c, _ = plain._predict(x, sigma, with_uncond=False)
    # the same UNet with the middle block's self-attention made the identity by hand
    attns = [blk.attn1 for blk in model.unet.middle_block[1].transformer_blocks]
    saved = [a.forward for a in attns]
    def identity_of(attn):
        return lambda n, *args, **kw: attn.to_out[0](attn.to_v(n))

    for a in attns:
        a.forward = identity_of(a)
    try:
        d_perturbed, _ = denoiser(model)._predict(x, sigma, with_uncond=False)
    finally:
        for a, f in zip(attns, saved):
            a.forward = f
    assert torch.allclose(out, d + 2.5 * (d_c - d_perturbed), atol=1e-4)
    (off,) = PerturbedAttentionGuidance().run(model, 0.0)
    assert torch.allclose(denoiser(off)(x, sigma), d, atol=1e-5)


def test_self_attention_guidance(model):
    from nodes.model_patches import SelfAttentionGuidance

    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    sigma = SD.sigmas[700].reshape(1)
    plain = denoiser(model)(x, sigma)
    (zero,) = SelfAttentionGuidance().run(model, 0.0, 2.0)
    assert torch.allclose(denoiser(zero)(x, sigma), plain, atol=1e-4)
    (sag,) = SelfAttentionGuidance().run(model, 0.5, 2.0)
    den = denoiser(sag)
    out = den(x, sigma)
    assert not torch.allclose(out, plain, atol=1e-3)
    assert den.model_calls == 2           # the batched cond/uncond pass, then the blurred negative
    (sag1,) = SelfAttentionGuidance().run(model, 0.5, 2.0)
    one = denoiser(sag1, cfg=1.0)
    one(x, sigma)
    assert one.model_calls == 2           # SAG needs the negative even at cfg 1


def test_patches_compose_in_order(model):
    from nodes.model_patches import FreeU, RescaleCFG

    (a,) = FreeU().run(model, 1.1, 1.2, 0.9, 0.2)
    (b,) = RescaleCFG().run(a, 0.7)
    assert len(b.model_patches.output_block) == 1 and b.model_patches.cfg_function is not None
    assert a.model_patches.cfg_function is None and not model.model_patches.output_block
    merged = ModelPatches(post_cfg_functions=[1]).merged(ModelPatches(post_cfg_functions=[2]))
    assert merged.post_cfg_functions == [1, 2]
