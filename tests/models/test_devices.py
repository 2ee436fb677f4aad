import pytest
import torch
from torch import nn

from nodeflow import context as run_context
from nodeflow.models import devices, streaming


def test_device_and_precision_choice(monkeypatch):
    monkeypatch.setattr(run_context.default(), "device", None)
    monkeypatch.setattr(run_context.default(), "precision", None)
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert devices.get_device().type == "cpu"
    assert devices.compute_dtype(torch.device("cpu")) == torch.float32
    assert devices.compute_dtype(torch.device("cuda", 0)) == torch.float16
    devices.set_device("cpu")
    assert devices.get_device() == torch.device("cpu")
    devices.set_precision("bf16")
    assert devices.compute_dtype(torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        devices.set_precision("fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            devices.set_device("cuda")
    devices.set_device(None)
    devices.set_precision(None)


class Fake(nn.Linear):
    """A 4 MiB 'model' whose moves are only recorded."""
    def __init__(self):
        super().__init__(1024, 1024, bias=False)
        self.where = "cpu"

    def to(self, device, *args, **kwargs):
        self.where = torch.device(device).type
        return self


def test_manager_offloads_least_recently_used(monkeypatch):
    gpu = torch.device("cuda", 0)
    manager = devices.ModelManager(reserve=0)
    capacity = 10 * 2**20

    def free(device):
        return capacity - sum(devices.module_bytes(m) for m, _ in manager.loaded.values())

    monkeypatch.setattr(devices, "free_memory", free)
    a, b, c = Fake(), Fake(), Fake()
    manager.load(a, gpu)
    manager.load(b, gpu)
    assert (a.where, b.where) == ("cuda", "cuda")
    manager.load(a, gpu)                                # a used again: b is now the least recent
    manager.load(c, gpu)                                # 12 MiB > 10: something must go
    assert (a.where, b.where, c.where) == ("cuda", "cpu", "cuda")
    manager.offload_all()
    assert (a.where, c.where) == ("cpu", "cpu") and not manager.loaded


def test_manager_is_a_no_op_on_cpu():
    m = Fake()
    devices.ModelManager().load(m, torch.device("cpu"))
    assert m.where == "cpu"


class Recorder(nn.Sequential):
    """Two layers that record, during their forward, where their weights are (data pointers)."""
    def __init__(self):
        super().__init__(nn.Linear(1024, 1024), nn.LayerNorm(1024))
        self.seen, self.where = [], "cpu"
        for layer in self:
            layer.register_forward_hook(lambda m, a, o: self.seen.append(m.weight.data_ptr()))

    def to(self, device, *args, **kwargs):
        self.where = torch.device(device).type
        return self


def test_manager_streams_a_model_too_large_for_the_gpu(monkeypatch):
    """A model that does not fit even alone stays in CPU memory; each layer visits the device for its forward."""
    gpu = torch.device("cuda", 0)
    manager = devices.ModelManager(reserve=2**20)
    capacity = 5 * 2**20

    def free(device):
        on_gpu = [m for k, (m, _) in manager.loaded.items() if k not in manager.streamed]
        return capacity - sum(devices.module_bytes(m) for m in on_gpu)

    def to_device(t, device):                            # a copy stands for the tensor on the GPU
        return t.clone()

    monkeypatch.setattr(devices, "free_memory", free)
    monkeypatch.setattr(streaming, "copies_for", lambda device: streaming.Copies(device, move=to_device))
    small, big = Fake(), Recorder()                      # 4 MiB and 4 MiB + 12 KiB: big + reserve > 5 MiB
    manager.load(small, gpu)
    weights = [p.data for p in big.parameters()]
    manager.load(big, gpu)
    assert small.where == "cpu" and not manager.loaded.get(id(small))   # everything else was offloaded first
    x = torch.randn(2, 1024)
    expected = nn.functional.layer_norm(x @ weights[0].T + weights[1], (1024,), weights[2], weights[3])
    assert torch.allclose(big(x), expected, atol=1e-5)
    assert big.seen and not {w.data_ptr() for w in weights} & set(big.seen)   # each layer ran on its copy ...
    assert [p.data_ptr() for p in big.parameters()] == [w.data_ptr() for w in weights]   # ... and its CPU ones back
    manager.load(big, gpu)                               # still too large: still streamed, no new hooks
    assert len(manager.streamed[id(big)].handles) == 4 and len(big[0]._forward_pre_hooks) == 1
    capacity = 64 * 2**20                                # room now: moved as a whole, hooks removed
    manager.load(big, gpu)
    assert id(big) not in manager.streamed and not big[0]._forward_pre_hooks and big.where == "cuda"
    manager.offload_all()
    assert not manager.loaded and not manager.streamed


class AheadToDouble(streaming.Copies):
    """Copies made ahead (as on CUDA's side stream) to a 'device' that is float64."""
    prefetch = True

    def __init__(self, device):
        super().__init__(device, move=to_double)
        self.copied = 0

    def copy(self, tensors):
        self.copied += 1
        return super().copy(tensors)


def to_double(t, device):
    return t.double() if t.is_floating_point() else t


@pytest.mark.parametrize("ahead", [False, True], ids=["when-reached", "ahead"])
def test_streaming_reaches_every_weight_of_the_real_models(sdxl, ahead):
    """Streamed UNet, CLIP towers and VAE run with each weight moved just for its own module's forward: the
    'device' here is float64, so a weight used outside its module's forward would fail against float64 inputs.
    Twice each: the second call is predicted from the first and copied ahead, where the copies allow it."""
    g = torch.Generator().manual_seed(0)
    unet, clip_l, vae = sdxl.model.unet, sdxl.clip.towers[0].model, sdxl.vae.model
    x, context, y = (torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64),
                     torch.randn(1, 77, 160, generator=g, dtype=torch.float64),
                     torch.randn(1, unet.config.adm_in_channels, generator=g, dtype=torch.float64))
    ids = torch.tensor([[t for t, _ in sdxl.clip.tokenize("a cat")["l"][0]]])
    runs = [(unet, lambda m: m(x, torch.tensor([10.0]), context, y)),
            (clip_l, lambda m: m(ids, -2, False)[0]),
            (vae, lambda m: m.decode(x))]
    for module, run in runs:
        cpu = torch.device("cpu")
        copies = AheadToDouble(cpu) if ahead else streaming.Copies(cpu, move=to_double)
        stream = streaming.LayerStream(module, cpu, copies)
        try:
            with torch.no_grad():
                first = run(module)
                stream.settle()
                reached = 1 + len(stream.follows) if ahead else None    # each layer but the last has a successor
                streamed = run(module)
        finally:
            stream.remove()
        assert torch.equal(first, streamed)
        if ahead:                                         # every reached layer copied once a call, no more
            assert copies.copied == 2 * reached
        assert streamed.dtype == torch.float64 and next(module.parameters()).dtype == torch.float32
        with torch.no_grad():
            expected = run(module.double())
        module.float()
        assert torch.allclose(streamed, expected)


def test_vae_dtype_asks_the_models_own_gpu_for_native_bf16(monkeypatch):
    """bf16 only where computed natively (compute capability 8.0 on), read from the model's own
    device: a Turing card beside an Ampere one gets fp16, whichever is current."""
    capability = {0: (8, 6), 1: (7, 5)}
    asked = []

    def get_capability(device):
        asked.append(torch.device(device).index)
        return capability[torch.device(device).index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)    # counts emulation: not asked
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(run_context.default(), "precision", None)
    assert devices.vae_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert devices.vae_dtype(torch.device("cuda", 1)) == torch.float16
    assert asked == [0, 1]
    assert devices.vae_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.version, "hip", "6.2")                              # ROCm GPUs have bf16
    assert devices.vae_dtype(torch.device("cuda", 1)) == torch.bfloat16


class Movable(nn.Linear):
    """Records how it was moved; its tensors stay on the CPU."""
    def __init__(self, width=256):
        super().__init__(width, width)
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append((args, kwargs))
        return self


def test_offloaded_models_wait_in_pinned_memory_within_the_budget(monkeypatch):
    pinned = []

    def pinned_empty(t):                                     # a stand-in for pinned host memory
        out = torch.empty_like(t)
        pinned.append(out)
        return out

    monkeypatch.setattr(devices, "can_pin", lambda: True)
    monkeypatch.setattr(devices, "_pinned_empty", pinned_empty)
    monkeypatch.setattr(devices, "free_memory", lambda device: 1 << 40)
    gpu = torch.device("cuda", 0)
    size = devices.module_bytes(Movable())
    manager = devices.ModelManager(reserve=0, pin_limit=size)
    a, b = Movable(), Movable()
    weight = a.weight.detach().clone()
    manager.load(a, gpu)
    assert a.moves[-1] == ((gpu,), {"non_blocking": True})  # from pinned memory the copy need not wait
    manager.offload(a)
    assert manager.pinned == {id(a): size} and a.weight.data_ptr() == pinned[0].data_ptr()
    assert torch.equal(a.weight, weight) and len(a.moves) == 1             # copied once, not moved with .to
    manager.load(b, gpu)
    manager.offload(b)                                       # over the budget: pageable memory
    assert b.moves[-1] == (("cpu",), {}) and id(b) not in manager.pinned
    manager.load(a, gpu)                                     # back on the GPU: its pinned copy is released
    assert not manager.pinned
    monkeypatch.setattr(devices, "_pinned_empty", lambda t: (_ for _ in ()).throw(RuntimeError("mlock failed")))
    manager.offload(a)                                       # pinning refused: pageable, no error
    assert a.moves[-1] == (("cpu",), {}) and not manager.pinned


def test_pinned_memory_is_counted_as_the_allocator_rounds_it(monkeypatch):
    """torch's pinned-memory allocator rounds each block up to a power of two, and keeps blocks
    cached after their tensors are gone: the budget counts rounded sizes, and before pinning a
    model the blocks left cached by models now on the GPU are given back."""
    released = []
    monkeypatch.setattr(devices, "can_pin", lambda: True)
    monkeypatch.setattr(devices, "_pinned_empty", lambda t: torch.empty_like(t))
    monkeypatch.setattr(devices, "_release_pinned_cache", lambda: released.append(1))
    monkeypatch.setattr(devices, "free_memory", lambda device: 1 << 40)
    layer = Movable(300)                                     # 360,000 + 1,200 bytes of weights
    assert devices.pinned_bytes(layer) == 2**19 + 2**11
    manager = devices.ModelManager(reserve=0, pin_limit=2**19 + 2**11)
    manager.load(layer, torch.device("cuda", 0))
    manager.offload(layer)
    assert manager.pinned == {id(layer): 2**19 + 2**11} and released == [1]
    other = Movable(300)
    manager.load(other, torch.device("cuda", 0))
    manager.offload(other)                                   # raw 361,200 bytes would fit twice; rounded they do not
    assert id(other) not in manager.pinned and released == [1]
