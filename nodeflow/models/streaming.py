"""A model too large for its GPU, run layer by layer from CPU memory.

Each layer (a submodule with weights of its own) gets its parameters and buffers on the GPU for
the length of its forward; after it, the module points at its CPU tensors again (unchanged, so
nothing is copied back) and the GPU copies are freed.

On CUDA the copies overlap the compute. They run on a side stream, issued a few layers ahead:
while layer k computes, the weights of layers k+1, k+2, … cross the bus. Which layer comes next
is learnt from the previous forward (``follows``): a UNet step calls its layers in the same order
every time, and a layer whose prediction was wrong, or the first forward's, is copied when it is
reached. The compute stream waits for a layer's copy (an event) before its forward, and the
copies are recorded as used by the compute stream, so the allocator reuses their memory only
after the kernels that read them. Copies from pinned memory (``devices.ModelManager`` pins the
streamed model's weights) are asynchronous; from pageable memory they still run, with the host
waiting on each.

The host must not run far ahead of the GPU: each layer it leaves still holds its copies until
the GPU has run that layer, and nothing else would stop it from queueing copies of the whole
model (the memory a streamed model does not have). So the copies alive — made ahead, or of
layers the GPU may still be running — stay within ``prefetch_bytes`` (plus the layer being
entered): before copying more, the host waits for the oldest layers to finish on the GPU.

A call of the model ends where the next begins: ``devices.ModelManager.load``, which every user
of a model calls before using it, calls ``settle()``. That drops the copies made ahead for a
layer not reached, forgets the last layer (the next call's first layer is not its successor),
and has the host wait for the side stream: the CPU weights may be written in place next (a
LoRA's ``patching.sync``), and no copy may still be reading them.

Elsewhere (MPS, the CPU in tests) a layer is copied when it is reached, on the current stream.
The stream calls go through ``CudaCopies`` so that the prefetching can be tested on the CPU with
a stand-in that records what happens when.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor, nn

PREFETCH_BYTES = 128 << 20      # copies alive besides the running layer's (ahead, or not yet done on the GPU)
PREFETCH_LAYERS = 32            # and at most this many layers ahead


def to_device(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device, non_blocking=True)


class Copies:
    """Copies on the current stream, when the layer is reached (no prefetching)."""

    prefetch = False

    def __init__(self, device: torch.device, move: Callable[[Tensor, torch.device], Tensor] = to_device):
        self.device, self.move = device, move

    def copy(self, tensors: list[Tensor]) -> tuple[list[Tensor], object]:
        return [self.move(t, self.device) for t in tensors], None

    def use(self, tensors: list[Tensor], event) -> None:
        """Before the layer's forward: its copies complete, as far as the compute stream sees."""

    def done(self) -> object:
        """After a layer's forward: a marker of the point where the GPU stops reading its copies
        (None: already so)."""
        return None

    def finished(self, marker) -> bool:
        """Whether the GPU has passed ``marker`` (without waiting)."""
        return True

    def wait(self, marker) -> None:
        """The host waits until the GPU has passed ``marker``."""

    def finish(self) -> None:
        """Every copy made so far is complete (as the host sees it)."""


class CudaCopies(Copies):
    """Copies on a side stream, each layer's followed by an event the compute stream waits for."""

    prefetch = True

    def __init__(self, device: torch.device, move: Callable[[Tensor, torch.device], Tensor] = to_device):
        super().__init__(device, move)
        self.side = torch.cuda.Stream(device)

    def copy(self, tensors: list[Tensor]) -> tuple[list[Tensor], object]:
        with torch.cuda.stream(self.side):
            out = [self.move(t, self.device) for t in tensors]
            event = torch.cuda.Event()
            event.record(self.side)
        return out, event

    def use(self, tensors: list[Tensor], event) -> None:
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for t in tensors:                    # allocated on the side stream, read on the compute stream
            t.record_stream(compute)

    def done(self) -> object:
        return torch.cuda.current_stream(self.device).record_event()

    def finished(self, marker) -> bool:
        return marker.query()

    def wait(self, marker) -> None:
        marker.synchronize()

    def finish(self) -> None:
        self.side.synchronize()


def copies_for(device: torch.device) -> Copies:
    """How a streamed model's layers reach ``device``: ahead on a side stream on CUDA, else when reached."""
    return CudaCopies(device) if device.type == "cuda" else Copies(device)


class _Layer:
    """One submodule's own parameters and buffers: their names, CPU tensors and size."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.params = [name for name, _ in module.named_parameters(recurse=False)]
        self.buffers = [name for name, b in module.named_buffers(recurse=False) if b is not None]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.host())
        self.active = 0                      # forwards under way (a layer may call itself)
        self.saved: list[Tensor] = []

    def host(self) -> list[Tensor]:
        m = self.module
        return [m._parameters[n].data for n in self.params] + [m._buffers[n] for n in self.buffers]

    def swap_in(self, tensors: list[Tensor]) -> None:
        self.saved = self.host()
        self._put(tensors)

    def swap_out(self) -> None:
        self._put(self.saved)
        self.saved = []

    def _put(self, tensors: list[Tensor]) -> None:
        m, k = self.module, len(self.params)
        for name, t in zip(self.params, tensors[:k]):
            m._parameters[name].data = t
        for name, t in zip(self.buffers, tensors[k:]):
            m._buffers[name] = t


class LayerStream:
    """Hooks that run ``module`` layer by layer on ``device``; ``remove()`` takes them off."""

    def __init__(self, module: nn.Module, device: torch.device, copies: Copies | None = None,
                 prefetch_bytes: int = PREFETCH_BYTES):
        self.copies = copies or copies_for(device)
        self.prefetch_bytes = prefetch_bytes
        self.layers = [_Layer(sub) for sub in module.modules()
                       if next(sub.parameters(recurse=False), None) is not None
                       or any(b is not None for b in sub.buffers(recurse=False))]
        self.follows: dict[int, int] = {}                 # layer -> the layer entered after it last time
        self.ready: dict[int, tuple[list[Tensor], object]] = {}   # layers copied ahead: tensors, event
        self.running: deque[tuple[object, int]] = deque()  # layers left by the host: (done marker, bytes)
        self.alive = 0                                    # bytes in ready and running
        self.previous: int | None = None
        self.handles = []
        for i, layer in enumerate(self.layers):
            self.handles += [layer.module.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)),
                             layer.module.register_forward_hook(lambda m, a, o, i=i: self._leave(i), always_call=True)]

    def settle(self) -> None:
        """Between two calls of the model: nothing copied ahead, no copy in flight."""
        self.ready.clear()                    # freed in the side stream's order: safe while still copying
        self.previous = None
        self.copies.finish()
        self.running.clear()                  # the allocator keeps their memory until the GPU is done
        self.alive = 0

    def remove(self) -> None:
        self.settle()
        for handle in self.handles:
            handle.remove()

    def _enter(self, i: int) -> None:
        layer = self.layers[i]
        if self.previous is not None and self.previous != i:
            self.follows[self.previous] = i
        self.previous = i
        if not layer.active:
            found = self.ready.pop(i, None)
            if found is not None:
                self.alive -= layer.nbytes
            else:
                self._make_room(layer.nbytes)
                found = self.copies.copy(layer.host())
            tensors, event = found
            self.copies.use(tensors, event)
            layer.swap_in(tensors)
        layer.active += 1                    # after the swap: a failed copy leaves nothing to undo
        if self.copies.prefetch:
            self._prefetch(i)

    def _leave(self, i: int) -> None:
        layer = self.layers[i]
        if not layer.active:                 # its pre-hook failed (the forward hook runs anyway)
            return
        layer.active -= 1
        if not layer.active:
            layer.swap_out()
            marker = self.copies.done()
            if marker is not None:
                self.running.append((marker, layer.nbytes))
                self.alive += layer.nbytes

    def _make_room(self, nbytes: int) -> bool:
        """Wait for the oldest running layers until ``nbytes`` more fit the budget (True), or
        nothing is left to wait for (False: it fits only if nothing is alive)."""
        while self.running and self.copies.finished(self.running[0][0]):
            self.alive -= self.running.popleft()[1]
        while self.running and self.alive + nbytes > self.prefetch_bytes:
            marker, n = self.running.popleft()
            self.copies.wait(marker)
            self.alive -= n
        return self.alive == 0 or self.alive + nbytes <= self.prefetch_bytes

    def _prefetch(self, i: int) -> None:
        """Copy the layers predicted to follow ``i``, within ``prefetch_bytes``."""
        j, seen = self.follows.get(i), {i}
        while j is not None and j not in seen and len(seen) <= PREFETCH_LAYERS:
            seen.add(j)
            layer = self.layers[j]
            if j not in self.ready and not layer.active:
                if not self._make_room(layer.nbytes):
                    return
                try:
                    self.ready[j] = self.copies.copy(layer.host())
                except torch.OutOfMemoryError:   # copying ahead is optional: the layer is copied when reached
                    return
                self.alive += layer.nbytes
            j = self.follows.get(j)
