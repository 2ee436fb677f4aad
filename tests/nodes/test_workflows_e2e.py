"""Every example workflow, end to end on tiny checkpoints in the real layouts: the right
number and size of images, finite values, files saved with metadata that round-trips
(running the saved PNG again gives the same pixels), and ComfyUI's default graph as written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nodeflow
import nodeflow.folders as folders_mod
from nodeflow import Executor, default_registry
from nodeflow import context as run_context
from nodeflow.models import testing
from nodeflow.models.testing import save, write_tiny_sd1, write_tiny_sdxl

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    ckpts = base / "models" / "checkpoints"
    write_tiny_sd1(ckpts / "tiny_sd1.safetensors")
    write_tiny_sd1(ckpts / "tiny_inpaint.safetensors", inpaint=True)
    write_tiny_sdxl(ckpts / "tiny_sdxl.safetensors")
    # A kohya-layout LoRA on one attention projection of the tiny SD1 UNet (diffusers naming).
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(0)
    save({f"{name}.lora_down.weight": torch.randn(2, 32, generator=g),
          f"{name}.lora_up.weight": torch.randn(32, 2, generator=g),
          f"{name}.alpha": torch.tensor(2.0)}, base / "models" / "loras" / "example_lora.safetensors")
    from nodeflow.models.esrgan import RRDBConfig, RRDBNet
    torch.manual_seed(0)
    (base / "models" / "upscale_models").mkdir(parents=True)
    torch.save({"params_ema": RRDBNet(RRDBConfig(nf=8, nb=1, gc=4)).state_dict()},
               base / "models" / "upscale_models" / "tiny_x4.pth")
    # ControlNets, GLIGEN and the bigG image encoder the examples name, tiny, under their real names
    testing.write_tiny_controlnet(base / "models" / "controlnet" / "control_v11p_sd15_canny_fp16.safetensors")
    testing.write_tiny_controlnet(base / "models" / "controlnet" / "control_v11e_sd15_shuffle_fp16.safetensors",
                                  layout="diffusers", seed=13)
    save(testing.tiny_gligen_state_dict(), base / "models" / "gligen" / "gligen_sd14_textbox_pruned.safetensors")
    save(testing.tiny_clip_vision("g", projection=128), base / "models" / "clip_vision" / "clip_vision_g.safetensors")
    (base / "input").mkdir()
    rgba = (np.random.default_rng(0).random((48, 64, 4)) * 255).astype(np.uint8)
    rgba[..., 3] = 255
    rgba[12:36, 20:44, 3] = 0  # the transparent hole is the area to repaint
    Image.fromarray(rgba[..., :3]).save(base / "input" / "example.png")
    Image.fromarray(rgba).save(base / "input" / "example_masked.png")
    saved = run_context.default()._folders
    folders_mod.configure(base)
    yield base
    run_context.default()._folders = saved


def load(name: str, **overrides) -> dict:
    wf = json.loads((WORKFLOWS / name).read_text())
    for key, value in overrides.items():
        node, inp = key.split("__")
        wf[node]["inputs"][inp] = value
    return wf


SMALL = {"5__width": 64, "5__height": 64, "3__steps": 2}
CASES = {
    # workflow: (overrides, expected (W, H) of the saved image)
    "txt2img.json": ({"4__ckpt_name": "tiny_sd1.safetensors", **SMALL}, (64, 64)),
    "txt2img_demo.json": ({"4__ckpt_name": "tiny_sd1.safetensors", "5__batch_size": 1, "3__seed": 42,
                           "3__steps": 2}, (64, 64)),
    "img2img.json": ({"4__ckpt_name": "tiny_sd1.safetensors", "3__steps": 2}, (64, 48)),
    "inpaint.json": ({"4__ckpt_name": "tiny_inpaint.safetensors", "3__steps": 2}, (64, 48)),
    "outpaint.json": ({"4__ckpt_name": "tiny_inpaint.safetensors", "3__steps": 2, "12__right": 32,
                       "12__bottom": 16}, (96, 64)),
    "hires_fix.json": ({"4__ckpt_name": "tiny_sd1.safetensors", **SMALL, "10__width": 96, "10__height": 96,
                        "11__steps": 2}, (96, 96)),
    "lora.json": ({"4__ckpt_name": "tiny_sd1.safetensors", **SMALL}, (64, 64)),
    "sdxl_txt2img.json": ({"4__ckpt_name": "tiny_sdxl.safetensors", **SMALL}, (64, 64)),
    # 64x48 scaled by 1.5 in pixels (lanczos): 96x72, a multiple of 8 both ways.
    "upscale.json": ({"4__ckpt_name": "tiny_sd1.safetensors", "3__steps": 2}, (96, 72)),
    "upscale_esrgan.json": ({"4__ckpt_name": "tiny_sd1.safetensors", **SMALL, "11__model_name": "tiny_x4.pth"},
                            (256, 256)),
    "controlnet_canny.json": ({"4__ckpt_name": "tiny_sd1.safetensors", **SMALL}, (64, 64)),
    "controlnet_mixed.json": ({"4__ckpt_name": "tiny_sd1.safetensors", **SMALL}, (64, 64)),
    "gligen_boxes.json": ({"4__ckpt_name": "tiny_sd1.safetensors", **SMALL, "11__width": 32, "11__height": 32,
                           "11__x": 0, "11__y": 0, "12__width": 16, "12__height": 16, "12__x": 40,
                           "12__y": 40}, (64, 64)),
    "sdxl_revision.json": ({"4__ckpt_name": "tiny_sdxl.safetensors", **SMALL}, (64, 64)),
}


def test_every_example_workflow_is_covered():
    assert {p.name for p in WORKFLOWS.glob("*.json")} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_workflow_end_to_end(base, name):
    overrides, size = CASES[name]
    result = Executor(default_registry()).run(load(name, **overrides))
    assert result.ok, result.error
    (entry,) = result.ui["9"]["images"]
    assert entry["type"] == "output" and entry["filename"].endswith("_.png")
    path = base / "output" / entry["subfolder"] / entry["filename"]
    image = result.output("8")
    assert image.shape == (1, size[1], size[0], 3) and torch.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0
    with Image.open(path) as saved:
        assert saved.size == size
        embedded = json.loads(saved.text["prompt"])
        pixels = np.asarray(saved)
    assert embedded["3"]["inputs"]["seed"] == 42
    # The PNG runs again (a fresh executor, nothing cached) and gives the same picture.
    again = Executor(default_registry()).run(nodeflow.load_workflow(path))
    assert again.ok and len(again.executed) == len(result.executed)
    (entry2,) = again.ui["9"]["images"]
    assert entry2["filename"] != entry["filename"]  # a new file, never an overwrite
    with Image.open(base / "output" / entry2["subfolder"] / entry2["filename"]) as second:
        assert np.array_equal(np.asarray(second), pixels)


def test_lora_changes_the_picture(base):
    overrides = CASES["lora.json"][0]
    with_lora = Executor(default_registry()).run(load("lora.json", **overrides)).output("8")
    without = Executor(default_registry()).run(load("lora.json", **overrides, **{"10__strength_model": 0.0,
                                                                             "10__strength_clip": 0.0})).output("8")
    assert not torch.allclose(with_lora, without, atol=1e-3)


COMFY_DEFAULT_API = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler",
          "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
          "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "beautiful scenery nature glass bottle landscape, , "
                                                            "purple galaxy bottle,", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def comfy_default_ui(ckpt: str) -> dict:
    """ComfyUI's default graph as its editor saves it (UI format), with our checkpoint name."""
    def node(id_, type_, inputs, outputs, widgets, order):
        return {"id": id_, "type": type_, "pos": [0, 0], "size": [300, 100], "flags": {}, "order": order, "mode": 0,
                "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": type_},
                "widgets_values": widgets}
    return {
        "last_node_id": 9, "last_link_id": 9, "version": 0.4, "groups": [], "config": {}, "extra": {},
        "nodes": [
            node(7, "CLIPTextEncode", [{"name": "clip", "type": "CLIP", "link": 5}],
                 [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [6], "slot_index": 0}],
                 ["text, watermark"], 3),
            node(6, "CLIPTextEncode", [{"name": "clip", "type": "CLIP", "link": 3}],
                 [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4], "slot_index": 0}],
                 ["beautiful scenery nature glass bottle landscape, , purple galaxy bottle,"], 2),
            node(5, "EmptyLatentImage", [], [{"name": "LATENT", "type": "LATENT", "links": [2], "slot_index": 0}],
                 [512, 512, 1], 1),
            node(3, "KSampler", [{"name": "model", "type": "MODEL", "link": 1},
                                 {"name": "positive", "type": "CONDITIONING", "link": 4},
                                 {"name": "negative", "type": "CONDITIONING", "link": 6},
                                 {"name": "latent_image", "type": "LATENT", "link": 2}],
                 [{"name": "LATENT", "type": "LATENT", "links": [7], "slot_index": 0}],
                 [156680208700286, "randomize", 20, 8, "euler", "normal", 1], 4),
            node(8, "VAEDecode",
                 [{"name": "samples", "type": "LATENT", "link": 7}, {"name": "vae", "type": "VAE", "link": 8}],
                 [{"name": "IMAGE", "type": "IMAGE", "links": [9], "slot_index": 0}], [], 5),
            node(9, "SaveImage", [{"name": "images", "type": "IMAGE", "link": 9}], [], ["ComfyUI"], 6),
            node(4, "CheckpointLoaderSimple", [],
                 [{"name": "MODEL", "type": "MODEL", "links": [1], "slot_index": 0},
                  {"name": "CLIP", "type": "CLIP", "links": [3, 5], "slot_index": 1},
                  {"name": "VAE", "type": "VAE", "links": [8], "slot_index": 2}], [ckpt], 0),
        ],
        "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
                  [4, 6, 0, 3, 1, "CONDITIONING"],
                  [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"], [7, 3, 0, 8, 0, "LATENT"],
                  [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]],
    }


def test_comfyui_default_graph_runs_unchanged_in_api_and_ui_format(base):
    api = json.loads(json.dumps(COMFY_DEFAULT_API))
    api["4"]["inputs"]["ckpt_name"] = "tiny_sd1.safetensors"
    executor = Executor(default_registry())
    from_api = executor.run(api)
    assert from_api.ok, from_api.error
    assert from_api.output("8").shape == (1, 512, 512, 3)
    ui_path = base / "default_ui.json"
    ui_path.write_text(json.dumps(comfy_default_ui("tiny_sd1.safetensors")))
    converted = nodeflow.load_workflow(ui_path)
    assert converted.keys() == api.keys()
    assert {k: v["inputs"] for k, v in converted.items()} == {k: v["inputs"] for k, v in api.items()}
    # The cache keys on content, never on ids or format: the converted graph is the same
    # computation, so an executor that ran the API graph has nothing left to run.
    from_ui = executor.run(converted)
    assert from_ui.ok and from_ui.executed == [] and from_ui.cached == ["9"]
    assert from_ui.ui == from_api.ui


def test_missing_checkpoint_lists_what_exists(base):
    wf = load("txt2img.json", **{"4__ckpt_name": "nope.safetensors"})
    report = nodeflow.validate(nodeflow.parse(wf), default_registry())
    (err,) = [e for e in report.errors if e.node_id == "4"]
    assert err.type == "value_not_in_list" and "tiny_sd1.safetensors" in err.expected
    assert not report.ok


def test_tiled_vae_decode_node_tiles_in_pixels(base):
    from nodeflow.models import load_checkpoint

    vae = load_checkpoint(base / "models" / "checkpoints" / "tiny_sd1.safetensors").vae
    latent = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(3)) * 0.3
    node = default_registry().get("VAEDecodeTiled")()
    full = default_registry().get("VAEDecode")().run({"samples": latent}, vae)[0]
    # tile_size is in pixels (ComfyUI's widget): 128 px = 16 latent cells, so 2×2 blended tiles;
    # their accuracy against a full decode is tests/models/test_vae.py's concern.
    tiled = node.run({"samples": latent}, vae, tile_size=128, overlap=32)[0]
    assert tiled.shape == full.shape == (1, 192, 192, 3)
    assert torch.equal(tiled, vae.decode(latent, tile_size=16)) and not torch.equal(tiled, full)
    one_tile = node.run({"samples": latent}, vae, tile_size=192, overlap=32)[0]
    assert torch.allclose(one_tile, full, atol=1e-5)


def test_cli_run_of_ui_format_file_embeds_the_editor_workflow(base, capsys):
    from nodeflow import cli

    ui = comfy_default_ui("tiny_sd1.safetensors")
    for node in ui["nodes"]:
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"] = [64, 64, 1]
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 2  # steps
    path = base / "small_ui.json"
    path.write_text(json.dumps(ui))
    assert cli.main(["run", str(path), "--base-dir", str(base), "--quiet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (entry,) = out["outputs"]["9"]["images"]
    with Image.open(base / "output" / entry["subfolder"] / entry["filename"]) as saved:
        assert json.loads(saved.text["workflow"])["nodes"][0]["type"] == "CLIPTextEncode"
        assert json.loads(saved.text["prompt"])["3"]["class_type"] == "KSampler"


def test_upscale_workflow_redraws_at_low_denoise(base):
    wf = load("upscale.json", **{"4__ckpt_name": "tiny_sd1.safetensors", "3__steps": 2})
    assert wf["12"]["class_type"] == "ScaleImageBy" and wf["12"]["inputs"]["upscale_method"] in ("lanczos", "bicubic")
    assert 0.3 <= wf["3"]["inputs"]["denoise"] <= 0.5
    assert nodeflow.validate(nodeflow.parse(wf), default_registry()).ok


def test_inpaint_model_conditioning_feeds_an_inpainting_model(base):
    """InpaintModelConditioning's concat latent and mask reach the 9-channel UNet through the
    conditionings, and its noise mask keeps the latent outside the hole."""
    wf = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_inpaint.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cabin", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "example_masked.png"}},
        "11": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2], "pixels": ["10", 0], "mask": ["10", 1],
            "noise_mask": True}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["11", 0], "negative": ["11", 1], "latent_image": ["11", 2], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    result = Executor(default_registry()).run(wf)
    assert result.ok, result.error
    before, after = result.output("11", 2)["samples"], result.output("3")["samples"]
    assert after.shape == before.shape == (1, 4, 6, 8)
    # The hole is rows 12..35, columns 20..43 of the 48x64 picture: latent cells outside it stay.
    assert torch.equal(after[..., 0, :], before[..., 0, :]) and torch.equal(after[..., :, 0], before[..., :, 0])
    assert not torch.allclose(after[..., 2:4, 3:5], before[..., 2:4, 3:5])

