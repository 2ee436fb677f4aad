"""CUDA graphs for UNet steps, on the CPU: the CUDA calls (warm-up, capture, replay) are played
by a stand-in that behaves as a graph does — a replay computes from the *static* input
buffers into the *same* output tensor — so what the bookkeeping must get right shows: inputs
copied in, outputs copied out, one capture per shape from its second call, a new capture when
the weights moved, no graph for ControlNet or patched calls, a fallback past ``max_graphs``."""

from __future__ import annotations

import logging

import pytest
import torch

from nodeflow.models import compiled, cuda_graphs
from nodeflow.models.testing import micro_unet


class FakeGraph:
    def __init__(self, fn, inputs, output):
        self.fn, self.inputs, self.output = fn, inputs, output

    def replay(self):
        self.output.copy_(self.fn(*self.inputs))       # reads the buffers, writes the captured output


class FakeCuda(cuda_graphs.CudaGraphs):
    def __init__(self, fail: bool = False, pool_bytes: int = 0):
        self.captures = self.warm_ups = self.replays = 0
        self.fail = fail
        self.pool_bytes, self.pools = pool_bytes, 0          # memory each capture takes for its pool

    def held(self, device):
        return self.pools

    def supports(self, device):
        return True

    def pool(self, device):
        return "pool"

    def warm_up(self, fn, inputs, device):
        self.warm_ups += 1
        fn(*inputs)

    def capture(self, fn, inputs, device, pool):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        self.pools += self.pool_bytes
        output = fn(*inputs)
        return FakeGraph(fn, inputs, output), output

    def replay(self, graph, device):
        self.replays += 1
        graph.replay()


def runner_for(unet, fake, backend=None, max_graphs=4):
    owner = compiled.CompileCache()
    owner.graphs = fake
    return compiled.CompiledUNet(unet, compiled.CompileOptions(backend=backend, cuda_graphs=True,
                                                              max_graphs=max_graphs), owner)


def inputs(seed: int, size: int = 8, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.full((batch,), 100.0 * seed),
            torch.randn(batch, 77, 32, generator=g))


@torch.no_grad()
def test_steps_are_captured_from_their_second_call_and_replayed_with_new_inputs():
    unet, fake = micro_unet(), FakeCuda()
    runner = runner_for(unet, fake)
    first = runner(*inputs(1))
    assert fake.captures == 0                              # the first call compiles or warms up, no more
    results = [runner(*inputs(seed)) for seed in (2, 3, 4)]
    assert (fake.warm_ups, fake.captures, fake.replays) == (1, 1, 3)
    for seed, out in zip((2, 3, 4), results):
        assert torch.allclose(out, unet(*inputs(seed)), atol=1e-5)   # each replay saw its own inputs
    assert not torch.equal(results[0], results[1])         # and returned its own copy, not the graph's output
    assert torch.allclose(first, unet(*inputs(1)), atol=1e-5)


@torch.no_grad()
def test_other_shapes_run_without_a_graph_once_the_graphs_are_full():
    unet, fake = micro_unet(), FakeCuda()
    runner = runner_for(unet, fake, max_graphs=1)
    for seed in (1, 2):
        runner(*inputs(seed))
    for seed in (3, 4, 5):
        out = runner(*inputs(seed, size=16))
        assert torch.allclose(out, unet(*inputs(seed, size=16)), atol=1e-5)
    assert fake.captures == 1


@torch.no_grad()
def test_weights_that_moved_are_captured_again():
    unet, fake = micro_unet(), FakeCuda()
    runner = runner_for(unet, fake)
    for seed in (1, 2, 3):
        runner(*inputs(seed))
    assert fake.captures == 1
    for p in unet.parameters():                            # as after an offload to the CPU and back
        p.data = p.data.clone()
    runner(*inputs(4))
    assert fake.captures == 2
    with torch.no_grad():                                  # a LoRA writes in place: the same graph
        unet.out[2].weight.add_(0.1)
    out = runner(*inputs(5))
    assert fake.captures == 2 and torch.allclose(out, unet(*inputs(5)), atol=1e-5)


@torch.no_grad()
def test_controlnet_and_patched_calls_never_replay():
    from nodeflow.models.model_patches import ModelPatches

    unet, fake = micro_unet(), FakeCuda()
    runner = runner_for(unet, fake)
    control = {"output": [None] * len(unet.output_blocks)}
    patches = ModelPatches(middle_block=[lambda h, info: h])
    for seed in (1, 2, 3):
        runner(*inputs(seed), control=control)
        runner(*inputs(seed), patches=patches, info={})
    assert fake.captures == 0


@torch.no_grad()
def test_a_step_that_cannot_be_captured_runs_without_a_graph(caplog):
    unet, fake = micro_unet(), FakeCuda(fail=True)
    runner = runner_for(unet, fake)
    with caplog.at_level(logging.WARNING):
        outs = [runner(*inputs(seed)) for seed in (1, 2, 3)]
        others = [runner(*inputs(seed, size=16)) for seed in (1, 2, 3)]    # another shape: not tried either
    assert torch.allclose(outs[2], unet(*inputs(3)), atol=1e-5)
    assert torch.allclose(others[2], unet(*inputs(3, size=16)), atol=1e-5)
    # tried once: a failed capture may leave CUDA's allocator routing to the graph's pool
    assert fake.warm_ups == 1 and runner.owner.graphs_off
    assert "without CUDA graphs from now on" in caplog.text


@torch.no_grad()
def test_a_move_drops_every_stale_graph_and_a_model_that_keeps_moving_waits_until_it_settles():
    unet, fake = micro_unet(), FakeCuda()
    runner = runner_for(unet, fake)
    max_moves, window = compiled.CompiledUNet.MAX_MOVES, compiled.CompiledUNet.MOVE_WINDOW
    for seed in (1, 2):
        runner(*inputs(seed))
        runner(*inputs(seed, size=16))
    assert fake.captures == 2 and len(runner._graphs) == 2

    def move():                                            # offloaded for another model and back
        for p in unet.parameters():
            p.data = p.data.clone()

    move()
    out = runner(*inputs(3))
    assert torch.allclose(out, unet(*inputs(3)), atol=1e-5)
    assert fake.captures == 3 and len(runner._graphs) == 1       # the other shape's stale graph went too
    for n in range(max_moves - 1):                         # moving at every step: no more captures
        move()
        out = runner(*inputs(4 + n))
        assert torch.allclose(out, unet(*inputs(4 + n)), atol=1e-5)
    assert fake.captures == 3 + max_moves - 2 and not runner._graphs
    steady = [runner(*inputs(10 + n)) for n in range(window)]    # staying put: captured again
    assert fake.captures == 3 + max_moves - 1 and len(runner._graphs) == 1
    assert torch.allclose(steady[-1], unet(*inputs(10 + window - 1)), atol=1e-5)


def test_weight_addresses_see_parameters_and_replaced_buffers():
    net = torch.nn.BatchNorm2d(4)
    weights = cuda_graphs.Weights(net)
    before = weights.addresses()
    assert len(before) == 2 + 3                            # weight, bias; running mean, var, count
    assert weights.addresses() == before
    net.running_mean = net.running_mean.clone()            # as Module._apply and pinning do
    assert weights.addresses() != before
    net.weight.data = net.weight.data.clone()
    assert weights.addresses()[0] != before[0]


def test_compile_modes_with_inductors_own_cuda_graphs_are_refused():
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="replays CUDA graphs of its own"):
            compiled.CompileOptions(mode=mode)
    assert compiled.CompileOptions(mode="max-autotune-no-cudagraphs").mode == "max-autotune-no-cudagraphs"


@torch.no_grad()
def test_the_graph_replays_the_compiled_step():
    class Counting:
        graphs = 0

        def __call__(self, gm, example_inputs):
            Counting.graphs += 1
            return gm.forward

    unet, fake = micro_unet(), FakeCuda()
    runner = runner_for(unet, fake, backend=Counting())
    for seed in (1, 2, 3):
        out = runner(*inputs(seed))
    assert (Counting.graphs, fake.captures) == (1, 1)
    assert torch.allclose(out, unet(*inputs(3)), atol=1e-5)


@torch.no_grad()
def test_graphs_are_dropped_before_any_model_leaves_the_gpu(monkeypatch):
    """A captured step keeps its activations in a pool that only its replays can use: the free
    memory does not count it, and when a model needs room the worker's graphs go first (recorded
    again later), before any model leaves the GPU. The GPU here: 9 MiB, of which the driver has
    free what torch does not hold; torch holds the models' weights and the graphs' pools."""
    from nodeflow import context
    from nodeflow.models import devices

    gpu = torch.device("cuda", 0)
    unet, fake = micro_unet(), FakeCuda(pool_bytes=3 << 20)
    run = context.RunContext(name="graphs")
    owner = run.state("compiled_models", compiled.CompileCache)
    owner.graphs = fake
    runner = owner.runner(unet, compiled.CompileOptions(backend=None, cuda_graphs=True), compiled.CompiledUNet)
    for seed in (1, 2):
        runner(*inputs(seed))
        runner(*inputs(seed, size=16))
    assert len(runner._graphs) == 2 and owner.graph_bytes(torch.device("cpu")) == 6 << 20
    for step in runner._graphs.values():                   # as if recorded on the GPU
        step.device = gpu

    class Model(torch.nn.Linear):
        def to(self, *args, **kwargs):
            return self

    manager = devices.ModelManager(reserve=0)

    def weights():
        return sum(devices.module_bytes(m) for m, _ in manager.loaded.values())

    def empty_cache():                                      # the pools of dropped graphs go back to the driver
        fake.pools = sum(step.pool_bytes for step in runner._graphs.values())

    total = 9 << 20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (total - fake.pools - weights(), total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: fake.pools + weights())
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: weights())
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(devices, "can_pin", lambda: False)
    first, second = Model(512, 1024, bias=False), Model(512, 1024, bias=False)   # 2 MiB each
    with context.activate(run):
        assert devices.free_memory(gpu) == 3 << 20          # 9 - 6 held by the pools
        manager.load(first, gpu)
        assert len(runner._graphs) == 2                     # room enough: the graphs stay
        manager.load(second, gpu)                           # 1 MiB free: the graphs go, not the first model
        assert devices.free_memory(gpu) == 5 << 20
    assert not runner._graphs and id(first) in manager.loaded and id(second) in manager.loaded
    out = runner(*inputs(3))                                 # recorded again on the next step
    assert len(runner._graphs) == 1 and torch.allclose(out, unet(*inputs(3)), atol=1e-5)
