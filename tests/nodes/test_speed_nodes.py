"""The speed nodes in workflows: TorchCompileModel (CompileModel) and CompileVAE give the eager
picture and compile once for many prompts; DeepCache at interval 1 is the plain model, at 3 a
different (cheaper) picture; errors name the input."""

from __future__ import annotations

import functools

import pytest
import torch

from nodeflow import Executor, default_registry
from nodeflow.models import compiled
from nodeflow.models.testing import write_tiny_sd1


@pytest.fixture
def ckpt(base):
    write_tiny_sd1(base.base / "models" / "checkpoints" / "tiny.safetensors")
    return "tiny.safetensors"


def workflow(ckpt: str, *, text="a red circle", seed=3, model_node=None, vae_node=None) -> dict:
    """ComfyUI's default graph at 64², 3 steps, with optional nodes between the loader and its users."""
    wf = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": 3, "cfg": 6.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    if model_node is not None:
        wf["10"] = {"class_type": model_node[0], "inputs": {"model": ["4", 0], **model_node[1]}}
        wf["3"]["inputs"]["model"] = ["10", 0]
    if vae_node is not None:
        wf["11"] = {"class_type": vae_node, "inputs": {"vae": ["4", 2]}}
        wf["8"]["inputs"]["vae"] = ["11", 0]
    return wf


def image(result) -> torch.Tensor:
    assert result.ok, result.error
    return result.output("8")


def test_torch_compile_model_gives_the_eager_picture_and_compiles_once(ckpt, monkeypatch):
    # inductor compiles for minutes on a small CPU: here aot_eager (the graph inductor would get) stands in
    monkeypatch.setattr(compiled, "CompileOptions", functools.partial(compiled.CompileOptions, backend="aot_eager"))
    monkeypatch.setattr(compiled, "check_compile", lambda *a, **k: None)
    executor = Executor(default_registry())
    eager = image(executor.run(workflow(ckpt)))
    fast_wf = workflow(ckpt, model_node=("TorchCompileModel", {"backend": "inductor"}), vae_node="CompileVAE")
    fast = image(executor.run(fast_wf))
    assert torch.allclose(fast, eager, atol=1e-4)
    cache = compiled.compile_cache()
    regions = cache.compiled
    again = image(executor.run(workflow(ckpt, text="a blue triangle", seed=11,
                                        model_node=("TorchCompileModel", {"backend": "inductor"}),
                                        vae_node="CompileVAE")))
    assert cache.compiled == regions                       # a new prompt and seed: nothing compiled again
    assert not torch.allclose(again, fast, atol=1e-3)


def test_the_cudagraphs_backend_needs_cuda(ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = Executor(default_registry()).run(workflow(ckpt, model_node=("TorchCompileModel",
                                                                         {"backend": "cudagraphs"})))
    assert not result.ok
    assert "backend 'cudagraphs' needs a CUDA device" in result.error["exception_message"]


def test_deepcache_node(ckpt):
    executor = Executor(default_registry())
    plain = image(executor.run(workflow(ckpt)))
    settings = {"cache_interval": 1, "cache_depth": 3, "start_step": 0, "end_step": 1000}
    every_step = image(executor.run(workflow(ckpt, model_node=("DeepCache", settings))))
    assert torch.equal(every_step, plain)                  # interval 1: every step in full, the same picture
    cached = image(executor.run(workflow(ckpt, model_node=("DeepCache", {**settings, "cache_interval": 3}))))
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
