"""Layer streaming with copies made ahead (CUDA's side stream), checked on the CPU with a stand-in
that records what happens when: the order of copies, waits and forwards is the overlap."""

import pytest
import torch
from torch import nn

from nodeflow.models import devices, streaming

CPU = torch.device("cpu")


class Log(streaming.Copies):
    """Copies ahead, as ``CudaCopies`` does, recording each copy, wait and finish in ``events``."""
    prefetch = True

    def __init__(self, events: list, owner: dict):
        super().__init__(CPU, move=lambda t, device: t.clone())
        self.events, self.owner, self.n = events, owner, 0

    def copy(self, tensors):
        self.n += 1
        self.events.append(("copy", self.owner[tensors[0].data_ptr()], self.n))
        return super().copy(tensors)[0], self.n

    def use(self, tensors, event):
        self.events.append(("wait", event))

    def done(self):                        # a GPU slower than the host: nothing finishes unless waited for
        self.n += 1
        return self.n

    def finished(self, marker):
        return False

    def wait(self, marker):
        self.events.append(("sync", marker))

    def finish(self):
        self.events.append(("finish",))


class Chain(nn.Module):
    """Five linear layers; ``skip`` leaves out the third (the order changes between calls)."""

    def __init__(self, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(5))
        self.skip = False

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if not (self.skip and i == 2):
                x = torch.tanh(layer(x))
        return x


def stream(model, events, **kwargs):
    owner = {layer.weight.data_ptr(): i for i, layer in enumerate(model.layers)}
    s = streaming.LayerStream(model, CPU, Log(events, owner), **kwargs)
    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: events.append(("forward", i)))
    return s


def test_copies_run_ahead_of_the_forwards_they_feed():
    model, events = Chain(), []
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = model(x)
        s = stream(model, events)
        assert torch.equal(model(x), expected)                # first call: nothing to predict from
        first = list(events)
        s.settle()
        events.clear()
        assert torch.equal(model(x), expected)
    assert [e[0] for e in first] == ["copy", "wait", "forward"] * 5
    # second call: entering layer k waits for its copy, then copies the following ones (budget: all)
    # before layer k's forward: layers k+1.. cross the bus while layer k computes
    forwards = [events.index(("forward", i)) for i in range(5)]
    copies = {e[1]: (n, e[2]) for n, e in enumerate(events) if e[0] == "copy"}
    assert sorted(copies) == [0, 1, 2, 3, 4]                   # each layer copied once
    for i in range(1, 5):
        assert copies[i][0] < forwards[i - 1]
    waits = [e[1] for e in events if e[0] == "wait"]
    assert waits == [copies[i][1] for i in range(5)]          # each forward waited for its own copy
    assert all(p.data_ptr() in {q.data_ptr() for q in model.parameters()} for p in model.parameters())


def test_the_budget_bounds_the_copies_ahead():
    model, events = Chain(), []
    layer_bytes = (16 * 16 + 16) * 4
    x = torch.randn(3, 16)
    with torch.no_grad():
        s = stream(model, events, prefetch_bytes=2 * layer_bytes)
        model(x)                    # each layer copied when reached
        s.settle()
        model(x)                    # copied ahead
        s.settle()
    alive = 0
    for e in events:                # copies the GPU may still read: made, and not yet waited for when done
        alive += {"copy": 1, "sync": -1}.get(e[0], 0)
        assert alive <= 2 + 1       # two ahead or still running on the GPU, plus the one being entered
        if e[0] == "finish":        # settled: the next call starts afresh
            alive = 0
    assert sum(e[0] == "sync" for e in events) >= 2 * (5 - 3)  # the host did wait for the GPU, in both calls
    # the forwards' outputs are right although the host waited
    x = torch.randn(3, 16)
    ref = x
    for layer in model.layers:
        ref = torch.tanh(ref @ layer.weight.T + layer.bias)
    with torch.no_grad():
        assert torch.allclose(model(x), ref)


def test_a_changed_order_still_computes_right_and_drops_unused_copies():
    model, events = Chain(), []
    x = torch.randn(3, 16)
    with torch.no_grad():
        s = stream(model, events)
        model(x)
        s.settle()
        model.skip = True                                      # layer 2 predicted, not reached
        model.layers[2].weight.zero_()                         # (stands out if it were used)
        expected_skip = x
        for i in (0, 1, 3, 4):
            layer = model.layers[i]
            expected_skip = torch.tanh(expected_skip @ layer.weight.T + layer.bias)
        assert torch.allclose(model(x), expected_skip)
        assert 2 in s.ready                                    # copied ahead, never used ...
        counted = sum(s.layers[j].nbytes for j in s.ready) + sum(n for _, n in s.running)
        assert s.alive == counted and counted > 0              # (the running count of bytes alive)
        s.settle()
        assert not s.ready and s.previous is None and s.alive == 0    # ... dropped before the next call
        assert events[-1] == ("finish",)
        model.skip = False
        assert s.follows[1] == 3                               # learnt from the last call
        out = model(x)
    ref = x
    for layer in model.layers:
        ref = torch.tanh(ref @ layer.weight.T + layer.bias)
    assert torch.allclose(out, ref)


def test_weights_written_between_calls_are_what_the_next_call_reads(monkeypatch):
    """A LoRA changes the CPU weights in place between calls (after ``ModelManager.load``): nothing
    copied before the change may be used after it."""
    gpu = torch.device("cuda", 0)
    model, events = Chain(), []
    owner = {layer.weight.data_ptr(): i for i, layer in enumerate(model.layers)}
    monkeypatch.setattr(streaming, "copies_for", lambda device: Log(events, owner))
    monkeypatch.setattr(devices, "free_memory", lambda device: 0)      # nothing fits: streamed
    monkeypatch.setattr(devices, "can_pin", lambda: False)
    manager = devices.ModelManager(reserve=0)
    x = torch.randn(3, 16)
    with torch.no_grad():
        manager.load(model, gpu)
        assert manager.is_streamed(model)
        model(x)
        model(x)                                               # no load between: copies of the last call made ahead
        manager.load(model, gpu)                               # a new call begins: settled
        assert not manager.streamed[id(model)].ready and events[-1] == ("finish",)
        for layer in model.layers:
            layer.weight.mul_(-1)
        out = model(x)
    ref = x
    for layer in model.layers:
        ref = torch.tanh(ref @ layer.weight.T + layer.bias)
    assert torch.allclose(out, ref)
    manager.offload(model)
    assert not manager.streamed and not any(layer._forward_pre_hooks for layer in model.layers)


def test_a_failing_forward_puts_the_cpu_weights_back():
    model, events = Chain(), []
    cpu_weights = [p.data_ptr() for p in model.parameters()]

    def boom(x):
        raise RuntimeError("boom")

    with torch.no_grad():
        s = stream(model, events)
        model.layers[3].forward = boom                        # fails with its weights swapped in
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.randn(3, 16))
        assert ("forward", 3) in events
        assert [p.data_ptr() for p in model.parameters()] == cpu_weights
        assert all(not layer.active for layer in s.layers)
        s.remove()
    assert all(len(layer._forward_pre_hooks) == 1 and not layer._forward_hooks for layer in model.layers)
