"""The compiled model path (``nodeflow.models.compiled``): the same numbers as the eager model,
one compilation per input shape and never another for a new prompt, seed, cfg, step count or
LoRA, patches compiled or run eagerly as they declare, and DeepCache under compile.

Compilations are counted with a backend that counts the graphs Dynamo hands it and runs them
as traced; numerical checks use ``aot_eager`` (the traced, functionalised and decomposed
graph that inductor would compile, run by aten). Inductor itself compiles for minutes on a
small CPU, so its check runs only with NODEFLOW_TEST_INDUCTOR=1.

Tolerance: fp32, channels-last convolutions sum in another order than contiguous ones, so
outputs agree to 1e-5 of their scale (measured: ~3e-6 after 4 sampling steps); the same
layout gives the same bits.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from nodeflow import context as run_context
from nodeflow.models import compiled, load_checkpoint
from nodeflow.models.diffusion import DiffusionModel
from nodeflow.models.lora import apply_lora, parse_lora
from nodeflow.models.step_cache import DeepCache
from nodeflow.models.testing import micro_unet
from nodeflow.sampling import ksampler

RTOL = 1e-5          # of the output's scale, fp32 (see the module docstring)


class Counting:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return (a - b).abs().max().item() <= rtol * max(1.0, b.abs().max().item())


@pytest.fixture(scope="module")
def ckpt(sd1_path):
    """A checkpoint of this module's own: compiling puts its weights in channels-last format."""
    return load_checkpoint(sd1_path, device="cpu")


def micro_model() -> DiffusionModel:
    return DiffusionModel(micro_unet(), family="sd1", device=torch.device("cpu"))


def random_conditioning(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 32, generator=g), {}]]


def sample(model, *, seed=1, cfg=5.0, steps=3, sampler="euler"):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return ksampler(model, latent, random_conditioning(seed), random_conditioning(seed + 100), seed=seed,
                    steps=steps, cfg=cfg, sampler_name=sampler, scheduler="normal")["samples"]


def conditioning(ckpt, text: str):
    c, pooled = ckpt.clip.encode(text)
    return [[c, {"pooled_output": pooled}]]


def txt2img(ckpt, model, *, text="a red circle", seed=1, cfg=5.0, steps=3, sampler="euler", size=8):
    latent = {"samples": torch.zeros(1, 4, size, size)}
    samples = ksampler(model, latent, conditioning(ckpt, text), conditioning(ckpt, ""), seed=seed, steps=steps,
                       cfg=cfg, sampler_name=sampler, scheduler="normal")["samples"]
    return samples


def test_unet_and_vae_decode_match_eager(ckpt):
    """aot_eager: the graph inductor would compile (functionalised, decomposed), in channels-last."""
    unet = micro_unet(adm=64)                             # with a label embedding: SDXL's y is an input too
    options = compiled.CompileOptions(backend="aot_eager", channels_last=True)     # as on CUDA
    runner = compiled.CompiledUNet(unet, options, compiled.CompileCache())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300.0, 300.0])
    ctx, y = torch.randn(2, 77, 32, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        eager = unet(x, t, ctx, y)
        assert close(runner(x, t, ctx, y), eager)
        # ControlNet residuals are inputs too (their shapes join the key)
        skips, h, emb = [], x, unet.embed(t, y, x.dtype)
        for block in unet.input_blocks:
            h = block(h, emb, ctx)
            skips.append(torch.randn(h.shape, generator=g))
        control = {"input": skips[::-1], "middle": [torch.randn(h.shape, generator=g)], "output": skips}
        assert close(runner(x, t, ctx, y, control=control), unet(x, t, ctx, y, control=control))
        assert not close(unet(x, t, ctx, y, control=control), eager, rtol=1e-3)
    assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)

    z = torch.randn(1, 4, 8, 8, generator=g)
    eager_image = ckpt.vae.decode(z)
    ckpt.vae.compile_options = options
    try:
        assert close(ckpt.vae.decode(z), eager_image)
    finally:
        ckpt.vae.compile_options = None


def test_txt2img_compiles_once_and_never_again_for_a_new_prompt_seed_cfg_steps_or_lora(ckpt, tmp_path):
    backend = Counting()
    options = compiled.CompileOptions(backend=backend, channels_last=True)
    fast = compiled.compile_model(ckpt.model, options)
    ckpt.vae.compile_options = options
    try:
        eager = txt2img(ckpt, ckpt.model)
        eager_image = ckpt.vae.decode(eager)
        first = txt2img(ckpt, fast)
        image = ckpt.vae.decode(first)
        assert close(first, eager) and close(image, eager_image)
        assert backend.graphs == 2                                    # the UNet's CFG batch and the decoder

        # Another prompt, seed, cfg, step count, sampler and scheduler: new values, the same graphs.
        second = txt2img(ckpt, fast, text="a blue triangle on a pink background", seed=7, cfg=8.5, steps=5,
                         sampler="dpmpp_2m")
        ckpt.vae.decode(second)
        assert backend.graphs == 2
        assert close(second, txt2img(ckpt, ckpt.model, text="a blue triangle on a pink background", seed=7,
                                     cfg=8.5, steps=5, sampler="dpmpp_2m"))

        # A LoRA applied after compiling: weights patched in place, no new graph, the eager result.
        name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        g = torch.Generator().manual_seed(3)
        lora = parse_lora({f"{name}.lora_down.weight": torch.randn(2, 32, generator=g),
                           f"{name}.lora_up.weight": torch.randn(32, 2, generator=g),
                           f"{name}.alpha": torch.tensor(2.0)})
        fast_lora, _ = apply_lora(lora, fast, None, 0.8, 0.0)
        eager_lora, _ = apply_lora(lora, ckpt.model, None, 0.8, 0.0)
        with_lora = txt2img(ckpt, fast_lora)
        assert backend.graphs == 2
        expected = txt2img(ckpt, eager_lora)
        assert close(with_lora, expected)
        assert not close(expected, eager, rtol=1e-3)                  # the LoRA does change the picture
        assert close(txt2img(ckpt, fast), eager)                      # and the handle without it is as before
        assert backend.graphs == 2
    finally:
        ckpt.vae.compile_options = None


def test_cfg_one_is_another_batch_size_compiled_once():
    backend = Counting()
    fast = compiled.compile_model(micro_model(), compiled.CompileOptions(backend=backend))
    sample(fast, cfg=1.0)
    sample(fast, cfg=1.0, seed=2)
    assert backend.graphs == 1


def test_every_shape_is_a_region_of_its_own_beyond_dynamos_recompile_limit():
    unet = micro_unet(levels=1)
    backend = Counting()
    runner = compiled.CompiledUNet(unet, compiled.CompileOptions(backend=backend), compiled.CompileCache())
    sizes = [4, 6, 8]
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():     # 1 graph per function, then eager
        for size in sizes + sizes[:2]:
            x = torch.randn(1, 4, size, size)
            t, ctx = torch.tensor([500.0]), torch.randn(1, 77, 32)
            assert close(runner(x, t, ctx), unet(x, t, ctx))
    assert backend.graphs == len(sizes)                   # each size compiled once, none fell back to eager
    assert runner.owner.compiled == len(sizes)


def test_patches_with_a_compile_key_join_the_graph_others_run_eagerly():
    from nodes.model_patches import FreeU

    model = micro_model()
    backend = Counting()
    fast = compiled.compile_model(model, compiled.CompileOptions(backend=backend))
    sample(fast)
    assert backend.graphs == 1
    freeu, freeu_eager = (FreeU().run(m, 1.1, 1.2, 0.9, 0.2)[0] for m in (fast, model))
    assert close(sample(freeu), sample(freeu_eager))
    assert not close(sample(freeu_eager), sample(model), rtol=1e-3)          # FreeU acts on this UNet
    assert backend.graphs == 2                            # FreeU's compile key: a graph of its own

    calls = []

    def halve(h, info):                                   # a third-party patch, no compile key
        calls.append(h.shape)
        return h * 0.5

    plain, plain_eager = fast.clone(), model.clone()
    for m in (plain, plain_eager):
        m.model_patches.add_block_patch("middle_block", halve)
    assert close(sample(plain), sample(plain_eager))
    assert backend.graphs == 2 and len(calls) == 6        # ran eagerly, every step (3 steps × 2 handles)


def test_deepcache_full_and_reuse_steps_are_two_graphs():
    model = micro_model()
    backend = Counting()
    fast = compiled.compile_model(model, compiled.CompileOptions(backend=backend))
    cached, cached_eager = fast.clone(), model.clone()
    cached.model_patches.step_cache = DeepCache(2, 1)
    cached_eager.model_patches.step_cache = DeepCache(2, 1)
    assert close(sample(cached, steps=4), sample(cached_eager, steps=4))
    assert backend.graphs == 2
    sample(cached, steps=6, seed=9)
    assert backend.graphs == 2


def test_a_backend_that_fails_leaves_that_shape_eager(caplog):
    unet = micro_unet()

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    runner = compiled.CompiledUNet(unet, compiled.CompileOptions(backend=broken), compiled.CompileCache())
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = runner(x, t, ctx)
        again = runner(x, t, ctx)
    assert close(out, unet(x, t, ctx)) and torch.equal(out, again)
    assert "which runs eagerly" in caplog.text and "no compiler here" in caplog.text


def test_the_run_context_turns_the_fast_path_on(ckpt, monkeypatch):
    assert compiled.unet_forward(ckpt.model) is ckpt.model.unet                  # default: the plain module
    ctx = run_context.RunContext(compile="eager", name="fast")
    with run_context.activate(ctx):
        runner = compiled.unet_forward(ckpt.model)
        assert isinstance(runner, compiled.CompiledUNet) and runner.options.backend == "eager"
        assert compiled.vae_decode(ckpt.vae).options.backend == "eager"
        assert compiled.compile_cache() is ctx.peek("compiled_models")          # the worker's own graphs
    assert compiled.compile_cache() is not ctx.peek("compiled_models")
    graphs = run_context.RunContext(cuda_graphs=True)
    with run_context.activate(graphs):
        assert compiled.options_for(ckpt.model) == compiled.CompileOptions(backend=None, cuda_graphs=True)
        node = compiled.compile_model(ckpt.model, compiled.CompileOptions(backend="eager"))
        assert compiled.options_for(node).cuda_graphs                            # the node's, plus the context's


def test_configuring_the_fast_path_names_the_option():
    from nodeflow import configure_devices

    ctx = run_context.RunContext(device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA device"):
            configure_devices(cuda_graphs=True, run_context=ctx)
    with pytest.raises(ValueError, match="--compile: 'turbo' is not a torch.compile backend"):
        configure_devices(compile="turbo", run_context=ctx)
    configure_devices(compile="aot_eager", run_context=ctx)
    assert (ctx.compile, ctx.cuda_graphs) == ("aot_eager", False)


def test_backend_flags_are_set_while_compiled_calls_run_and_restored(monkeypatch):
    from nodeflow.models import devices

    monkeypatch.setattr(devices, "has_tf32", lambda device: True)
    monkeypatch.setattr(compiled, "_tf32_decided", False)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    gpu = torch.device("cuda", 0)
    assert (cudnn.benchmark, matmul.fp32_precision, matmul.allow_tf32) == (False, "none", False)
    try:
        with compiled.backend_flags(gpu, torch.float16):      # half precision: no TF32 question
            assert cudnn.benchmark and not matmul.allow_tf32
            with compiled.backend_flags(gpu, torch.float32):  # another worker's call overlapping
                assert cudnn.benchmark and matmul.allow_tf32
            assert cudnn.benchmark                             # the first still runs: still on
        assert not cudnn.benchmark
        # TF32 stays on for the process (Dynamo guards the flag: flipping it would recompile), and
        # readers of torch's old API (inductor's autotuning) agree with its new one
        assert matmul.allow_tf32 and matmul.fp32_precision == "tf32"
        assert torch.get_float32_matmul_precision() == "high"
        # two workers' calls ending in the other order: the autotuner is restored after the last
        a, b = compiled.backend_flags(gpu, torch.float32), compiled.backend_flags(gpu, torch.float32)
        a.__enter__()
        b.__enter__()
        a.__exit__(None, None, None)
        assert cudnn.benchmark
        b.__exit__(None, None, None)
        assert not cudnn.benchmark
        with compiled.backend_flags(torch.device("cpu"), torch.float32):
            assert not cudnn.benchmark
        # a process that chose a precision itself is left with it
        matmul.fp32_precision = "ieee"
        monkeypatch.setattr(compiled, "_tf32_decided", False)
        with compiled.backend_flags(gpu, torch.float32):
            assert matmul.fp32_precision == "ieee"
    finally:
        cudnn.benchmark = False
        matmul.fp32_precision = "none"


@pytest.mark.skipif(not os.environ.get("NODEFLOW_TEST_INDUCTOR"),
                    reason="inductor compiles for minutes on a small CPU; set NODEFLOW_TEST_INDUCTOR=1")
def test_inductor_matches_eager():
    unet = micro_unet()
    runner = compiled.CompiledUNet(unet, compiled.CompileOptions(backend="inductor"), compiled.CompileCache())
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([400.0, 400.0]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        assert close(runner(x, t, ctx), unet(x, t, ctx), rtol=1e-4)   # inductor reorders sums: 1e-4
