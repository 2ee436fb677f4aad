"""Node logic around the models, checked with stand-in models whose behaviour is known."""

import torch

from nodeflow import Registry, parse, validate
from nodes.conditioning import (
    AverageConditioning,
    CombineConditioning,
    ConcatConditioning,
    ConditioningSetAreaStrength,
    SetConditioningArea,
    SetConditioningMask,
    ZeroConditioning,
)
from nodes.sampling import EmptyLatent
from nodes.vae import InpaintModelConditioning, VAEEncode, VAEEncodeForInpaint


class PoolVAE:
    """Encodes by 8x8 average pooling of the RGB channels (plus their mean), decodes by repetition.
    Keeps what it was last given to encode in ``seen``."""

    def encode(self, pixels):  # [B, H, W, 3] -> [B, 4, H/8, W/8]
        self.seen = pixels
        x = pixels.permute(0, 3, 1, 2)
        x = torch.cat([x, x.mean(1, keepdim=True)], 1)
        return torch.nn.functional.avg_pool2d(x, 8)

    def decode(self, latent):
        return latent[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3).permute(0, 2, 3, 1)


def cond(tokens=77, dim=8, value=1.0, pooled=True):
    return [[torch.full((1, tokens, dim), value), {"pooled_output": torch.full((1, 4), value) if pooled else None}]]


def test_empty_latent_shape_and_sizes_not_multiple_of_8():
    (latent,) = EmptyLatent().run(width=96, height=64, batch_size=3)
    assert latent["samples"].shape == (3, 4, 8, 12) and not latent["samples"].any()
    # ComfyUI accepts any size from 16 (its step of 8 is a widget hint) and rounds down.
    (odd,) = EmptyLatent().run(width=100, height=63, batch_size=1)
    assert odd["samples"].shape == (1, 4, 7, 12)
    reg = Registry([EmptyLatent])
    report = validate(parse({"1": {"class_type": "EmptyLatentImage",
                                   "inputs": {"width": 100, "height": 63, "batch_size": 1}}}), reg)
    assert not [e for e in report.errors if e.node_id == "1"]
    report = validate(parse({"1": {"class_type": "EmptyLatentImage",
                                   "inputs": {"width": 8, "height": 64, "batch_size": 1}}}), reg)
    assert [e.type for e in report.errors if e.node_id == "1"] == ["value_smaller_than_min"]


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


def test_encode_for_inpaint_keeps_the_mask_on_its_pixels_when_the_size_is_not_a_multiple_of_8():
    # A 103-wide, 101-high image with a 20x20 hole at rows 40..59, columns 30..49. Cropped to
    # 96x96 at the centred offset (101 % 8 // 2, 103 % 8 // 2) = (2, 3), the hole lies at rows
    # 38..57, columns 27..46 of the crop, for the grey fill and the noise mask alike.
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 101, 103, 3, generator=g)
    mask = torch.zeros(1, 101, 103)
    mask[:, 40:60, 30:50] = 1.0
    vae = PoolVAE()
    (latent,) = VAEEncodeForInpaint().run(img, vae, mask, grow_mask_by=0)
    hole = torch.zeros(96, 96, dtype=torch.bool)
    hole[38:58, 27:47] = True
    assert torch.equal(latent["noise_mask"][0, 0].bool(), hole)
    expected = img[0, 2:98, 3:99].clone()
    expected[hole] = 0.5
    assert torch.equal(vae.seen[0], expected)
    # Grown with a 6x6 kernel (padding 3, cut to the image): 2 px up/left, 3 px down/right.
    (grown,) = VAEEncodeForInpaint().run(img, PoolVAE(), mask, grow_mask_by=6)
    bigger = torch.zeros(96, 96, dtype=torch.bool)
    bigger[36:61, 25:50] = True
    assert torch.equal(grown["noise_mask"][0, 0].bool(), bigger)


def test_encode_for_inpaint_resizes_a_small_mask_to_the_whole_image_before_cropping():
    # A 4x4 mask whose right half is set, on a 101x103 image: stretched to 101x103 first, its
    # edge lies at column 51.5 of the image, i.e. 48.5 of the crop (not at 48 of the 96 px).
    img = torch.rand(1, 101, 103, 3, generator=torch.Generator().manual_seed(1))
    small = torch.zeros(1, 4, 4)
    small[:, :, 2:] = 1.0
    (latent,) = VAEEncodeForInpaint().run(img, PoolVAE(), small, grow_mask_by=0)
    stretched = torch.nn.functional.interpolate(small[None], size=(101, 103), mode="bilinear")[0, 0]
    assert torch.equal(latent["noise_mask"][0, 0], stretched[2:98, 3:99].round())


def test_inpaint_model_conditioning_sets_concat_inputs_and_noise_mask():
    img = torch.rand(1, 101, 103, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 101, 103)
    mask[:, 40:60, 30:50] = 1.0
    pos, neg = cond(value=1.0), cond(value=2.0)
    vae = PoolVAE()
    out_pos, out_neg, latent = InpaintModelConditioning().run(pos, neg, vae, img, mask, noise_mask=True)
    cropped = img[:, 2:98, 3:99]
    assert torch.allclose(latent["samples"], PoolVAE().encode(cropped))        # the whole image, not greyed
    greyed = cropped.clone()
    greyed[:, 38:58, 27:47] = 0.5
    for out, value in ((out_pos, 1.0), (out_neg, 2.0)):
        meta = out[0][1]
        assert torch.allclose(meta["concat_latent_image"], PoolVAE().encode(greyed))
        assert meta["concat_mask"].shape == (1, 1, 96, 96) and meta["concat_mask"][0, 0, 38:58, 27:47].all()
        assert meta["concat_mask"].sum() == 400 and out[0][0][0, 0, 0] == value
        assert "pooled_output" in meta
    assert torch.equal(latent["noise_mask"], out_pos[0][1]["concat_mask"])
    assert "concat_mask" not in pos[0][1]                                          # inputs unchanged
    _, _, no_mask = InpaintModelConditioning().run(pos, neg, PoolVAE(), img, mask, noise_mask=False)
    assert "noise_mask" not in no_mask


def test_set_area_strength_changes_only_the_strength():
    (area,) = SetConditioningArea().run(cond(), width=128, height=128, x=0, y=0, strength=1.0)
    (out,) = ConditioningSetAreaStrength().run(area, 0.25)
    assert out[0][1]["strength"] == 0.25 and out[0][1]["area"] == area[0][1]["area"]
    assert area[0][1]["strength"] == 1.0


def test_comfyui_class_names_have_comfyuis_display_names():
    from nodeflow import default_registry

    reg = default_registry()
    # ComfyUI's NODE_DISPLAY_NAME_MAPPINGS (Comfy-Org/ComfyUI nodes.py, commit 02217e36a45b).
    expected = {"CheckpointLoaderSimple": "Load Checkpoint", "CLIPTextEncode": "CLIP Text Encode (Prompt)",
                "KSampler": "KSampler", "KSamplerAdvanced": "KSampler (Advanced)",
                "EmptyLatentImage": "Empty Latent Image", "VAEDecode": "VAE Decode", "VAEEncode": "VAE Encode",
                "SaveImage": "Save Image", "LoadImage": "Load Image", "LoraLoader": "Load LoRA (Model and CLIP)",
                "LoraLoaderModelOnly": "Load LoRA",
                "VAELoader": "Load VAE", "CLIPSetLastLayer": "CLIP Set Last Layer",
                "ConditioningCombine": "Conditioning (Combine)", "LatentUpscale": "Upscale Latent",
                "ImageScale": "Upscale Image", "ImagePadForOutpaint": "Pad Image for Outpainting",
                "CheckpointLoader": "Load Checkpoint With Config (DEPRECATED)",
                "LoadImageOutput": "Load Image (from Outputs)", "ConditioningAverage": "Conditioning (Average)",
                "ConditioningZeroOut": "Conditioning Zero Out",
                "ConditioningSetAreaStrength": "Conditioning (Set Area Strength)",
                "ImageBatch": "Batch Images (DEPRECATED)",
                "ImageInvert": "Invert Image Colors", "ImageCrop": "Crop Image", "EmptyImage": "Empty Image",
                "LatentFromBatch": "Get Latent From Batch", "ImageBlend": "Blend Images", "ImageBlur": "Blur Image",
                "ImageQuantize": "Quantize Image", "ImageSharpen": "Sharpen Image", "LoadLatent": "Load Latent",
                "SaveLatent": "Save Latent", "DiffusersLoader": "Load Diffusers Model (DEPRECATED)",
                "ImageScaleToTotalPixels": "Scale Image to Total Pixels", "LatentUpscaleBy": "Upscale Latent By",
                "ImageScaleBy": "Upscale Image By", "UpscaleModelLoader": "Load Upscale Model"}
    for name, display in expected.items():
        cls = reg.get(name)
        shown = cls.display_name if name == cls.type_name else cls.alias_display_names[name]
        assert shown == display, name
    for cls in reg.classes():      # every alias-specific display name belongs to an alias of the class
        assert set(getattr(cls, "alias_display_names", {})) <= set(cls.aliases), cls


def test_no_two_node_library_entries_look_the_same():
    """A native class and its ComfyUI twin are two entries of the editor's node library: the
    twin keeps ComfyUI's display name, so the native class shows its own name."""
    from nodeflow import default_registry

    seen: dict[str, str] = {}
    for name, info in default_registry().object_info().items():
        shown = info["display_name"].casefold()
        assert shown not in seen, f"{name} and {seen[shown]} both show as {info['display_name']!r}"
        seen[shown] = name
