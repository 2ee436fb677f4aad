"""Compute device, precision, and a small LRU manager that moves models onto the GPU.

Each worker has its own device, precision and manager: they live in its run context
(``nodeflow.context``), so two workers in one process (one per GPU) never share them.

- The device is CUDA, else MPS, else CPU, unless the context names one (``set_device("cuda:1")``,
  the CLI's ``--device``).
- The precision of the UNet and the text encoders is fp16 on GPUs and fp32 on the CPU
  unless the context says otherwise (``set_precision("fp32" | "fp16" | "bf16")``, ``--precision``).
  The VAE runs in bf16 where the GPU computes it natively (compute capability 8.0 and up), else
  fp16; a VAE that overflows in half precision (SDXL's, in fp16) gives NaNs, which ``vae.VAE``
  detects, redoing the work in fp32.
- Models wait in CPU memory. ``model_manager().load(module, device)`` moves one to the GPU when
  a node runs it; when the GPU is short of memory, the least recently used models go back to
  the CPU first. A model too large for the GPU even alone runs layer by layer from CPU
  memory (each layer visits the GPU for its forward). On the CPU all of this is a no-op.
- Models sent back to CPU memory, and those streamed from it, wait in *pinned* (page-locked)
  memory where CUDA is there and the budget allows (``ModelManager.pin_limit``): copies from
  pinned memory to the GPU are asynchronous, so the host goes on queueing work while they run,
  and run at the bus's full speed. A streamed model's copies run on a side stream a few layers
  ahead of the compute (``nodeflow.models.streaming``).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch
from torch import nn

from nodeflow import context
from nodeflow.models import streaming

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def get_device() -> torch.device:
    """The compute device of the current run context: the one it names, else CUDA, else MPS, else CPU."""
    name = context.current().device
    if name is not None:
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(name: str | torch.device) -> str:
    """``name`` as a device string (``"cuda"`` becomes ``"cuda:N"``); ``ValueError`` when this
    machine does not have it."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(name)!r} requested but this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(name)!r} requested but MPS is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def set_device(name: str | torch.device | None) -> None:
    """Set the current run context's device (``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"``); None = automatic."""
    context.current().device = None if name is None else check_device(name)


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
    return name


def set_precision(name: str | None) -> None:
    """Set the current run context's UNet / text-encoder precision: ``"fp32"``, ``"fp16"``,
    ``"bf16"``; None = automatic."""
    context.current().precision = None if name is None else check_precision(name)


def get_precision() -> str | None:
    return context.current().precision


def compute_dtype(device: torch.device | None = None) -> torch.dtype:
    """The dtype of the UNet and text encoders on ``device``: the context's precision, else fp16
    on GPUs, fp32 on CPU."""
    precision = get_precision()
    if precision is not None:
        return PRECISIONS[precision]
    device = device or get_device()
    return torch.float32 if device.type == "cpu" else torch.float16


def vae_dtype(device: torch.device | None = None) -> torch.dtype:
    """The VAE's dtype: fp32 on the CPU (bf16 if the precision is ``"bf16"``); on GPUs bf16 where
    supported, else fp16, where a VAE that overflows (SDXL's) is redone in fp32 by ``VAE``.
    ``"fp32"`` forces fp32."""
    device = device or get_device()
    precision = get_precision()
    if precision == "fp32":
        return torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if native_bf16(device):
        return torch.bfloat16
    return torch.float16


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively. On CUDA that is compute capability 8.0 and up
    (Ampere on), asked of ``device`` itself: ``torch.cuda.is_bf16_supported()`` asks the current
    device, and by default also counts the slow emulation of older GPUs. ROCm GPUs have it."""
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return True
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def has_tf32(device: torch.device) -> bool:
    """Whether ``device`` has TF32 tensor cores (NVIDIA compute capability 8.0 and up)."""
    return device.type == "cuda" and not torch.version.hip and torch.cuda.get_device_capability(device)[0] >= 8


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def free_memory(device: torch.device) -> int:
    """Bytes the allocator can still hand out on ``device`` (a large number for the CPU): what the
    driver has free, plus what torch holds unused, less the pools of this worker's CUDA graphs
    (held for their replays: nothing else can use them)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
        return free + reserved - allocated - _graph_memory(device)
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
    return 1 << 62


class ModelManager:
    """Keeps track of the models on the GPU, most recently used last.

    ``load(module, device)`` puts ``module`` on ``device``; if that needs memory the GPU
    does not have, the least recently used other modules are moved back to the CPU until
    it fits (plus ``reserve`` bytes for activations). A module that does not fit even on an
    otherwise empty GPU stays in CPU memory and is *streamed*: each of its layers moves to
    the GPU just for its own forward (slow, but it runs). ``offload_all()`` empties the GPU.
    """

    def __init__(self, reserve: int = 1 << 30, pin_limit: int | None = None):
        self.reserve = reserve                                   # bytes kept free for activations
        self.loaded: OrderedDict[int, tuple[nn.Module, torch.device]] = OrderedDict()  # id -> module
        self.streamed: dict[int, streaming.LayerStream] = {}     # id -> the hooks of a streamed module
        # Page-locked host memory cannot be swapped out: at most this much of it holds models
        # (default: a quarter of the machine's memory, counted as ``pinned_bytes``); a model beyond
        # it waits in pageable memory.
        self.pin_limit = _physical_memory() // 4 if pin_limit is None else pin_limit
        self.pinned: dict[int, int] = {}                         # id -> bytes of a module in pinned memory

    def load(self, module: nn.Module, device: torch.device) -> nn.Module:
        if device.type == "cpu":
            return module
        key = id(module)
        if key in self.loaded and self.loaded[key][1] == device and key not in self.streamed:
            self.loaded.move_to_end(key)
            return module
        size = module_bytes(module)
        need = size + self.reserve
        if key in self.streamed and free_memory(device) < need:     # still streamed: the others may stay
            self.streamed[key].settle()                          # a new call of it begins
            self.loaded.move_to_end(key)
            return module
        if free_memory(device) < need:
            _release_graphs(device)                              # cheaper to record again than a model to move
        for other in list(self.loaded):
            if free_memory(device) >= need:
                break
            if other != key and self.loaded[other][1] == device and other not in self.streamed:
                self.offload(self.loaded[other][0])
        if free_memory(device) < need:
            log.warning("%s needs %.0f MiB (+ %.0f MiB for activations) but %s has %.0f MiB free with every "
                        "other model offloaded: running it layer by layer from CPU memory (slow)",
                        type(module).__name__, size / 2**20, self.reserve / 2**20, device, free_memory(device) / 2**20)
            self.loaded.pop(key, None)
            self._to_host(module)
            self.streamed[key] = streaming.LayerStream(module, device)
            self.loaded[key] = (module, device)
            return module
        if key in self.streamed:                                 # it fits now: stop streaming
            self.streamed.pop(key).remove()
        # From pinned memory the copies are asynchronous: kernels queued after them wait for them
        # on the GPU, and the caching host allocator keeps the pinned source until they are done.
        module.to(device, non_blocking=True)
        self.pinned.pop(key, None)
        self.loaded[key] = (module, device)
        self.loaded.move_to_end(key)
        return module

    def is_streamed(self, module: nn.Module) -> bool:
        """Whether ``module`` runs layer by layer from CPU memory (too large for its GPU)."""
        return id(module) in self.streamed

    def offload(self, module: nn.Module) -> None:
        """Move ``module`` back to the CPU (and stop streaming it)."""
        if id(module) in self.streamed:
            self.streamed.pop(id(module)).remove()
        if self.loaded.pop(id(module), None) is not None:
            log.info("offloading %s (%.0f MiB) to the CPU", type(module).__name__, module_bytes(module) / 2**20)
            self._to_host(module)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _to_host(self, module: nn.Module) -> None:
        """Move ``module`` to CPU memory: pinned while the budget allows (and CUDA is there to
        pin for), else pageable."""
        key, size = id(module), pinned_bytes(module)
        if key in self.pinned or not can_pin() or sum(self.pinned.values()) + size > self.pin_limit:
            module.to("cpu")
            return
        _release_pinned_cache()          # what models now on the GPU left pinned counts against no budget
        try:
            _move_to_pinned(module)
        except RuntimeError as exc:                              # e.g. the OS refuses to lock more pages
            log.warning("could not pin %.0f MiB of host memory for %s (%s): it waits in pageable memory",
                        size / 2**20, type(module).__name__, exc)
            module.to("cpu")
            return
        self.pinned[key] = size

    def offload_all(self) -> None:
        for module, _ in list(self.loaded.values()):
            self.offload(module)


def _graph_memory(device: torch.device) -> int:
    graphs = context.current().peek("compiled_models")
    return 0 if graphs is None else graphs.graph_bytes(device)


def _release_graphs(device: torch.device) -> None:
    """Free the memory pools of this worker's CUDA graphs on ``device`` (``--cuda-graphs``): a
    captured step keeps its activations there, for its replays only. The steps are recorded
    again when next run."""
    graphs = context.current().peek("compiled_models")
    if graphs is not None and graphs.release_graphs(device):
        log.info("dropping the CUDA graphs on %s to make room", device)
        torch.cuda.empty_cache()


def can_pin() -> bool:
    """Whether host memory can be pinned here (it is pinned for CUDA devices)."""
    return torch.cuda.is_available()


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):               # not a POSIX system: assume 16 GiB
        return 16 << 30


def pinned_bytes(module: nn.Module) -> int:
    """The pinned memory ``module``'s weights take: torch's pinned-memory allocator rounds each
    block up to a power of two (SD 1.5's UNet in fp16: 1.93 GiB for 1.60 GiB of weights)."""
    return sum(1 << (t.numel() * t.element_size() - 1).bit_length()
               for t in [*module.parameters(), *module.buffers()] if t.numel())


def _release_pinned_cache() -> None:
    """Give back the pinned blocks torch keeps cached after their tensors are gone (those of the
    models moved to the GPU since): pinned memory the budget no longer counts. A private call
    (torch's own CUDA-graph capture makes it); without it the blocks stay cached."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available():
        empty()


def _pinned_empty(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised CPU tensor in pinned memory, shaped, typed and laid out like ``t``."""
    return torch.empty_like(t, device="cpu", pin_memory=True)


@torch.no_grad()
def _move_to_pinned(module: nn.Module) -> None:
    """Every parameter and buffer of ``module`` into pinned CPU memory (one copy each, in place
    of ``module.to("cpu")``; the memory layout, channels-last included, is kept). The copies from
    a GPU are queued back to back, and the host waits once, for the last."""
    gpus = set()

    def pinned(t: torch.Tensor) -> torch.Tensor:
        if t.is_cuda:
            gpus.add(t.device)
        return _pinned_empty(t).copy_(t, non_blocking=True)

    for sub in module.modules():
        for p in sub.parameters(recurse=False):
            if p.device.type != "cpu" or not p.is_pinned():
                p.data = pinned(p.data)
        for name, b in sub.named_buffers(recurse=False):
            if b is not None and (b.device.type != "cpu" or not b.is_pinned()):
                sub._buffers[name] = pinned(b)
    for gpu in gpus:                          # before anyone reads (or writes) the CPU copies
        torch.cuda.current_stream(gpu).synchronize()


def model_manager() -> ModelManager:
    """The model manager of the current run context (each worker tracks its own GPU)."""
    return context.current().state("model_manager", ModelManager)


class _CurrentManager:
    """``manager``: stands for the current run context's ``ModelManager`` (``model_manager()``)."""

    def __getattr__(self, name: str):
        return getattr(model_manager(), name)

    def __repr__(self) -> str:
        return repr(model_manager())


manager = _CurrentManager()
