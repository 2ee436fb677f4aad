"""The upscale-model nodes in workflows: ComfyUI's names and inputs, the models folder, progress,
interruption and caching. (The architectures' numbers: tests/models/test_esrgan.py.)"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import nodeflow
from nodeflow import Executor, default_registry
from nodeflow.models import esrgan

torch.set_num_threads(min(2, torch.get_num_threads()))


def write_model(path, seed=0, **config):
    """A tiny random RRDBNet saved as Real-ESRGAN does ({"params_ema": state dict})."""
    torch.manual_seed(seed)
    model = esrgan.RRDBNet(esrgan.RRDBConfig(**{"nf": 8, "nb": 1, "gc": 4, **config}))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": model.state_dict()}, path)
    return path


@pytest.fixture
def models(base):
    folder = base.base / "models" / "upscale_models"
    write_model(folder / "x4.pth")
    write_model(folder / "sub" / "x2.pth", unshuffle=2)
    rgb = (np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(base.input / "small.png")
    return folder


def workflow(model_name="x4.pth", image="small.png"):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model_name}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}},
    }


def test_comfyui_names_inputs_and_outputs():
    reg = default_registry()
    loader, upscale = reg.get("UpscaleModelLoader"), reg.get("ImageUpscaleWithModel")
    assert loader is reg.get("LoadUpscaleModel") and upscale is reg.get("UpscaleImageWithModel")
    assert list(loader.inputs) == ["model_name"] and [o.kind for o in loader.outputs] == ["UPSCALE_MODEL"]
    assert list(upscale.inputs) == ["upscale_model", "image"] and [o.kind for o in upscale.outputs] == ["IMAGE"]
    assert upscale.inputs["upscale_model"].kind == "UPSCALE_MODEL"


def test_workflow_upscales_by_the_models_factor(base, models):
    events = []
    result = Executor(default_registry()).run(workflow(), observer=lambda e, d: events.append((e, d)))
    assert result.ok, result.error
    out = result.output("3")
    assert out.shape == (1, 80, 112, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.min() >= 0 and out.max() <= 1
    (entry,) = result.ui["4"]["images"]
    with Image.open(base.output / entry["filename"]) as im:
        assert im.size == (112, 80)
    # The node is the handle's tiled upscale of the loaded image.
    handle, pixels = result.output("2"), result.output("1")
    assert isinstance(handle, esrgan.UpscaleModel) and handle.scale == 4
    assert torch.equal(out, handle.upscale(pixels))
    progress = [d for e, d in events if e == "progress"]
    assert [(d["value"], d["max"], d["node"]) for d in progress] == [(1, 1, "3")]


def test_models_in_subfolders_and_other_scales(base, models):
    result = nodeflow.run(workflow("sub/x2.pth"), executor=Executor(default_registry()))
    assert result.ok and result.output("3").shape == (1, 40, 56, 3)


def test_unknown_model_name_lists_the_files(base, models):
    report = nodeflow.validate(nodeflow.parse(workflow("nope.pth")), default_registry())
    (err,) = [e for e in report.errors if e.node_id == "2"]
    assert err.type == "value_not_in_list" and "x4.pth" in err.expected and "sub/x2.pth" in err.expected


def test_a_file_that_is_no_upscale_model_fails_the_node_with_its_name(base, models):
    torch.save({"weight": torch.zeros(3)}, models / "odd.pth")
    result = Executor(default_registry()).run(workflow("odd.pth"))
    assert result.status == "error" and result.error["node_id"] == "2"
    assert "odd.pth" in result.error["exception_message"]
    assert "conv_first.weight" in result.error["exception_message"]


def test_cached_until_the_file_changes(base, models):
    executor = Executor(default_registry())
    assert executor.run(workflow()).ok
    again = executor.run(workflow())
    assert again.executed == [] and again.cached == ["4"]
    first = again.output("3")
    write_model(models / "x4.pth", seed=1)
    st = os.stat(models / "x4.pth")
    os.utime(models / "x4.pth", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = executor.run(workflow())
    assert set(changed.executed) == {"2", "3", "4"}
    assert not torch.equal(changed.output("3"), first)


def test_interrupt_stops_between_tiles(base, models):
    executor = Executor(default_registry())

    def observer(event, data):
        if event == "progress":
            seen.append(data["value"])
            executor.interrupt()

    seen = []
    frames = [Image.fromarray((np.random.default_rng(i).random((20, 28, 3)) * 255).astype(np.uint8))
              for i in range(3)]
    frames[0].save(base.input / "anim.gif", save_all=True, append_images=frames[1:])   # a batch of 3
    result = executor.run(workflow(image="anim.gif"), observer=observer)
    assert result.status == "interrupted" and seen == [1]
    seen.clear()
    result = executor.run(workflow(image="anim.gif"))
    assert result.ok and result.output("3").shape == (3, 80, 112, 3)
