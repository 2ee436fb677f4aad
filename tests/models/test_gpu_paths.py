"""The CUDA paths on a real GPU: CUDA graphs, side-stream streaming, pinned offload, the flags of
compiled calls. Elsewhere these are tested with stand-ins for the CUDA calls; here the calls are
CUDA's own, on tiny models (a few seconds, plus one inductor compile). The capture broken on
purpose comes last in the file, so last in the run: it may leave CUDA's allocator in a state the
others should not start from. Skipped without CUDA:

    python -m pytest tests/models/test_gpu_paths.py
"""

from __future__ import annotations

import pytest
import torch

from nodeflow.models import compiled, devices, streaming
from nodeflow.models.diffusion import DiffusionModel
from nodeflow.models.testing import micro_unet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def inputs(seed: int, size: int, device, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, size, size, generator=g).to(device, dtype),
            torch.full((2,), 37.0 * seed).to(device),
            torch.randn(2, 77, 32, generator=g).to(device, dtype))


def close(a, b, tol):
    return (a.float() - b.float()).abs().max().item() <= tol * max(b.float().abs().max().item(), 1e-6)


def runner_on(device, backend=None, unet=None):
    unet = (unet or micro_unet()).to(device, torch.float16)
    owner = compiled.CompileCache()
    return unet, owner, compiled.CompiledUNet(unet, compiled.CompileOptions(backend=backend, cuda_graphs=True), owner)


@torch.no_grad()
@pytest.mark.parametrize("index", range(max(torch.cuda.device_count(), 1)))
def test_cuda_graphs_replay_the_eager_step_on_each_gpu(index):
    """Two shapes in turn, on every GPU of the machine: each replay sees its own inputs (a capture
    on a GPU other than the first records nothing through torch's default capture stream). The
    replays run with cuDNN's autotuner, the reference without: fp16 within 1 %."""
    device = torch.device("cuda", index)
    unet, owner, runner = runner_on(device)
    for seed in range(1, 5):
        for size in (8, 16):
            out = runner(*inputs(seed, size, device))
            assert close(out, unet(*inputs(seed, size, device)), 1e-2)
    assert owner.captured == 2 and not owner.graphs_off
    assert torch.cuda.current_stream(device) == torch.cuda.default_stream(device)


@torch.no_grad()
def test_inductor_with_cuda_graphs_equals_eager_and_compiles_once_per_shape():
    from torch.utils._triton import has_triton

    if not has_triton():
        pytest.skip("inductor needs Triton for CUDA")
    device = torch.device("cuda", 0)
    unet, owner, runner = runner_on(device, backend="inductor")
    for seed in range(1, 5):                                # new values each call: no recompile
        out = runner(*inputs(seed, 8, device))
        assert close(out, unet(*inputs(seed, 8, device)), 5e-3)
    assert (owner.compiled, owner.captured) == (1, 1)


@torch.no_grad()
def test_streaming_with_copies_ahead_equals_the_model_on_the_gpu():
    device = torch.device("cuda", 0)
    unet = micro_unet().half()
    reference = micro_unet().to(device, torch.float16)
    devices._move_to_pinned(unet)
    assert all(p.is_pinned() for p in unet.parameters())
    stream = streaming.LayerStream(unet, device)
    assert isinstance(stream.copies, streaming.CudaCopies)
    try:
        reference(*inputs(0, 16, device))                   # cuBLAS's workspace is allocated once, before
        baseline = torch.cuda.memory_allocated(device)
        for seed in (1, 2, 3):                              # the later calls copy ahead
            out = unet(*inputs(seed, 16, device))
            stream.settle()
            assert close(out, reference(*inputs(seed, 16, device)), 1e-3)
        del out
        torch.cuda.synchronize(device)
        assert torch.cuda.memory_allocated(device) <= baseline     # every copy freed
        assert stream.follows and all(p.device.type == "cpu" for p in unet.parameters())
    finally:
        stream.remove()


@torch.no_grad()
def test_offload_to_pinned_memory_keeps_the_weights():
    device = torch.device("cuda", 0)
    unet = micro_unet().to(device, torch.float16)
    expected = {k: v.cpu() for k, v in unet.state_dict().items()}
    devices._move_to_pinned(unet)
    state = unet.state_dict()
    assert all(v.is_pinned() and torch.equal(v, expected[k]) for k, v in state.items())


@torch.no_grad()
def test_timesteps_from_the_cpu_give_the_same_step():
    device = torch.device("cuda", 0)
    model = DiffusionModel(micro_unet().to(device, torch.float16), family="sd1", device=device)
    x, t, ctx = inputs(1, 8, device)
    on_gpu = model.apply_model(x, t, ctx)
    on_cpu = model.apply_model(x, t.cpu(), ctx)
    assert torch.equal(on_gpu, on_cpu)


def test_compiled_fp32_calls_turn_tf32_on_through_both_apis(monkeypatch):
    device = torch.device("cuda", 0)
    if not devices.has_tf32(device):
        pytest.skip("no TF32 on this GPU")
    matmul = torch.backends.cuda.matmul
    monkeypatch.setattr(compiled, "_tf32_decided", False)
    assert matmul.fp32_precision == "none"
    try:
        with compiled.backend_flags(device, torch.float32):
            assert matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
            a, b = torch.randn(256, 256, device=device), torch.randn(256, 256, device=device)
            assert close(a @ b, a.double() @ b.double(), 1e-2)       # TF32: about 3 decimal digits
        assert matmul.allow_tf32                                     # stays on: Dynamo guards the flag
    finally:
        matmul.fp32_precision = "none"


@torch.no_grad()
def test_a_capture_that_breaks_cudas_rules_leaves_the_stream_and_the_worker_usable():
    device = torch.device("cuda", 0)
    unet = micro_unet().to(device, torch.float16)

    def host_sync(module, args, output):                   # reads a value on the host: illegal in a capture
        output.abs().max().item()

    unet.out[2].register_forward_hook(host_sync)
    owner = compiled.CompileCache()
    runner = compiled.CompiledUNet(unet, compiled.CompileOptions(backend=None, cuda_graphs=True), owner)
    before = torch.cuda.current_stream(device)
    outs = [runner(*inputs(seed, 8, device)) for seed in (1, 2, 3)]
    assert owner.graphs_off and owner.captured == 0
    assert torch.cuda.current_stream(device) == before
    assert close(outs[2], unet(*inputs(3, 8, device)), 1e-2)
    other = micro_unet(seed=1).to(device, torch.float16)   # the worker goes on: allocate, compute, free
    assert torch.isfinite(other(*inputs(4, 16, device))).all()
