import io
import json
import os
import pickle
import re
import shutil
import struct
import sys
import types

import pytest
import torch

from nodeflow.models import CheckpointError, detect_family, load_checkpoint, load_diffusers, load_vae, testing
from nodeflow.models.files import read_all


def run_all(ckpt, prompt="a (photo:1.2) of a cat", batch=2, size=8):
    """Encode a prompt, run the UNet once at two timesteps, decode a latent: the shapes of a sampling step."""
    cond, pooled = ckpt.clip.encode(prompt)
    x = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(0))
    kw = ckpt.model.condition_kwargs({"pooled_output": pooled}, batch, size * 8, size * 8)
    c_concat = torch.zeros(batch, 5, size, size) if ckpt.model.in_channels == 9 else None
    out = ckpt.model.apply_model(ckpt.model.process_latent_in(x), torch.tensor([1.0, 999.0])[:batch],
                                 cond.expand(batch, -1, -1), c_concat=c_concat, **kw)
    image = ckpt.vae.decode(x[:1])
    return cond, pooled, out, image


@pytest.mark.parametrize("fixture, family, prediction, cond_width, pooled_width, scale", [
    ("sd1_path", "sd1", "eps", 32, 32, 0.18215),
    ("sd1_ckpt_path", "sd1", "eps", 32, 32, 0.18215),
    ("sd1_inpaint_path", "sd1_inpaint", "eps", 32, 32, 0.18215),
    ("sd2_path", "sd2", "eps", 128, 128, 0.18215),
    ("sd2_v_path", "sd2_v", "v", 128, 128, 0.18215),
    ("sdxl_path", "sdxl", "eps", 32 + 128, 128, 0.13025),
    ("refiner_path", "sdxl_refiner", "eps", 128, 128, 0.13025),
])
def test_each_layout_loads_detects_and_runs(request, fixture, family, prediction, cond_width, pooled_width, scale):
    ckpt = load_checkpoint(request.getfixturevalue(fixture))
    assert ckpt.family == ckpt.model.family == family
    assert ckpt.model.prediction_type == prediction
    assert ckpt.model.latent_scale_factor == ckpt.vae.scale_factor == scale
    assert ckpt.model.in_channels == (9 if "inpaint" in family else 4) and ckpt.model.latent_channels == 4
    assert ckpt.model.alphas_cumprod.shape == (1000,)
    cond, pooled, out, image = run_all(ckpt)
    assert cond.shape == (1, 77, cond_width) and cond.dtype == torch.float32
    assert pooled.shape == (1, pooled_width)
    assert out.shape == (2, 4, 8, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert image.shape == (1, 64, 64, 3) and image.min() >= 0 and image.max() <= 1


def test_ckpt_and_safetensors_give_the_same_model(sd1_path, sd1_ckpt_path):
    a, b = load_checkpoint(sd1_path), load_checkpoint(sd1_ckpt_path)
    for x, y in zip(run_all(a), run_all(b)):
        assert torch.equal(x, y)


def test_alphas_cumprod_is_sds_schedule(sd1):
    ac = sd1.model.alphas_cumprod
    assert ac[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert ac[-1].item() == pytest.approx(0.0046580, rel=1e-3)
    assert torch.equal(sd1.model.process_latent_out(sd1.model.process_latent_in(torch.ones(1))), torch.ones(1))


def test_detect_family_from_shapes_only():
    for family in ("sd1", "sd2", "sdxl", "sdxl_refiner"):
        sd = testing.tiny_state_dict(family)
        assert detect_family({k: tuple(v.shape) for k, v in sd.items()}) == family
        unet_only = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("model.diffusion_model.")}
        assert detect_family(unet_only) == family                       # without text encoders too
    assert detect_family(testing.tiny_state_dict("sd1", inpaint=True)) == "sd1_inpaint"
    assert detect_family(testing.tiny_state_dict("sdxl", inpaint=True)) == "sdxl_inpaint"
    assert detect_family(testing.tiny_state_dict("sd2", v_prediction=True)) == "sd2_v"


def test_v_pred_key_and_prediction_override(tmp_path, sd2_path, sd2_v_path):
    assert load_checkpoint(sd2_v_path, prediction_type="eps").family == "sd2"
    forced = load_checkpoint(sd2_path, prediction_type="v")
    assert forced.family == "sd2_v" and forced.model.prediction_type == "v"
    marked = testing.save({**testing.tiny_state_dict("sdxl"), "v_pred": torch.zeros(0)}, tmp_path / "xl_v.safetensors")
    assert load_checkpoint(marked, components=("model",)).model.prediction_type == "v"
    with pytest.raises(ValueError, match="prediction_type"):
        load_checkpoint(sd2_path, prediction_type="x0")


def test_v_statistic_is_not_applied_to_inpainting_models(tmp_path):
    sd = testing.tiny_state_dict("sd2", inpaint=True, v_prediction=True)      # the statistic says "v"
    assert detect_family(sd) == "sd2_inpaint"
    path = testing.save(sd, tmp_path / "sd2_inpaint.safetensors")
    assert load_checkpoint(path, components=("model",)).model.prediction_type == "eps"
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: v\n")
    hinted = load_checkpoint(path, components=("model",)).model
    assert hinted.prediction_type == "v" and hinted.family == "sd2_v_inpaint"


def test_yaml_next_to_the_checkpoint_says_v(tmp_path, sd2_path):
    path = tmp_path / "sd21.safetensors"
    shutil.copy(sd2_path, path)
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert load_checkpoint(path, components=("model",)).family == "sd2_v"


def test_inpainting_model_needs_c_concat(sd1_inpaint_path):
    model = load_checkpoint(sd1_inpaint_path, components=("model",)).model
    with pytest.raises(ValueError, match="9 input channels.*c_concat"):
        model.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), torch.zeros(1, 77, 32))


def test_components_dtype_and_clone(sd1_path):
    ckpt = load_checkpoint(sd1_path, components=("model",), dtype=torch.bfloat16)
    assert ckpt.clip is None and ckpt.vae is None
    assert ckpt.model.dtype == torch.bfloat16
    out = ckpt.model.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), torch.zeros(1, 77, 32))
    assert out.dtype == torch.float32
    clone = ckpt.model.clone()
    assert clone.unet is ckpt.model.unet and clone is not ckpt.model and clone.family == "sd1"


def test_weights_are_not_tied_to_the_file(tmp_path, sd1_path):
    path = tmp_path / "gone.safetensors"
    shutil.copy(sd1_path, path)
    ckpt = load_checkpoint(path)
    path.unlink()
    assert torch.isfinite(run_all(ckpt)[2]).all()


def test_sdxl_size_conditioning(sdxl, refiner_path):
    model, pooled = sdxl.model, torch.randn(1, 128)
    y = model.condition_kwargs({"pooled_output": pooled}, 3, 1024, 768)["y"]
    assert y.shape == (3, 128 + 6 * 256) and torch.equal(y[1, :128], pooled[0])
    cropped = model.condition_kwargs({"pooled_output": pooled, "crop_w": 64}, 3, 1024, 768)["y"]
    assert not torch.equal(y, cropped)
    explicit = model.condition_kwargs({"pooled_output": pooled, "width": 1024, "height": 768, "target_width": 1024,
                                       "target_height": 768, "crop_w": 0, "crop_h": 0}, 3, 1024, 768)["y"]
    assert torch.equal(y, explicit)
    with pytest.raises(ValueError, match="pooled text output of width 128"):
        model.condition_kwargs({"pooled_output": torch.zeros(1, 64)}, 1, 64, 64)
    refiner = load_checkpoint(refiner_path, components=("model",)).model
    y = refiner.condition_kwargs({"pooled_output": pooled}, 1, 64, 64)["y"]
    assert y.shape == (1, 128 + 5 * 256)
    other_score = refiner.condition_kwargs({"pooled_output": pooled, "aesthetic_score": 2.5}, 1, 64, 64)["y"]
    assert not torch.equal(y, other_score)


def test_sd1_has_no_extra_conditioning(sd1):
    assert sd1.model.condition_kwargs({"pooled_output": torch.zeros(1, 32)}, 2, 512, 512) == {}


# --- diffusers folders and standalone VAEs -------------------------------------------------

@pytest.mark.parametrize("family, single", [("sd1", "sd1_path"), ("sdxl", "sdxl_path")])
def test_diffusers_folder_equals_single_file(request, family, single):
    folder = request.getfixturevalue(f"diffusers_{family}")
    a, b = load_diffusers(folder), load_checkpoint(request.getfixturevalue(single))
    assert a.family == family and a.model.prediction_type == "eps"
    assert a.vae.scale_factor == b.vae.scale_factor
    for x, y in zip(run_all(a), run_all(b)):
        assert torch.equal(x, y)


def test_diffusers_v_prediction_from_scheduler(tmp_path):
    folder = testing.write_tiny_diffusers(tmp_path / "v", "sd2", v_prediction=True)
    ckpt = load_diffusers(folder, components=("model",))
    assert ckpt.family == "sd2_v" and ckpt.model.prediction_type == "v"


def test_sd2_diffusers_folder_conditions_like_the_single_file(tmp_path, sd2_path):
    """diffusers' SD 2.x text_encoder lacks OpenCLIP's last layer; its last layer is SD 2's default."""
    folder = testing.write_tiny_diffusers(tmp_path / "sd2", "sd2")
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 2   # of 3
    single, diffusers_clip = load_checkpoint(sd2_path).clip, load_diffusers(folder, components=("clip",)).clip
    prompt = "a (watercolor:1.2) fox"
    assert torch.equal(diffusers_clip.encode(prompt)[0], single.encode(prompt)[0])
    for layer in (-2, -3):
        assert torch.equal(diffusers_clip.set_last_layer(layer).encode(prompt)[0],
                           single.set_last_layer(layer).encode(prompt)[0])
    with pytest.raises(ValueError, match=r"layer -1 is not in this text encoder.*use -2"):
        diffusers_clip.set_last_layer(-1).encode(prompt)


def test_load_checkpoint_takes_a_diffusers_folder(diffusers_sd1):
    ckpt = load_checkpoint(diffusers_sd1, prediction_type="v", components=("model",))
    assert ckpt.family == "sd1" and ckpt.model.prediction_type == "v" and ckpt.clip is None


def test_standalone_vae_in_every_layout(tmp_path, vae_path, sd1_path, diffusers_sd1):
    plain = load_vae(vae_path)
    from_diffusers_keys = load_vae(testing.write_tiny_vae(tmp_path / "d.safetensors", diffusers_keys=True))
    pickled = {"first_stage_model." + k: v for k, v in read_all(vae_path).items()}
    pickled["loss.logvar"] = torch.zeros(())                          # training leftovers are ignored
    from_pickle = load_vae(testing.save(pickled, tmp_path / "vae.pt"))
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(plain.decode(z), from_diffusers_keys.decode(z))
    assert torch.equal(plain.decode(z), from_pickle.decode(z))
    full, folder = load_vae(sd1_path), load_vae(diffusers_sd1 / "vae")
    assert torch.equal(full.decode(z), folder.decode(z)) and folder.scale_factor == 0.18215


# --- errors ---------------------------------------------------------------------------------

def test_truncated_safetensors(tmp_path, sd1_path):
    data = sd1_path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)
    (tmp_path / "tiny.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(tmp_path / "tiny.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_truncated_ckpt(tmp_path, sd1_ckpt_path):
    data = sd1_ckpt_path.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)


def _pickled(obj, legacy: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_empty_or_truncated_ckpt_at_any_point(tmp_path, legacy):
    """A pickled checkpoint cut anywhere is reported as empty or truncated, naming the file."""
    data = _pickled({"state_dict": {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)}, "epoch": 1}, legacy)
    path = tmp_path / "cut.ckpt"
    for end in range(0, len(data), 1 if legacy else 7):
        path.write_bytes(data[:end])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert str(e.value).startswith(f"{path}: ") and re.search("empty" if end == 0 else "truncated", str(e.value))
    path.write_bytes(data)
    assert set(read_all(path)) == {"a.weight", "a.bias"}


@pytest.mark.parametrize("data", [os.urandom(4096), b"P", b"PK", b"hello world", b"\x80\x02K\x01.",
                                  pickle.dumps({"state_dict": {}}, protocol=2)],
                         ids=["random", "zip-cut-to-1", "zip-cut-to-2", "text", "int-pickle", "plain-pickle"])
def test_corrupt_ckpt_is_not_a_security_refusal(tmp_path, data):
    path = tmp_path / "corrupt.ckpt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a valid checkpoint (corrupt or not a PyTorch "
                                                        "file)")) as e:
        load_checkpoint(path)
    assert "refused" not in str(e.value) and "arbitrary code" not in str(e.value)


@pytest.mark.parametrize("header, expected", [
    ([], "header is a JSON list, expected an object"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}, "bad safetensors header entry for 'a'"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]}}, "bad safetensors header entry for 'a'"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, r"hold 4 bytes, shape \[2\] of F32 needs 8"),
    ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "bad safetensors header entry for 'a'"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "bad safetensors header entry for 'a'"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, "bad safetensors header entry for 'a'"),
    ({"a": 5}, "bad safetensors header entry for 'a'"),
    ({"__metadata__": ["x"]}, "__metadata__ is a list, expected an object"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}, "truncated"),
])
def test_malformed_safetensors_header(tmp_path, header, expected):
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: .*{expected}"):
        load_checkpoint(path)


def test_unknown_model_names_what_was_expected(tmp_path):
    path = testing.save({"encoder.layer.0.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)},
                        tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\..*found 'encoder\.layer\.\*'"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a VAE: expected keys like 'encoder.conv_in.weight'"):
        load_vae(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="not a diffusers folder"):
        load_diffusers(tmp_path)


def test_incomplete_unet_names_the_missing_keys(tmp_path):
    sd = testing.tiny_state_dict("sd1")
    del sd["model.diffusion_model.output_blocks.3.1.proj_out.weight"]
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"sd1 UNet .*1 missing, e\.g\. output_blocks\.3\.1\.proj_out\.weight.*"
                                              r"wrong shape, e\.g\. out\.2\.bias \(5,\) \(expected \(4,\)\)"):
        load_checkpoint(testing.save(sd, tmp_path / "broken.safetensors"))


@pytest.mark.parametrize("family, drop, expected", [
    ("sd1", "model.diffusion_model.input_blocks.1.0.out_layers.3.weight",
     r"architecture of the sd1 UNet: missing key 'input_blocks\.1\.0\.out_layers\.3\.weight'"),
    ("sd1", "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1.weight",
     r"sd1 UNet .*1 missing, e\.g\. input_blocks\.1\.1\.transformer_blocks\.0\.norm1\.weight"),
    ("sd1", "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.weight",
     r"CLIP-L in .*1 missing, e\.g\. \S*encoder\.layers\.2\.mlp\.fc1\.weight"),
    ("sd1", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
     r"architecture of the CLIP-L in .*missing key 'text_model\.embeddings\.token_embedding\.weight'"),
    ("sd2", "cond_stage_model.model.transformer.resblocks.2.mlp.c_fc.weight",
     r"CLIP-H in .*1 missing, e\.g\. \S*encoder\.layers\.2\.mlp\.fc1\.weight"),
    ("sd1", "first_stage_model.decoder.conv_out.weight", r"architecture of the VAE: missing key 'decoder\.conv_out"),
])
def test_incomplete_file_names_the_file_the_part_and_the_keys(tmp_path, family, drop, expected):
    sd = testing.tiny_state_dict(family)
    del sd[drop]
    path = testing.save(sd, tmp_path / "incomplete.safetensors")
    part = "model" if drop.startswith("model.") else "clip" if drop.startswith("cond_stage_model.") else "vae"
    with pytest.raises(CheckpointError, match=expected) as e:
        load_checkpoint(path, components=(part,))
    assert str(e.value).startswith(str(path)) or f" in {path}" in str(e.value)


class Payload:
    """Unpickling this creates the marker file: proof that code ran."""
    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_needing_code_is_refused_and_not_run(tmp_path, legacy):
    marker = tmp_path / "executed"
    payload = Payload()
    payload.marker = str(marker)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": testing.tiny_state_dict("sd1"), "callback": payload}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=r"refused to load.*references .*open.*was not executed"):
        load_checkpoint(path)
    assert not marker.exists()


LIGHTNING = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_lightning_callbacks_and_numpy_scalars_load(tmp_path, monkeypatch, legacy):
    """Old Lightning checkpoints (the original SD 1.x ones) pickle the ModelCheckpoint callback and numpy
    scalars: these load (as inert stand-ins) without Lightning installed; the weights are intact."""
    np = pytest.importorskip("numpy")

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score = "val/loss", torch.tensor(0.25)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = LIGHTNING[-1], "ModelCheckpoint"
    for name in LIGHTNING:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[LIGHTNING[-1]].ModelCheckpoint = ModelCheckpoint
    sd = testing.tiny_state_dict("sd1")
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": sd, "epoch": np.int64(6), "lr": np.float64(1e-4), "ema": np.bool_(True),
                "dtype": np.dtype("float32"), "global_step": 470000,
                "callbacks": {ModelCheckpoint: {"best_model_path": "x.ckpt"}, "instance": ModelCheckpoint()}},
               path, _use_new_zipfile_serialization=not legacy)
    for name in LIGHTNING:
        monkeypatch.delitem(sys.modules, name)
    loaded = read_all(path)
    assert loaded.keys() == sd.keys() and detect_family(loaded) == "sd1"
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_allowed_extras_do_not_allow_anything_else(tmp_path):
    """numpy arrays (which can hold pickled objects) are still refused, as is any other class."""
    np = pytest.importorskip("numpy")
    path = tmp_path / "array.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "array": np.array([1, 2])}, path)
    with pytest.raises(CheckpointError, match=r"refused to load.*references numpy"):
        load_checkpoint(path)


def test_safetensors_reader_maps_or_converts_once(tmp_path):
    from safetensors.torch import save_file

    from nodeflow.models.files import SafetensorsFile

    tensors = {"a.half": torch.randn(3, 5).half(), "b.float": torch.randn(7), "c.int": torch.arange(4)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        assert f.shapes == {"a.half": (3, 5), "b.float": (7,), "c.int": (4,)}
        as_is = f.get("b.float")                                      # a view of the mapped file
        converted = f.get("a.half", torch.float32)                    # converted once
        ints = f.get("c.int", torch.float16)                          # integers keep their dtype
    assert torch.equal(as_is, tensors["b.float"]) and converted.dtype == torch.float32
    assert torch.equal(converted, tensors["a.half"].float()) and torch.equal(ints, tensors["c.int"])
    as_is.mul_(2)                                                     # a private mapping: the file is unchanged
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        assert torch.equal(f.get("b.float"), tensors["b.float"])
