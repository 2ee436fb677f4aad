"""unCLIP (SD 2.1 unCLIP checkpoints, SDXL revision) and GLIGEN in workflows on tiny models."""

from __future__ import annotations

import pytest
import torch

import nodeflow.folders as folders_mod
from nodeflow import Executor, default_registry
from nodeflow import context as run_context
from nodeflow.models import testing


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("unclip")
    models = base / "models"
    testing.write_tiny_sd1(models / "checkpoints" / "sd1.safetensors")
    testing.write_tiny_sdxl(models / "checkpoints" / "sdxl.safetensors")
    testing.write_tiny_unclip(models / "checkpoints" / "unclip.safetensors")
    testing.save(testing.tiny_clip_vision("g", projection=128), models / "clip_vision" / "clip_vision_g.safetensors")
    gligen = testing.tiny_gligen_state_dict()
    testing.save(gligen, models / "gligen" / "gligen_tiny.safetensors")
    closed = {k: torch.zeros(()) if k.endswith(("alpha_attn", "alpha_dense")) else v for k, v in gligen.items()}
    testing.save(closed, models / "gligen" / "gligen_closed.safetensors")
    for name in ("input", "output", "temp"):
        (base / name).mkdir()
    from PIL import Image

    Image.new("RGB", (96, 64), (200, 30, 30)).save(base / "input" / "ref.png")
    saved = run_context.default()._folders
    folders_mod.configure(base)
    yield base
    run_context.default()._folders = saved


def sample(nodes: dict, model=("1", 0), positive=("2", 0), negative=("3", 0)) -> torch.Tensor:
    wf = {
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": list(model), "seed": 9, "steps": 3, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": list(positive), "negative": list(negative),
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "t"}},
        **nodes,
    }
    result = Executor(default_registry()).run(wf)
    assert result.ok, result.error
    return result.output("6")["samples"]


def prompts(ckpt):
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "i": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}}}


def test_sd21_unclip(base):
    nodes = {**prompts("unclip.safetensors"),
             "1": {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "unclip.safetensors"}},
             "e": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["1", 3], "image": ["i", 0],
                                                                "crop": "center"}},
             "u": {"class_type": "unCLIPConditioning",
                   "inputs": {"conditioning": ["2", 0], "clip_vision_output": ["e", 0], "strength": 1.0,
                              "noise_augmentation": 0.1}}}
    plain = sample(nodes)
    guided = sample(nodes, positive=("u", 0))
    assert not torch.allclose(guided, plain, atol=1e-3)
    off = {**nodes, "u": {**nodes["u"], "inputs": {**nodes["u"]["inputs"], "strength": 0.0}}}
    assert torch.equal(sample(off, positive=("u", 0)), plain)


def test_sdxl_revision_replaces_the_pooled_text(base):
    from nodeflow.models import load_checkpoint
    from nodeflow.models.clip_vision import load_clip_vision

    nodes = {**prompts("sdxl.safetensors"),
             "v": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_g.safetensors"}},
             "e": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["v", 0], "image": ["i", 0],
                                                                "crop": "none"}},
             "z": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
             "u": {"class_type": "unCLIPConditioning",
                   "inputs": {"conditioning": ["z", 0], "clip_vision_output": ["e", 0], "strength": 1.0,
                              "noise_augmentation": 0.0}}}
    assert not torch.allclose(sample(nodes, positive=("u", 0)), sample(nodes, positive=("z", 0)), atol=1e-3)
    # the y vector's pooled part is the (barely noised, at level 0) image embedding
    model = load_checkpoint(base / "models" / "checkpoints" / "sdxl.safetensors", device="cpu").model
    embeds = load_clip_vision(base / "models" / "clip_vision" / "clip_vision_g.safetensors", device="cpu").encode(
        torch.rand(1, 64, 64, 3))
    item = {"clip_vision_output": embeds, "strength": 1.0, "noise_augmentation": 0.0}
    y = model.condition_kwargs({"pooled_output": torch.zeros(1, 128), "unclip_conditioning": [item], "seed": 20},
                               1, 64, 64)["y"]
    assert torch.allclose(y[:, :128], embeds.image_embeds, atol=0.02) and y[:, :128].abs().sum() > 0


def test_gligen_boxes(base):
    def gligen(name):
        return {**prompts("sd1.safetensors"),
                "g": {"class_type": "GLIGENLoader", "inputs": {"gligen_name": name}},
                "b1": {"class_type": "GLIGENTextBoxApply", "inputs": {
                    "conditioning_to": ["2", 0], "clip": ["1", 1], "gligen_textbox_model": ["g", 0],
                    "text": "a red circle", "width": 32, "height": 32, "x": 0, "y": 0}},
                "b2": {"class_type": "GLIGENTextBoxApply", "inputs": {
                    "conditioning_to": ["b1", 0], "clip": ["1", 1], "gligen_textbox_model": ["g", 0],
                    "text": "a blue square", "width": 32, "height": 32, "x": 32, "y": 32}}}

    plain = sample(gligen("gligen_tiny.safetensors"))
    boxed = sample(gligen("gligen_tiny.safetensors"), positive=("b2", 0))
    assert not torch.allclose(boxed, plain, atol=1e-3)
    closed = sample(gligen("gligen_closed.safetensors"), positive=("b2", 0))     # tanh(0) gates: no effect
    assert torch.allclose(closed, plain, rtol=1e-4, atol=1e-3)      # (run unbatched: rounding only)


def test_gligen_reaches_the_negative_and_runs_alone(base):
    from nodeflow.models import load_checkpoint
    from nodeflow.models.gligen import load_gligen
    from nodeflow.sampling import CFGDenoiser, DiscreteSchedule

    model = load_checkpoint(base / "models" / "checkpoints" / "sd1.safetensors", device="cpu").model
    gligen = load_gligen(base / "models" / "gligen" / "gligen_tiny.safetensors", device="cpu")
    boxes = ("position", gligen, [(torch.randn(1, 32), 2, 2, 0, 0)])
    positive = [[torch.randn(1, 77, 32), {"gligen": boxes}]]
    negative = [[torch.randn(1, 77, 32), {}]]
    den = CFGDenoiser(model, DiscreteSchedule.scaled_linear(), positive, negative, 3.0, (1, 4, 8, 8), "cpu")
    assert all(e.meta.get("gligen") is boxes for e in den.entries)       # ComfyUI's apply_empty_x_to_equal_area
    den(torch.randn(1, 4, 8, 8), torch.tensor([5.0]))
    assert den.model_calls == 2                                             # entries with boxes never batch
