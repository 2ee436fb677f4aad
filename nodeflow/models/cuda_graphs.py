"""UNet steps replayed as CUDA graphs.

For a fixed set of input shapes the kernels of one step are recorded once and replayed, so a
step costs one launch instead of hundreds: at batch 1 on a fast GPU, SD 1.5's step is bound by
kernel launches, not by arithmetic.

A ``CapturedStep`` owns static input buffers, the graph and its output. Each call copies the
inputs into the buffers, replays, and returns a copy of the output (the next replay overwrites
it). What a replay reads was fixed at capture: the buffers and the memory of the weights. So

- the weights must stay where they were. LoRA patches write into them in place, which a replay
  sees; a model that went back to the CPU and returned has new memory, so ``matches`` compares
  the weights' addresses and the caller captures again when they moved;
- everything else that would change the recorded kernels (shapes, ControlNet residuals, model
  patches) is the caller's to keep fixed: ``compiled.CompiledUNet`` captures only plain steps,
  one graph per input shape.

Capture follows torch's CUDA graphs recipe: warm up on a side stream first (lazy
initialisation, cuDNN's benchmark and a compiled function's first call all happen outside the
capture), then record. The graphs of one model share one memory pool; that is safe because
they are replayed one at a time, on one stream, and each output is copied out before the next
replay. The CUDA calls go through ``CudaGraphs`` so that the bookkeeping can be tested on the
CPU with a stand-in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

WARMUP_CALLS = 2       # calls on a side stream before capture (torch's docs use a few; 2 covers lazy init)


class CudaGraphs:
    """The CUDA side of a capture."""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def pool(self, device: torch.device):
        with torch.cuda.device(device):
            return torch.cuda.graph_pool_handle()

    def warm_up(self, fn: Callable, inputs: Sequence, device: torch.device) -> None:
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    fn(*inputs)
            current.wait_stream(side)

    def capture(self, fn: Callable, inputs: Sequence, device: torch.device, pool) -> tuple[object, Tensor]:
        """(graph, its output tensor): ``fn(*inputs)`` recorded (not run: replay it for values).
        "thread_local": other workers' threads may use CUDA meanwhile (their own GPUs)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            output = fn(*inputs)
        return graph, output

    def replay(self, graph, device: torch.device) -> None:
        with torch.cuda.device(device):                  # a replay launches on the current device's stream
            graph.replay()


def weights(module: nn.Module) -> list[Tensor]:
    """The parameters and buffers of ``module``: what a captured graph reads besides its inputs.
    Collected once per module (walking SD 1.5's 686 parameters costs ~1.5 ms, a tenth of a step);
    moving a module keeps these objects and changes their storage, which ``addresses`` sees."""
    return [*module.parameters(), *module.buffers()]


def addresses(tensors: list[Tensor]) -> tuple[int, ...]:
    """Where ``tensors`` live now (tens of µs for a UNet's weights)."""
    return tuple(t.data_ptr() for t in tensors)


class CapturedStep:
    """``fn`` recorded for inputs shaped like ``example`` (tensors, or None for an absent input)."""

    def __init__(self, fn: Callable, example: Sequence[Tensor | None], weights: tuple[int, ...],
                 device: torch.device, pool, api: CudaGraphs):
        self.weights = weights
        # empty_like keeps each input's layout (channels-last latents stay so)
        self.inputs = [None if t is None else torch.empty_like(t) for t in example]
        for buffer, t in zip(self.inputs, example):
            if buffer is not None:
                buffer.copy_(t)
        api.warm_up(fn, self.inputs, device)
        self.graph, self.output = api.capture(fn, self.inputs, device, pool)
        self.device, self.api = device, api

    def matches(self, weights: tuple[int, ...]) -> bool:
        return weights == self.weights

    def __call__(self, *inputs: Tensor | None) -> Tensor:
        for buffer, t in zip(self.inputs, inputs):
            if buffer is not None:
                buffer.copy_(t)
        self.api.replay(self.graph, self.device)
        return self.output.clone()
