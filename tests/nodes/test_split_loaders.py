"""The separate loaders of split-file workflows (UNETLoader, CLIPLoader, DualCLIPLoader): the
same picture as the single checkpoint the parts come from, ComfyUI's schemas, both folders of
each kind, every layout, and clear errors."""

from __future__ import annotations

import pytest
import torch

import nodeflow.folders as folders_mod
from nodeflow import Executor, default_registry
from nodeflow import context as run_context
from nodeflow.models import testing
from nodeflow.models.diffusers_format import ldm_unet_to_diffusers
from nodeflow.models.files import CheckpointError


def part(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("split")
    models = base / "models"
    sd1 = testing.tiny_state_dict("sd1")
    testing.save(sd1, models / "checkpoints" / "sd1.safetensors")
    testing.save(part(sd1, "model.diffusion_model."), models / "diffusion_models" / "sd1_unet.safetensors")
    testing.save({k: v for k, v in sd1.items() if k.startswith("model.")}, models / "unet" / "sd1_prefixed.safetensors")
    testing.save(ldm_unet_to_diffusers(part(sd1, "model.diffusion_model.")),
                 models / "diffusion_models" / "sd1_diffusers.safetensors")
    testing.save(part(sd1, "cond_stage_model.transformer."), models / "text_encoders" / "clip_l.safetensors")
    testing.save(part(sd1, "first_stage_model."), models / "vae" / "vae.safetensors")
    # SDXL from lone towers (realistic layer counts tell them apart) and the checkpoint they make
    clip_l, big_g = testing.tiny_text_encoder("l", seed=31), testing.tiny_text_encoder("g", seed=32)
    sdxl = testing.split_checkpoint("sdxl", {"l": clip_l, "g": big_g})
    testing.save(sdxl, models / "checkpoints" / "sdxl.safetensors")
    testing.save(part(sdxl, "model.diffusion_model."), models / "unet" / "sdxl_unet.safetensors")
    testing.save(clip_l, models / "clip" / "xl_clip_l.safetensors")
    testing.save(testing.tiny_text_encoder("g", seed=32, openclip=False), models / "clip" / "xl_big_g.safetensors")
    testing.save(testing.tiny_text_encoder("h"), models / "text_encoders" / "vit_h.safetensors")
    for name in ("input", "output", "temp"):
        (base / name).mkdir()
    saved = run_context.default()._folders
    folders_mod.configure(base)
    yield base
    run_context.default()._folders = saved


def txt2img(model, clip, extra=None):
    wf = {
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": clip}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": model, "seed": 5, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                                                   "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "t"}},
    }
    wf.update(extra or {})
    result = Executor(default_registry()).run(wf)
    assert result.ok, result.error
    return result.output("6")["samples"]


def test_schemas_and_choices(base):
    info = default_registry().object_info()
    assert list(info["UNETLoader"]["input"]["required"]) == ["unet_name", "weight_dtype"]
    assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == [
        "sd1_diffusers.safetensors", "sd1_prefixed.safetensors", "sd1_unet.safetensors", "sdxl_unet.safetensors"]
    clip = info["CLIPLoader"]["input"]
    assert list(clip["required"]) == ["clip_name", "type"] and list(clip["optional"]) == ["device"]
    assert clip["required"]["type"][0][0] == "stable_diffusion"
    assert "xl_big_g.safetensors" in clip["required"]["clip_name"][0] and "clip_l.safetensors" in clip["required"][
        "clip_name"][0]
    dual = info["DualCLIPLoader"]["input"]
    assert list(dual["required"]) == ["clip_name1", "clip_name2", "type"] and dual["required"]["type"][0][0] == "sdxl"


def test_split_sd1_gives_the_checkpoints_picture(base):
    single = txt2img(["1", 0], ["1", 1], {"1": {"class_type": "CheckpointLoaderSimple",
                                                 "inputs": {"ckpt_name": "sd1.safetensors"}}})
    for unet in ("sd1_unet.safetensors", "sd1_prefixed.safetensors", "sd1_diffusers.safetensors"):
        split = txt2img(["u", 0], ["c", 0], {
            "u": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
            "c": {"class_type": "CLIPLoader",
                  "inputs": {"clip_name": "clip_l.safetensors", "type": "stable_diffusion"}}})
        assert torch.equal(split, single), unet


@pytest.mark.parametrize("order", [("xl_clip_l.safetensors", "xl_big_g.safetensors"),
                                   ("xl_big_g.safetensors", "xl_clip_l.safetensors")])
def test_split_sdxl_gives_the_checkpoints_picture(base, order):
    single = txt2img(["1", 0], ["1", 1], {"1": {"class_type": "CheckpointLoaderSimple",
                                                 "inputs": {"ckpt_name": "sdxl.safetensors"}}})
    split = txt2img(["u", 0], ["c", 0], {
        "u": {"class_type": "UNETLoader", "inputs": {"unet_name": "sdxl_unet.safetensors", "weight_dtype": "default"}},
        "c": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": order[0], "clip_name2": order[1],
                                                         "type": "sdxl", "device": "cpu"}}})
    assert torch.allclose(split, single, atol=1e-5)


def test_each_tower_alone(base):
    from nodes.loaders import LoadTextEncoder

    assert LoadTextEncoder().run("vit_h.safetensors", "stable_diffusion")[0].family == "sd2"
    assert LoadTextEncoder().run("clip_l.safetensors", "stable_diffusion")[0].family == "sd1"
    assert LoadTextEncoder().run("xl_big_g.safetensors", "stable_diffusion")[0].family == "sdxl_refiner"


def test_bad_input_is_named(base):
    from nodes.loaders import LoadDiffusionModel, LoadDualTextEncoder, LoadTextEncoder

    with pytest.raises(ValueError, match="CLIPLoader: type 'sd3' is for a model family nodeflow does not run yet; "
                                         "expected 'stable_diffusion'"):
        LoadTextEncoder().run("clip_l.safetensors", "sd3")
    # The newer choices of ComfyUI's lists are offered (the widget contract) and refused by name.
    with pytest.raises(ValueError, match="CLIPLoader: type 'minimax' .* expected 'stable_diffusion'"):
        LoadTextEncoder().run("clip_l.safetensors", "minimax")
    with pytest.raises(ValueError, match="DualCLIPLoader: type 'kandinsky5' .* expected 'sdxl'"):
        LoadDualTextEncoder().run("clip_l.safetensors", "xl_big_g.safetensors", "kandinsky5")
    with pytest.raises(ValueError, match="both CLIP-L text encoders"):
        LoadDualTextEncoder().run("clip_l.safetensors", "xl_clip_l.safetensors", "sdxl")
    with pytest.raises(ValueError, match=r"do not make a Stable Diffusion text encoder: CLIP-L .* OpenCLIP ViT-H"):
        LoadDualTextEncoder().run("clip_l.safetensors", "vit_h.safetensors", "sdxl")
    with pytest.raises(CheckpointError, match="clip_l.safetensors: not a diffusion model"):
        from nodeflow.models.components import load_diffusion_model

        load_diffusion_model(base / "models" / "text_encoders" / "clip_l.safetensors")
    with pytest.raises(FileNotFoundError, match="'missing.safetensors' not found in .*diffusion_models.*unet"):
        LoadDiffusionModel().run("missing.safetensors", "default")


def test_fp8_weight_types_round_the_weights(base):
    from nodes.loaders import LoadDiffusionModel

    (fp8,) = LoadDiffusionModel().run("sd1_unet.safetensors", "fp8_e4m3fn")
    (full,) = LoadDiffusionModel().run("sd1_unet.safetensors", "default")
    w, w8 = full.unet.input_blocks[1][0].in_layers[2].weight, fp8.unet.input_blocks[1][0].in_layers[2].weight
    assert torch.equal(w8, w.to(torch.float8_e4m3fn).to(w.dtype)) and not torch.equal(w8, w)
