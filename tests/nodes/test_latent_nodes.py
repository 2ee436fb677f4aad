"""Latent utilities: sizes in pixels / 8, batch bookkeeping, compositing, spherical resize."""

import pytest
import torch

from nodeflow.imaging import bislerp
from nodes.latent import (
    LatentAdd,
    LatentBatch,
    LatentBatchSeedBehavior,
    LatentBlend,
    LatentComposite,
    LatentCompositeMasked,
    LatentCrop,
    LatentFlip,
    LatentFromBatch,
    LatentInterpolate,
    LatentMultiply,
    LatentRotate,
    LatentSubtract,
    RepeatLatentBatch,
    ScaleLatent,
    ScaleLatentBy,
    SetLatentNoiseMask,
)


def latent(b=1, h=8, w=8, value=None, seed=0):
    if value is not None:
        return {"samples": torch.full((b, 4, h, w), float(value))}
    return {"samples": torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))}


def test_scale_latent_pixels_over_8_aspect_and_minimum():
    lat = latent(h=8, w=16)
    assert ScaleLatent().run(lat, "nearest-exact", 256, 128, "disabled")[0]["samples"].shape == (1, 4, 16, 32)
    assert ScaleLatent().run(lat, "bilinear", 0, 128, "disabled")[0]["samples"].shape == (1, 4, 16, 32)
    # Each side at least 64 pixels: 8 wide becomes 64, and the 32 the aspect ratio gives becomes 64.
    assert ScaleLatent().run(lat, "bislerp", 8, 0, "disabled")[0]["samples"].shape == (1, 4, 8, 8)
    assert ScaleLatent().run(lat, "bilinear", 0, 0, "disabled")[0] is lat
    assert ScaleLatentBy().run(lat, "bicubic", 1.5)[0]["samples"].shape == (1, 4, 12, 24)
    assert "noise_mask" not in lat and lat["samples"].shape == (1, 4, 8, 16)


def test_bislerp_identity_and_parallel_vectors():
    x = latent(h=5, w=7)["samples"]
    assert torch.allclose(bislerp(x, 7, 5), x, atol=1e-6)
    # Vectors of one direction: ComfyUI's rule keeps the nearer-to-origin neighbour as it is.
    direction = torch.tensor([0.5, -0.5, 0.5, 0.5]).view(1, 4, 1, 1)
    row = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    out = bislerp(direction * row, 4, 1)
    assert torch.allclose(out.norm(dim=1)[0, 0], torch.tensor([1.0, 1.0, 1.0, 3.0]), atol=1e-5)


def test_bislerp_keeps_lengths_of_rotating_vectors():
    # Two orthogonal unit vectors side by side: the midpoint keeps length 1 (a plain average gives 0.71).
    x = torch.zeros(1, 4, 1, 2)
    x[0, 0, 0, 0] = 1.0
    x[0, 1, 0, 1] = 1.0
    out = bislerp(x, 4, 1)
    assert torch.allclose(out.norm(dim=1), torch.ones(1, 1, 4), atol=1e-5)


def test_from_batch_and_repeat_track_noise_indices():
    lat = latent(b=4)
    lat["noise_mask"] = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8)
    (part,) = LatentFromBatch().run(lat, batch_index=1, length=2)
    assert torch.equal(part["samples"], lat["samples"][1:3]) and part["batch_index"] == [1, 2]
    assert part["noise_mask"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    (again,) = LatentFromBatch().run(part, batch_index=1, length=5)
    assert again["batch_index"] == [2] and again["samples"].shape[0] == 1
    (rep,) = RepeatLatentBatch().run(part, amount=3)
    assert rep["samples"].shape[0] == 6 and rep["batch_index"] == [1, 2, 3, 4, 5, 6]
    assert "batch_index" not in lat


def test_repeat_latent_batch_keeps_a_3d_noise_mask_3d():
    # ComfyUI repeats the mask along its own first axis: [2, H, W] x 3 -> [6, H, W]
    # (checked against ComfyUI 0.8.0); a 4-D repeat of it gave [3, 2, H, W].
    lat = latent(b=2)
    lat["noise_mask"] = torch.stack([torch.zeros(8, 8), torch.ones(8, 8)])
    (rep,) = RepeatLatentBatch().run(lat, amount=3)
    assert rep["noise_mask"].shape == (6, 8, 8)
    assert rep["noise_mask"][:, 0, 0].tolist() == [0.0, 1.0] * 3


def test_latent_composite_feather_wider_than_the_paste_follows_comfyui_slicing():
    # ComfyUI's rule (checked against ComfyUI 0.8.0): step t of the feather scales row t (top,
    # when y > 0) and the slice [h-1-t : h-t] (bottom, when the paste ends above the bottom) by
    # (t+1)/feather; that slice wraps round for t > h. A 2-row paste at y=1 with feather 5:
    # top: row0 x .2, row1 x .4; bottom: row1 x .2, row0 x .4, t=3 -> [-2:-1] = row0 x .8.
    dest = {"samples": torch.zeros(1, 1, 8, 1)}
    (out,) = LatentComposite().run(dest, {"samples": torch.ones(1, 1, 2, 1)}, x=0, y=8, feather=40)
    assert torch.allclose(out["samples"][0, 0, :, 0],
                          torch.tensor([0, 0.2 * 0.4 * 0.8, 0.4 * 0.2, 0, 0, 0, 0, 0]))


def test_latent_batch_resizes_and_concatenates_indices():
    (both,) = LatentBatch().run(latent(b=2), latent(b=1, h=4, w=4))
    assert both["samples"].shape == (3, 4, 8, 8) and both["batch_index"] == [0, 1, 0]


def test_composite_positions_and_feather():
    to, src = latent(value=0, h=8, w=8), latent(value=1, h=4, w=4)
    (out,) = LatentComposite().run(to, src, x=16, y=32, feather=0)
    s = out["samples"]
    assert torch.all(s[:, :, 4:8, 2:6] == 1) and s.sum() == 4 * 16
    # feather 16 = 2 latent pixels: the outermost row/column of the paste gets 1/2, the next 2/2.
    (out,) = LatentComposite().run(to, src, x=16, y=16, feather=16)
    assert out["samples"][0, 0, 3, 2:6].tolist() == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert out["samples"][0, 0, 2, 2:6].tolist() == pytest.approx([0.25, 0.5, 0.5, 0.25])
    (out,) = LatentComposite().run(to, src, x=48, y=0, feather=0)  # clipped at the right edge
    assert out["samples"].sum() == 4 * 4 * 2


def test_composite_masked_and_noise_mask():
    to, src = latent(value=0), latent(value=1, h=2, w=2)
    (out,) = LatentCompositeMasked().run(to, src, x=8, y=8, resize_source=False, mask=torch.full((16, 16), 0.5))
    assert torch.all(out["samples"][:, :, 1:3, 1:3] == 0.5) and out["samples"].sum() == 0.5 * 16
    (out,) = LatentCompositeMasked().run(to, src, 0, 0, resize_source=True)
    assert torch.all(out["samples"] == 1)
    (masked,) = SetLatentNoiseMask().run(to, torch.ones(64, 48))
    assert masked["noise_mask"].shape == (1, 1, 64, 48) and "noise_mask" not in to


def test_crop_flip_rotate():
    lat = {"samples": torch.arange(256.0).view(1, 1, 16, 16)}
    (c,) = LatentCrop().run(lat, width=16, height=24, x=8, y=16)
    assert torch.equal(c["samples"], lat["samples"][:, :, 2:5, 1:3])
    (c,) = LatentCrop().run(lat, width=64, height=64, x=512, y=512)  # corner kept 8 latent pixels inside
    assert torch.equal(c["samples"], lat["samples"][:, :, 8:16, 8:16])
    small = {"samples": torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)}
    assert LatentRotate().run(small, "90 degrees")[0]["samples"][0, 0].tolist() == [[2.0, 0.0], [3.0, 1.0]]
    assert LatentFlip().run(small, "y-axis: horizontally")[0]["samples"][0, 0].tolist() == [[1.0, 0.0], [3.0, 2.0]]


def test_arithmetic_and_interpolate():
    a, b = latent(value=2), latent(value=0.5)
    assert torch.all(LatentAdd().run(a, b)[0]["samples"] == 2.5)
    assert torch.all(LatentSubtract().run(a, latent(value=0.5, h=4, w=4))[0]["samples"] == 1.5)
    assert torch.all(LatentMultiply().run(a, -1.5)[0]["samples"] == -3)
    assert torch.allclose(LatentBlend().run(a, b, 0.25)[0]["samples"], torch.full_like(a["samples"], 0.875))
    x, y = latent(b=2, seed=1), latent(b=2, seed=2)
    assert torch.allclose(LatentInterpolate().run(x, y, 1.0)[0]["samples"], x["samples"], atol=1e-5)
    assert torch.allclose(LatentInterpolate().run(x, y, 0.0)[0]["samples"], y["samples"], atol=1e-5)


def test_seed_behavior():
    lat = latent(b=3)
    assert LatentBatchSeedBehavior().run(lat, "fixed")[0]["batch_index"] == [0, 0, 0]
    assert "batch_index" not in LatentBatchSeedBehavior().run({**lat, "batch_index": [4, 5, 6]}, "random")[0]


# -- .latent files ----------------------------------------------------------------------------------


def test_save_latent_writes_comfyuis_file_format(base, monkeypatch):
    import json

    from safetensors import safe_open

    from nodes.latent_files import SaveLatent

    lat = latent(b=2, h=3, w=5, seed=4)
    prompt = {"1": {"class_type": "SaveLatent", "inputs": {}}}
    result = SaveLatent().run(lat, "latents/ComfyUI", prompt=prompt, extra_pnginfo={"workflow": {"nodes": []}})
    assert result.ui == {"latents": [{"filename": "ComfyUI_00001_.latent", "subfolder": "latents", "type": "output"}]}
    path = base.output / "latents" / "ComfyUI_00001_.latent"
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        assert torch.equal(f.get_tensor("latent_tensor"), lat["samples"])
        assert f.get_tensor("latent_format_version_0").numel() == 0
        meta = f.metadata()
    assert json.loads(meta["prompt"]) == prompt and json.loads(meta["workflow"]) == {"nodes": []}
    again = SaveLatent().run(lat, "latents/ComfyUI")
    assert again.ui["latents"][0]["filename"] == "ComfyUI_00002_.latent"
    assert SaveLatent.validate_inputs(filename_prefix="../x")
    monkeypatch.setenv("NODEFLOW_DISABLE_METADATA", "1")
    SaveLatent().run(lat, "plain", prompt=prompt)
    with safe_open(str(base.output / "plain_00001_.latent"), "pt") as f:
        assert not f.metadata()


def test_load_latent_reads_both_formats_from_input(base):
    from safetensors.torch import save_file

    from nodes.latent_files import LoadLatent

    samples = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(1))
    save_file({"latent_tensor": samples, "latent_format_version_0": torch.tensor([])}, str(base.input / "new.latent"))
    save_file({"latent_tensor": samples * 0.18215}, str(base.input / "old.latent"))   # the first format: scaled
    (base.input / "notes.txt").write_text("not a latent")
    assert LoadLatent.inputs["latent"].options_list() == ["new.latent", "old.latent"]
    assert torch.equal(LoadLatent().run("new.latent")[0]["samples"], samples)
    assert torch.allclose(LoadLatent().run("old.latent")[0]["samples"], samples, atol=1e-6)
    assert LoadLatent.fingerprint(latent="new.latent") != LoadLatent.fingerprint(latent="old.latent")
    spec = LoadLatent.inputs["latent"]
    assert spec.check("../new.latent") is not None and spec.check("missing.latent") is not None
    (base.input / "bad.latent").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a latent file"):
        LoadLatent().run("bad.latent")


def test_saved_latent_loads_back_through_a_workflow(base):
    import shutil

    from nodeflow import Executor, Registry
    from nodes.latent_files import LoadLatent, SaveLatent

    lat = latent(b=1, h=4, w=4, seed=2)
    SaveLatent().run(lat, "round")
    shutil.copyfile(base.output / "round_00001_.latent", base.input / "round.latent")
    reg = Registry([LoadLatent, SaveLatent])
    result = Executor(reg).run({"1": {"class_type": "LoadLatent", "inputs": {"latent": "round.latent"}},
                                "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0],
                                                                            "filename_prefix": "again"}}})
    assert result.ok, result.error
    assert torch.equal(result.output("1")["samples"], lat["samples"])
