"""The mask family, on small hand-made masks with known results."""

import pytest
import torch

from nodes.mask import (
    CropMask,
    FeatherMask,
    GrowMask,
    ImageColorToMask,
    ImageToMask,
    InvertMask,
    MaskComposite,
    MaskToImage,
    SolidMask,
    ThresholdMask,
)


def dot(size=5, at=(2, 2)):
    m = torch.zeros(size, size)
    m[at] = 1.0
    return m


def test_solid_invert_threshold():
    (m,) = SolidMask().run(0.25, width=3, height=2)
    assert m.shape == (1, 2, 3) and torch.all(m == 0.25)
    assert torch.all(InvertMask().run(m)[0] == 0.75)
    flat = torch.full((2, 3), 0.25)   # a [H, W] mask stays [H, W], as in ComfyUI
    assert InvertMask().run(flat)[0].shape == (2, 3)
    ramp = torch.tensor([[0.2, 0.5, 0.7]])
    assert ThresholdMask().run(ramp, 0.5)[0].tolist() == [[[0.0, 0.0, 1.0]]]


def test_crop_accepts_2d_and_clips():
    m = torch.arange(16.0).view(4, 4)
    (c,) = CropMask().run(m, x=1, y=2, width=2, height=5)
    assert c.tolist() == [[[9.0, 10.0], [13.0, 14.0]]]


def test_composite_operations_with_offset_and_clipping():
    dest = torch.full((1, 4, 4), 0.5)
    src = torch.ones(1, 3, 3)
    (out,) = MaskComposite().run(dest, src, x=2, y=1, operation="add")
    expected = torch.full((4, 4), 0.5)
    expected[1:4, 2:4] = 1.0  # 0.5 + 1 clamped; only the 3x2 part inside the destination
    assert torch.equal(out[0], expected)
    (out,) = MaskComposite().run(dest, src * 0.4, 0, 0, "subtract")
    assert out[0, 0, 0].item() == pytest.approx(0.1) and out[0, 3, 3] == 0.5
    (out,) = MaskComposite().run(dest, src * 0.5, 0, 0, "multiply")
    assert out[0, 0, 0] == 0.25
    a = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    assert MaskComposite().run(a, b, 0, 0, "and")[0].tolist() == [[[1, 0, 0, 0]]]
    assert MaskComposite().run(a, b, 0, 0, "or")[0].tolist() == [[[1, 1, 1, 0]]]
    assert MaskComposite().run(a, b, 0, 0, "xor")[0].tolist() == [[[0, 1, 1, 0]]]
    # Entirely outside: the destination unchanged.
    assert torch.equal(MaskComposite().run(dest, src, 9, 9, "add")[0], dest)


def test_feather_ramps_from_each_edge():
    (out,) = FeatherMask().run(torch.ones(4, 6), left=3, top=0, right=2, bottom=1)
    row = out[0, 0].tolist()
    assert row == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 0.5])
    assert out[0, 3].tolist() == pytest.approx(row)  # bottom=1 leaves the last row at 1/1
    (out,) = FeatherMask().run(torch.ones(1, 4, 1), 0, 4, 0, 0)
    assert out[0, :, 0].tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_feather_right_and_bottom_mirror_left_and_top():
    # Deliberately not ComfyUI's result: its right/bottom loops scale column 0 (index -0) first,
    # which would give [0.5, 1, 1, 1, 1, 1] here; the right edge is what should fade.
    (right,) = FeatherMask().run(torch.ones(1, 6), 0, 0, 2, 0)
    assert right[0, 0].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    (left,) = FeatherMask().run(torch.ones(1, 6), 2, 0, 0, 0)
    assert right[0, 0].flip(0).tolist() == pytest.approx(left[0, 0].tolist())
    (bottom,) = FeatherMask().run(torch.ones(5, 1), 0, 0, 0, 3)
    (top,) = FeatherMask().run(torch.ones(5, 1), 0, 3, 0, 0)
    assert bottom[0, :, 0].flip(0).tolist() == pytest.approx(top[0, :, 0].tolist())
    assert "Deliberate difference from ComfyUI" in FeatherMask.__doc__


def test_grow_cross_square_and_shrink():
    (cross,) = GrowMask().run(dot(), expand=1, tapered_corners=True)
    assert cross[0].sum() == 5 and cross[0, 1, 1] == 0 and cross[0, 1, 2] == 1
    (square,) = GrowMask().run(dot(), expand=1, tapered_corners=False)
    assert square[0].sum() == 9 and square[0, 1, 1] == 1
    (two,) = GrowMask().run(dot(7, (3, 3)), expand=2, tapered_corners=True)
    assert two[0].sum() == 13  # a diamond of radius 2
    block = torch.zeros(1, 6, 6)
    block[0, 1:5, 1:5] = 1.0
    (shrunk,) = GrowMask().run(block, expand=-1, tapered_corners=False)
    assert shrunk[0].sum() == 4 and torch.all(shrunk[0, 2:4, 2:4] == 1)
    # Edges do not count as empty: a full mask stays full when shrunk.
    assert torch.all(GrowMask().run(torch.ones(4, 4), -2, True)[0] == 1)


def test_image_mask_conversions():
    img = torch.zeros(1, 2, 2, 3)
    img[..., 1] = 0.7
    assert torch.all(ImageToMask().run(img, "green")[0] == 0.7)
    with pytest.raises(ValueError, match="no alpha channel"):
        ImageToMask().run(img, "alpha")
    (back,) = MaskToImage().run(torch.tensor([[0.0, 1.0]]))
    assert back.shape == (1, 1, 2, 3) and back[0, 0, 1].tolist() == [1.0, 1.0, 1.0]
    colours = torch.tensor([[[[1.0, 0.0, 0.0], [1.0, 128 / 255, 0.0]]]])
    assert ImageColorToMask().run(colours, 0xFF8000)[0].tolist() == [[[0.0, 1.0]]]
