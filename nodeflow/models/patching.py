"""Weight patches (LoRA) on shared modules.

Handles share one module (a UNet, a CLIP tower) and carry their own patches:
``{parameter name: [(strength, patch), ...]}``, where a patch knows how to compute its
weight delta. Before a handle runs its module, ``sync`` makes the module's weights equal to
the original weights plus that handle's patches: it restores what another handle patched
(from CPU backups of only the touched parameters) and applies the new set. Running the same
handle again costs nothing; unpatched handles see the original weights.
"""

from __future__ import annotations

import threading
import weakref
from typing import Protocol

import torch
from torch import nn


class Patch(Protocol):
    def delta(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The weight change at strength 1, shaped like the parameter."""


Patches = dict[str, list[tuple[float, Patch]]]


class _State:
    __slots__ = ("backups", "signature")

    def __init__(self) -> None:
        self.signature: tuple = ()
        self.backups: dict[str, torch.Tensor] = {}


_states: weakref.WeakKeyDictionary[nn.Module, _State] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def signature(patches: Patches) -> tuple:
    return tuple((name, tuple((float(s), id(p)) for s, p in plist)) for name, plist in sorted(patches.items()) if plist)


@torch.no_grad()
def sync(module: nn.Module, patches: Patches) -> None:
    """Make ``module``'s weights the originals plus ``patches`` (no-op when already so)."""
    sig = signature(patches)
    with _lock:
        state = _states.get(module)
        if state is None:
            if not sig:
                return
            state = _states[module] = _State()
        if state.signature == sig:
            return
        params = dict(module.named_parameters())
        for name, original in state.backups.items():
            params[name].copy_(original.to(params[name].device, params[name].dtype))
        state.backups = {}
        for name, plist in patches.items():
            if not plist:
                continue
            param = params[name]
            state.backups[name] = param.detach().to("cpu", copy=True)
            # Sum in float32 and round once, so several patches lose no precision in fp16.
            total = param.detach().float()
            for strength, patch in plist:
                total += strength * patch.delta(param.shape, torch.float32, param.device)
            param.copy_(total.to(param.dtype))
        state.signature = sig


def combine(base: Patches, extra: Patches) -> Patches:
    """The patches of ``base`` followed by those of ``extra`` (a new dict, inputs untouched)."""
    out = {k: list(v) for k, v in base.items()}
    for name, plist in extra.items():
        out.setdefault(name, []).extend(plist)
    return out
