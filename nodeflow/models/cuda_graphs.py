"""UNet steps replayed as CUDA graphs.

For a fixed set of input shapes the kernels of one step are recorded once and replayed, so a
step costs one launch instead of hundreds: at batch 1 on a fast GPU, SD 1.5's step is bound by
kernel launches, not by arithmetic.

A ``CapturedStep`` owns static input buffers, the graph and its output. Each call copies the
inputs into the buffers, replays, and returns a copy of the output (the next replay overwrites
it). What a replay reads was fixed at capture: the buffers and the memory of the weights. So

- the weights must stay where they were. LoRA patches write into them in place, which a replay
  sees; a model that went back to the CPU and returned has new memory, so the caller compares
  the weights' addresses (``Weights``) and captures again when they moved;
- everything else that would change the recorded kernels (shapes, ControlNet residuals, model
  patches) is the caller's to keep fixed: ``compiled.CompiledUNet`` captures only plain steps,
  one graph per input shape.

Capture follows torch's CUDA graphs recipe: warm up on a side stream first (lazy
initialisation, cuDNN's benchmark and a compiled function's first call all happen outside the
capture; the side stream is the capture stream, so that its own cuBLAS workspace is made then,
not inside the graph's pool), then record. The graphs of one model share one memory pool; that is safe because
they are replayed one at a time, on one stream, and each output is copied out before the next
replay. Each GPU has its own capture stream (torch's default capture stream belongs to the GPU
that was current when it was made: a capture on another GPU through it records nothing), and
one capture runs at a time in the process, as CUDA requires. The CUDA calls go through
``CudaGraphs`` so that the bookkeeping can be tested on the CPU with a stand-in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

WARMUP_CALLS = 2       # calls on a side stream before capture (torch's docs use a few; 2 covers lazy init)
_CAPTURING = threading.Lock()      # one capture at a time in the process (other workers' threads too)


class CudaGraphs:
    """The CUDA side of a capture."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def pool(self, device: torch.device):
        with torch.cuda.device(device):
            return torch.cuda.graph_pool_handle()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def warm_up(self, fn: Callable, inputs: Sequence, device: torch.device) -> None:
        """Runs on the capture stream itself: what is made per stream (cuBLAS's workspace) is made
        now, in the ordinary pool, not during the capture in the graph's."""
        with torch.cuda.device(device):
            current, side = torch.cuda.current_stream(device), self._stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    fn(*inputs)
            current.wait_stream(side)

    def capture(self, fn: Callable, inputs: Sequence, device: torch.device, pool) -> tuple[object, Tensor]:
        """(graph, its output tensor): ``fn(*inputs)`` recorded (not run: replay it for values).
        "thread_local": other workers' threads may use CUDA meanwhile (their own GPUs)."""
        graph = torch.cuda.CUDAGraph()
        with _CAPTURING, torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            try:
                with torch.cuda.graph(graph, pool=pool, stream=self._stream(device), capture_error_mode="thread_local"):
                    output = fn(*inputs)
            except BaseException:
                # When ending the capture fails inside CUDA, torch's context skips restoring the
                # stream and, in some torch versions, telling the allocator that the capture is over
                torch.cuda.set_stream(current)
                end = getattr(torch._C, "_cuda_endAllocateToPool", None)
                if end is not None:
                    try:
                        end(torch.cuda.current_device(), pool)
                    except RuntimeError:        # "not currently recording": it was told
                        pass
                raise
        return graph, output

    def held(self, device: torch.device) -> int:
        """The memory torch holds on ``device`` once its cache of unused blocks is emptied (as
        ``torch.cuda.graph`` does before a capture): a graph's pool is not in that cache."""
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(device)

    def replay(self, graph, device: torch.device) -> None:
        with torch.cuda.device(device):                  # a replay launches on the current device's stream
            graph.replay()


class Weights:
    """Where the parameters and buffers of ``module`` live: what a captured graph reads besides
    its inputs. The module is walked once (SD 1.5's 686 parameters take ~1.5 ms, a tenth of a
    step): moving a module keeps its parameter objects and changes their storage, while a
    buffer is replaced by a new tensor, so buffers are looked up by owner and name each time."""

    def __init__(self, module: nn.Module):
        self.params = list(module.parameters())
        self.buffers = [(sub, name) for sub in module.modules() for name, b in sub._buffers.items() if b is not None]

    def addresses(self) -> tuple[int, ...]:
        """Now (tens of µs for a UNet's weights)."""
        return (*(p.data_ptr() for p in self.params), *(sub._buffers[name].data_ptr() for sub, name in self.buffers))


class CapturedStep:
    """``fn`` recorded for inputs shaped like ``example`` (tensors, or None for an absent input)."""

    def __init__(self, fn: Callable, example: Sequence[Tensor | None], device: torch.device, pool,
                 api: CudaGraphs):
        # empty_like keeps each input's layout (channels-last latents stay so)
        self.inputs = [None if t is None else torch.empty_like(t) for t in example]
        for buffer, t in zip(self.inputs, example):
            if buffer is not None:
                buffer.copy_(t)
        api.warm_up(fn, self.inputs, device)
        before = api.held(device)
        self.graph, self.output = api.capture(fn, self.inputs, device, pool)
        # What the capture took for the pool: the step's activations, idle between replays, that
        # nothing else can use (graphs sharing the pool add what the earlier ones did not hold)
        self.pool_bytes = max(0, api.held(device) - before)
        self.device, self.api = device, api

    def __call__(self, *inputs: Tensor | None) -> Tensor:
        for buffer, t in zip(self.inputs, inputs):
            if buffer is not None:
                buffer.copy_(t)
        self.api.replay(self.graph, self.device)
        return self.output.clone(memory_format=torch.contiguous_format)
