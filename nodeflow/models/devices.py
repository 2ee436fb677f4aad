"""Compute device, precision, and a small LRU manager that moves models onto the GPU.

- The device is CUDA, else MPS, else CPU, unless ``set_device("cuda:1")`` (the CLI's
  ``--device``) says otherwise.
- The precision of the UNet and the text encoders is fp16 on GPUs and fp32 on the CPU
  unless ``set_precision("fp32" | "fp16" | "bf16")`` (``--precision``) says otherwise. The VAE
  runs in bf16 where the GPU has it, else fp16; a VAE that overflows in half precision
  (SDXL's, in fp16) gives NaNs, which ``vae.VAE`` detects, redoing the work in fp32.
- Models wait in CPU memory. ``manager.load(module, device)`` moves one to the GPU when a
  node runs it; when the GPU is short of memory, the least recently used models go back to
  the CPU first. A model too large for the GPU even alone runs layer by layer from CPU
  memory (each layer visits the GPU for its forward). On the CPU all of this is a no-op.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_device: torch.device | None = None        # set_device override
_precision: str | None = None              # set_precision override


def get_device() -> torch.device:
    """The compute device: the override if set, else CUDA, else MPS, else CPU."""
    if _device is not None:
        return _device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_device(name: str | torch.device | None) -> None:
    """Override the compute device (``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"``); None = automatic."""
    global _device
    if name is None:
        _device = None
        return
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(name)!r} requested but MPS is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    _device = device


def set_precision(name: str | None) -> None:
    """Override the UNet / text-encoder precision: ``"fp32"``, ``"fp16"``, ``"bf16"``; None = automatic."""
    global _precision
    if name is not None and name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
    _precision = name


def get_precision() -> str | None:
    return _precision


def compute_dtype(device: torch.device | None = None) -> torch.dtype:
    """The dtype of the UNet and text encoders on ``device``: the override, else fp16 on GPUs, fp32 on CPU."""
    if _precision is not None:
        return PRECISIONS[_precision]
    device = device or get_device()
    return torch.float32 if device.type == "cpu" else torch.float16


def vae_dtype(device: torch.device | None = None) -> torch.dtype:
    """The VAE's dtype: fp32 on the CPU (bf16 if ``set_precision("bf16")``); on GPUs bf16 where supported,
    else fp16, where a VAE that overflows (SDXL's) is redone in fp32 by ``VAE``. ``"fp32"`` forces fp32."""
    device = device or get_device()
    if _precision == "fp32":
        return torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if _precision == "bf16" else torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def free_memory(device: torch.device) -> int:
    """Bytes the allocator can still hand out on ``device`` (a large number for the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
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

    def __init__(self, reserve: int = 1 << 30):
        self.reserve = reserve                                   # bytes kept free for activations
        self.loaded: OrderedDict[int, tuple[nn.Module, torch.device]] = OrderedDict()  # id -> module
        self.streamed: dict[int, list] = {}                      # id -> hook handles of a streamed module

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
            self.loaded.move_to_end(key)
            return module
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
            module.to("cpu")
            self.streamed[key] = _stream(module, device)
            self.loaded[key] = (module, device)
            return module
        for handle in self.streamed.pop(key, []):                # it fits now: stop streaming
            handle.remove()
        module.to(device)
        self.loaded[key] = (module, device)
        self.loaded.move_to_end(key)
        return module

    def offload(self, module: nn.Module) -> None:
        """Move ``module`` back to the CPU (and stop streaming it)."""
        for handle in self.streamed.pop(id(module), []):
            handle.remove()
        if self.loaded.pop(id(module), None) is not None:
            log.info("offloading %s (%.0f MiB) to the CPU", type(module).__name__, module_bytes(module) / 2**20)
            module.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def offload_all(self) -> None:
        for module, _ in list(self.loaded.values()):
            self.offload(module)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)


def _stream(module: nn.Module, device: torch.device) -> list:
    """Hooks that give each submodule its own parameters and buffers on ``device`` for the length of
    its forward, then put the CPU tensors back (no copy back: they are unchanged)."""
    handles = []
    for sub in module.modules():
        params = dict(sub.named_parameters(recurse=False))
        buffers = {name: b for name, b in sub.named_buffers(recurse=False) if b is not None}
        if not params and not buffers:
            continue
        on_cpu: dict[str, torch.Tensor] = {}

        def move_in(m, _args, params=params, buffers=buffers, on_cpu=on_cpu):
            for name, p in params.items():
                on_cpu.setdefault("p." + name, p.data)
                p.data = _to_device(p.data, device)
            for name in buffers:
                on_cpu.setdefault("b." + name, m._buffers[name])
                m._buffers[name] = _to_device(m._buffers[name], device)

        def move_out(m, _args, _output, params=params, buffers=buffers, on_cpu=on_cpu):
            for name, p in params.items():
                p.data = on_cpu.pop("p." + name, p.data)
            for name in buffers:
                m._buffers[name] = on_cpu.pop("b." + name, m._buffers[name])

        handles += [sub.register_forward_pre_hook(move_in), sub.register_forward_hook(move_out, always_call=True)]
    return handles


manager = ModelManager()
