"""Node logic around the models, checked with stand-in models whose behaviour is known."""

import pytest
import torch

from nodeflow import Registry, parse, validate
from nodes.conditioning import (AverageConditioning, CombineConditioning, ConcatConditioning, SetConditioningArea,
                                SetConditioningMask, ZeroConditioning)
from nodes.sampling import EmptyLatent
from nodes.vae import VAEEncode, VAEEncodeForInpaint


class PoolVAE:
    """Encodes by 8x8 average pooling of the RGB channels (plus their mean), decodes by repetition."""

    def encode(self, pixels):  # [B, H, W, 3] -> [B, 4, H/8, W/8]
        x = pixels.permute(0, 3, 1, 2)
        x = torch.cat([x, x.mean(1, keepdim=True)], 1)
        return torch.nn.functional.avg_pool2d(x, 8)

    def decode(self, latent):
        return latent[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3).permute(0, 2, 3, 1)


def cond(tokens=77, dim=8, value=1.0, pooled=True):
    return [[torch.full((1, tokens, dim), value), {"pooled_output": torch.full((1, 4), value) if pooled else None}]]


def test_empty_latent_shape_and_multiple_of_8():
    (latent,) = EmptyLatent().run(width=96, height=64, batch_size=3)
    assert latent["samples"].shape == (3, 4, 8, 12) and not latent["samples"].any()
    reg = Registry([EmptyLatent])
    report = validate(parse({"1": {"class_type": "EmptyLatentImage",
                                   "inputs": {"width": 100, "height": 64, "batch_size": 1}}}), reg)
    assert any("width 100 is not a multiple of 8" in e.message for e in report.errors)


def test_combine_keeps_both_and_area_does_not_mutate_input():
    a, b = cond(value=1.0), cond(value=2.0)
    (both,) = CombineConditioning().run(a, b)
    assert len(both) == 2 and both[1][0][0, 0, 0] == 2.0
    (area,) = SetConditioningArea().run(a, width=256, height=128, x=64, y=32, strength=0.5)
    assert area[0][1]["area"] == (16, 32, 4, 8) and area[0][1]["strength"] == 0.5
    assert "area" not in a[0][1]


def test_mask_conditioning_adds_batch_dim():
    (out,) = SetConditioningMask().run(cond(), torch.ones(16, 16), 0.7, "mask bounds")
    assert out[0][1]["mask"].shape == (1, 16, 16) and out[0][1]["set_area_to_bounds"] is True


def test_average_zero_pads_shorter_source_and_lerps_pooled():
    to, src = cond(tokens=154, value=1.0), cond(tokens=77, value=3.0)
    (out,) = AverageConditioning().run(to, src, 0.25)
    c = out[0][0]
    assert c.shape == (1, 154, 8)
    assert torch.allclose(c[:, :77], torch.full((1, 77, 8), 0.25 * 1 + 0.75 * 3))
    assert torch.allclose(c[:, 77:], torch.full((1, 77, 8), 0.25))
    assert torch.allclose(out[0][1]["pooled_output"], torch.full((1, 4), 2.5))


def test_concat_and_zero_out():
    (cat,) = ConcatConditioning().run(cond(tokens=77), cond(tokens=77, value=5.0))
    assert cat[0][0].shape == (1, 154, 8) and cat[0][0][0, -1, 0] == 5.0
    (zero,) = ZeroConditioning().run(cond())
    assert not zero[0][0].any() and not zero[0][1]["pooled_output"].any()


def test_vae_encode_crops_to_multiple_of_8_and_drops_alpha():
    img = torch.rand(1, 70, 83, 4)
    (latent,) = VAEEncode().run(img, PoolVAE())
    assert latent["samples"].shape == (1, 4, 8, 10)


def test_encode_for_inpaint_greys_masked_area_and_grows_mask():
    img = torch.zeros(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:32, 16:32] = 1.0
    (latent,) = VAEEncodeForInpaint().run(img, PoolVAE(), mask, grow_mask_by=6)
    samples, noise = latent["samples"], latent["noise_mask"]
    # The masked 16x16 block covers latent cells (2..3, 2..3) fully: filled with grey 0.5.
    assert torch.allclose(samples[0, 0, 2:4, 2:4], torch.full((2, 2), 0.5))
    assert samples[0, 0, 0, 0] == 0 and samples[0, 0, 6, 6] == 0
    assert noise.shape == (1, 1, 64, 64)
    # Grown with a 6x6 kernel and padding 3: output row i sums input rows i-3..i+2, so the
    # masked rows 16..31 become 14..34 (2 px up, 3 px down).
    assert noise[0, 0, 14, 20] == 1 and noise[0, 0, 13, 20] == 0
    assert noise[0, 0, 34, 20] == 1 and noise[0, 0, 35, 20] == 0
    (ungrown,) = VAEEncodeForInpaint().run(img, PoolVAE(), mask, grow_mask_by=0)
    assert torch.equal(ungrown["noise_mask"][0, 0], mask[0])


def test_encode_for_inpaint_stretches_a_mask_of_another_size():
    img = torch.zeros(1, 64, 64, 3)
    small = torch.zeros(1, 8, 8)
    small[:, :4] = 1.0  # top half
    (latent,) = VAEEncodeForInpaint().run(img, PoolVAE(), small, grow_mask_by=0)
    noise = latent["noise_mask"][0, 0]
    assert noise[:28].all() and not noise[36:].any()
