"""Image nodes, checked against independent expectations: known pixel patterns, numpy block
means, PIL's own resampling."""

import numpy as np
import pytest
import torch
from PIL import Image

from nodeflow import Registry
from nodes.image import (
    EmptyImage,
    GetImageSize,
    ImageAddNoise,
    ImageBatch,
    ImageBlend,
    ImageBlur,
    ImageCompositeMasked,
    ImageCrop,
    ImageFlip,
    ImageFromBatch,
    ImageInvert,
    ImageRotate,
    ImageSharpen,
    JoinImageWithAlpha,
    PadImageForOutpaint,
    RepeatImageBatch,
    ScaleImage,
    ScaleImageBy,
    ScaleImageToTotalPixels,
    SplitImageWithAlpha,
)


def pattern(h=4, w=6, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, 3, generator=g)


def test_scale_nearest_doubles_each_pixel():
    img = pattern(3, 4)
    (out,) = ScaleImage().run(img, "nearest-exact", 8, 6, "disabled")
    expected = img.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert out.shape == (1, 6, 8, 3) and torch.equal(out, expected)


def test_scale_bilinear_halving_is_the_2x2_block_mean():
    img = pattern(8, 6)
    (out,) = ScaleImage().run(img, "bilinear", 3, 4, "disabled")
    blocks = img.numpy().reshape(1, 4, 2, 3, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(out.numpy(), blocks, atol=1e-6)


def test_scale_lanczos_matches_pil():
    img = pattern(10, 12)
    (out,) = ScaleImage().run(img, "lanczos", 17, 9, "disabled")
    pil = Image.fromarray((img[0].numpy() * 255).clip(0, 255).astype(np.uint8))
    expected = np.asarray(pil.resize((17, 9), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)


def test_scale_zero_side_keeps_aspect_and_both_zero_is_identity():
    img = pattern(10, 20)
    (out,) = ScaleImage().run(img, "bilinear", 0, 5, "disabled")
    assert out.shape == (1, 5, 10, 3)
    (out,) = ScaleImage().run(img, "bilinear", 30, 0, "disabled")
    assert out.shape == (1, 15, 30, 3)
    (same,) = ScaleImage().run(img, "bilinear", 0, 0, "disabled")
    assert same is img


def test_scale_center_crop_cuts_to_aspect_first():
    img = pattern(10, 20)
    (out,) = ScaleImage().run(img, "nearest-exact", 10, 10, "center")
    assert torch.equal(out, img[:, :, 5:15, :])


def test_scale_by_and_total_pixels():
    img = pattern(10, 20)
    assert ScaleImageBy().run(img, "area", 0.5)[0].shape == (1, 5, 10, 3)
    # 0.01 megapixels = 10485 pixels; a 64x64 image grows by sqrt(10485/4096) to 102x102.
    sq = pattern(64, 64)
    assert ScaleImageToTotalPixels().run(sq, "bicubic", 0.01, 1)[0].shape == (1, 102, 102, 3)
    # ... and with sides rounded to multiples of 8: 102.4 -> 104.
    assert ScaleImageToTotalPixels().run(sq, "bicubic", 0.01, resolution_steps=8)[0].shape == (1, 104, 104, 3)


def test_scale_schema_matches_comfyui():
    reg = Registry([ScaleImage])
    info = reg.object_info("ImageScale")["ImageScale"]
    assert list(info["input"]["required"]) == ["image", "upscale_method", "width", "height", "crop"]
    assert info["input"]["required"]["upscale_method"][0] == ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
    assert info["input"]["required"]["width"][1]["default"] == 512 and info["input"]["required"]["width"][1]["min"] == 0


def test_pad_for_outpaint_grey_canvas_mask_and_feathering():
    img = torch.zeros(1, 20, 20, 3)
    (canvas, mask) = PadImageForOutpaint().run(img, left=8, top=0, right=0, bottom=4, feathering=0)
    assert canvas.shape == (1, 24, 28, 3) and mask.shape == (1, 24, 28)
    assert torch.all(canvas[:, :, :8] == 0.5) and torch.all(canvas[:, 20:] == 0.5)
    assert torch.all(canvas[:, :20, 8:] == 0)
    assert torch.all(mask[:, :, :8] == 1) and torch.all(mask[:, 20:] == 1) and torch.all(mask[:, :20, 8:] == 0)

    (_, mask) = PadImageForOutpaint().run(img, left=8, top=0, right=0, bottom=0, feathering=4)
    inner = mask[0, :, 8:]
    # Only the left side is padded: distance d = column, value ((4 - d) / 4)^2 for d < 4.
    assert inner[10, 0] == 1.0 and inner[10, 1] == pytest.approx(0.5625) and inner[10, 3] == pytest.approx(1 / 16)
    assert inner[10, 4] == 0 and inner[0, 10] == 0 and inner[19, 10] == 0


def test_invert_batch_repeat_from_batch_crop():
    a, b = pattern(4, 4, seed=1), pattern(8, 8, seed=2)
    assert torch.allclose(ImageInvert().run(a)[0], 1 - a)
    (both,) = ImageBatch().run(a, b)
    assert both.shape == (2, 4, 4, 3) and torch.equal(both[0], a[0])
    assert RepeatImageBatch().run(a, 3)[0].shape == (3, 4, 4, 3)
    batch = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 2, 2, 3)
    (part,) = ImageFromBatch().run(batch, batch_index=3, length=4)  # clamped to what is there
    assert part[:, 0, 0, 0].tolist() == [3.0, 4.0]
    assert ImageFromBatch().run(batch, batch_index=99, length=1)[0][:, 0, 0, 0].tolist() == [4.0]
    index = ImageFromBatch.inputs["batch_index"]
    # Current ComfyUI's ranges (comfy_extras/nodes_images.py): a negative index counts from the end.
    assert (index.min, index.max, ImageFromBatch.inputs["length"].max) == (-16384, 16384, 4096)
    assert ImageFromBatch().run(batch, batch_index=-2, length=5)[0][:, 0, 0, 0].tolist() == [3.0, 4.0]
    (cut,) = ImageCrop().run(a, width=3, height=2, x=2, y=1)
    assert torch.equal(cut, a[:, 1:3, 2:4])  # clipped at the right edge
    assert ImageCrop().run(a, width=2, height=2, x=99, y=99)[0].shape == (1, 1, 1, 3)


def test_image_size():
    assert GetImageSize().run(pattern(h=5, w=7, b=2)) == (7, 5, 2)


def test_flip_and_rotate_clockwise():
    img = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 2, 2, 1)
    assert ImageRotate().run(img, "90 degrees")[0][0, :, :, 0].tolist() == [[2.0, 0.0], [3.0, 1.0]]
    assert ImageFlip().run(img, "x-axis: vertically")[0][0, :, :, 0].tolist() == [[2.0, 3.0], [0.0, 1.0]]
    assert ImageFlip().run(img, "y-axis: horizontally")[0][0, :, :, 0].tolist() == [[1.0, 0.0], [3.0, 2.0]]


def test_empty_image_colour():
    (img,) = EmptyImage().run(width=3, height=2, batch_size=2, color=0xFF8000)
    assert img.shape == (2, 2, 3, 3)
    assert img[1, 1, 2].tolist() == pytest.approx([1.0, 128 / 255, 0.0])


def test_composite_masked_places_blends_and_stretches_mask():
    dest, src = torch.zeros(1, 8, 8, 3), torch.ones(1, 4, 4, 3)
    (out,) = ImageCompositeMasked().run(dest, src, x=2, y=3, resize_source=False, mask=torch.full((4, 4), 0.5))
    assert torch.all(out[:, 3:7, 2:6] == 0.5) and out.sum() == 0.5 * 16 * 3
    # A 2x2 mask is stretched to the 4x4 source: left half on, right half off.
    (out,) = ImageCompositeMasked().run(dest, src, 0, 0, False, mask=torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.all(out[0, :4, 0] == 1) and torch.all(out[0, :4, 3] == 0)
    # Pasting past the edge is clipped, not an error.
    (out,) = ImageCompositeMasked().run(dest, src, x=6, y=6, resize_source=False)
    assert out.sum() == 4 * 3 and torch.all(out[:, 6:, 6:] == 1)


def test_blend_modes():
    a, b = torch.full((1, 2, 2, 3), 0.2), torch.full((1, 2, 2, 3), 0.6)
    assert torch.allclose(ImageBlend().run(a, b, 0.5, "normal")[0], torch.full_like(a, 0.4))
    assert torch.allclose(ImageBlend().run(a, b, 1.0, "multiply")[0], torch.full_like(a, 0.12))
    assert torch.allclose(ImageBlend().run(a, b, 1.0, "screen")[0], torch.full_like(a, 1 - 0.8 * 0.4))
    assert torch.allclose(ImageBlend().run(a, b, 1.0, "difference")[0], torch.zeros_like(a))  # clamped


def test_blur_and_sharpen_keep_flat_images():
    flat = torch.full((1, 9, 9, 3), 0.3)
    assert torch.allclose(ImageBlur().run(flat, 2, 1.0)[0], flat, atol=1e-6)
    assert torch.allclose(ImageSharpen().run(flat, 1, 1.0, 1.0)[0], flat, atol=1e-5)
    spot = torch.zeros(1, 9, 9, 1)
    spot[0, 4, 4, 0] = 1.0
    blurred = ImageBlur().run(spot, 1, 1.0)[0]
    assert blurred.sum() == pytest.approx(1.0, abs=1e-5) and 0 < blurred[0, 4, 4, 0] < 1 and blurred[0, 3, 4, 0] > 0


def test_alpha_join_and_split():
    img = pattern(4, 4)
    mask = torch.zeros(1, 2, 2)
    mask[0, 0, 0] = 1.0  # top-left quarter transparent after stretching to 4x4
    (rgba,) = JoinImageWithAlpha().run(img, mask)
    assert rgba.shape == (1, 4, 4, 4)
    assert rgba[0, 0, 0, 3] == 0.0 and rgba[0, 3, 3, 3] == 1.0
    rgb, back = SplitImageWithAlpha().run(rgba)
    assert torch.equal(rgb, img) and back[0, 0, 0] == 1.0 and back[0, 3, 3] == 0.0


def test_image_composite_masked_keeps_the_destination_channels():
    # ComfyUI's rule (checked against ComfyUI 0.8.0): an RGBA source pasted on an RGB
    # destination loses its alpha channel; the output stays RGB.
    dest, src = torch.zeros(1, 4, 4, 3), torch.cat([torch.ones(1, 2, 2, 3), torch.zeros(1, 2, 2, 1)], dim=-1)
    (out,) = ImageCompositeMasked().run(dest, src, 1, 1, False)
    assert out.shape == (1, 4, 4, 3)
    assert torch.all(out[0, 1:3, 1:3] == 1) and out.sum() == 12


def test_join_image_with_alpha_takes_the_smaller_batch():
    # ComfyUI's rule (checked against ComfyUI 0.8.0): the output has min(len(image), len(alpha))
    # frames; a single mask is not repeated over a batch of images.
    images = torch.rand(3, 2, 2, 3)
    (rgba,) = JoinImageWithAlpha().run(images, torch.full((1, 2, 2), 0.25))
    assert rgba.shape == (1, 2, 2, 4)
    assert torch.equal(rgba[0, ..., :3], images[0]) and torch.all(rgba[..., 3] == 0.75)
    (rgba,) = JoinImageWithAlpha().run(images[:1], torch.zeros(2, 2, 2))
    assert rgba.shape == (1, 2, 2, 4)


def test_integral_floats_for_int_inputs_run(base):
    # Clients in other languages may send 8.0 for an INT; the node must get the integer 8.
    from nodeflow import Executor
    from nodes.io import PreviewImage

    reg = Registry([EmptyImage, ScaleImage, PreviewImage])
    wf = {"1": {"class_type": "EmptyImage", "inputs": {"width": 4.0, "height": 2, "batch_size": 1, "color": 0}},
          "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                       "width": 8.0, "height": 0, "crop": "disabled"}},
          "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    result = Executor(reg).run(wf)
    assert result.ok, result.error
    assert result.output("2").shape == (1, 4, 8, 3)


def test_add_noise_is_seeded():
    img = torch.full((1, 4, 4, 3), 0.5)
    (a,) = ImageAddNoise().run(img, seed=3, strength=0.1)
    expected = (img + 0.1 * torch.randn(1, 4, 4, 3, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    assert torch.equal(a, expected) and not torch.equal(a, ImageAddNoise().run(img, seed=4, strength=0.1)[0])


def test_batch_rgb_with_rgba_adds_an_opaque_alpha():
    rgb, rgba = pattern(4, 4, seed=1), torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    (both,) = ImageBatch().run(rgb, rgba)
    assert both.shape == (3, 4, 4, 4)
    assert torch.equal(both[0, ..., :3], rgb[0]) and torch.equal(both[0, ..., 3], torch.ones(4, 4))
    assert torch.equal(both[1:], rgba)
    (other_way,) = ImageBatch().run(rgba, rgb)
    assert other_way.shape == (3, 4, 4, 4) and torch.equal(other_way[2, ..., 3], torch.ones(4, 4))


def test_quantize_limits_colours_and_dithering_keeps_local_brightness():
    from nodes.image import ImageQuantize

    two = torch.zeros(1, 4, 4, 3)
    two[:, :, 2:] = torch.tensor([1.0, 0.0, 0.0])
    for dither in ("none", "floyd-steinberg", "bayer-2"):
        assert torch.equal(ImageQuantize().run(two, 2, dither)[0], two), dither   # already 2 colours
    ramp = torch.linspace(0, 1, 64).view(1, 1, 64, 1).expand(1, 32, 64, 3).contiguous()
    blur = torch.nn.AvgPool2d(8)

    def error(out):   # how far 8x8 block means are from the ramp's, between the two palette colours
        middle = slice(16, 48)                       # the ramp's 0.25 … 0.75: the palette spans it
        return (blur(out[:, :, middle].movedim(-1, 1)) - blur(ramp[:, :, middle].movedim(-1, 1))).abs().mean().item()

    (flat,) = ImageQuantize().run(ramp, 2, "none")
    assert len(torch.unique(flat.reshape(-1, 3), dim=0)) <= 2
    for dither in ("floyd-steinberg", "bayer-4", "bayer-8"):
        (out,) = ImageQuantize().run(ramp, 2, dither)
        assert len(torch.unique(out.reshape(-1, 3), dim=0)) <= 2, dither
        assert error(out) < 0.6 * error(flat), dither
    assert ImageQuantize().run(torch.rand(3, 5, 7, 3), 16, "bayer-16")[0].shape == (3, 5, 7, 3)


def test_porter_duff_operators_by_hand():
    """ComfyUI's rule: the MASK inputs are inverted alphas (alpha = 1 - mask), colours are
    premultiplied for the operator, divided back by the result's alpha (0 where it is ~0) and
    clamped, and the alpha goes out as a mask (1 - alpha). Checked against ComfyUI 0.8.0."""
    from nodes.image import PorterDuffImageComposite

    s, sm = torch.full((1, 2, 2, 3), 0.6), torch.full((1, 2, 2), 0.5)   # source alpha 0.5
    d, dm = torch.full((1, 2, 2, 3), 0.2), torch.zeros(1, 2, 2)         # destination opaque
    # premultiplied: S = 0.3 (alpha 0.5), D = 0.2 (alpha 1); mode: (colour, out mask)
    cases = {
        "SRC_OVER": (0.3 + 0.5 * 0.2, 0.0), "DST_OVER": (0.2, 0.0), "SRC_IN": (0.3 / 0.5, 0.5),
        "DST_IN": (0.1 / 0.5, 0.5), "SRC_OUT": (0.0, 1.0), "DST_OUT": (0.1 / 0.5, 0.5),
        "SRC_ATOP": (0.3 + 0.5 * 0.2, 0.0), "DST_ATOP": (0.1 / 0.5, 0.5), "XOR": (0.1 / 0.5, 0.5),
        "SRC": (0.6, 0.5), "DST": (0.2, 0.0), "CLEAR": (0.0, 1.0), "MULTIPLY": (0.06 / 0.5, 0.5),
        "SCREEN": (0.3 + 0.2 - 0.06, 0.0), "ADD": (0.5, 0.0), "DARKEN": (0.1 + 0.2, 0.0),
        "LIGHTEN": (0.1 + 0.3, 0.0),
    }
    for mode, (colour, mask_value) in cases.items():
        image, mask = PorterDuffImageComposite().run(s, sm, d, dm, mode)
        assert torch.allclose(image, torch.full_like(d, colour), atol=1e-6), mode
        assert torch.allclose(mask, torch.full_like(dm, mask_value), atol=1e-6), mode
    # un-premultiplying clamps to 0..1: ADD of two half-transparent 0.8s gives 0.8 + 0.8 -> 1
    image, mask = PorterDuffImageComposite().run(torch.full((1, 1, 1, 3), 0.8), torch.full((1, 1, 1), 0.5),
                                                 torch.full((1, 1, 1, 3), 0.8), torch.full((1, 1, 1), 0.5), "ADD")
    assert torch.allclose(image, torch.full((1, 1, 1, 3), 0.8)) and torch.allclose(mask, torch.zeros(1, 1, 1))


def test_porter_duff_fits_the_source_to_the_destination_and_takes_the_smallest_batch():
    from nodes.image import PorterDuffImageComposite

    s, sa = torch.rand(3, 2, 2, 3), torch.ones(2, 2, 2)
    d, da = torch.rand(2, 4, 6, 3), torch.ones(1, 4, 6)
    image, mask = PorterDuffImageComposite().run(s, sa, d, da, "SRC_OVER")
    assert image.shape == (1, 4, 6, 3) and mask.shape == (1, 4, 6)
    schema = PorterDuffImageComposite.inputs["mode"]
    assert schema.default == "DST" and len(schema.options_list()) == 18
