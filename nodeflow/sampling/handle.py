"""The MODEL handle as sampling sees it: what it must have, and what it may have.

Sampling runs any object with the members of ``ModelHandle`` (nodeflow's ``DiffusionModel``,
a test's stand-in, another project's model). The optional members are read here and only
here, each with its default, so that a minimal handle works unchanged:

    prediction_type      "eps" | "v" | …            default "eps"
    device               where apply_model runs     default the CPU
    in_channels          the UNet's input channels  default latent_channels (no c_concat)
    latent_channels      the latent's channels      default the latent's own
    condition_kwargs     (meta, batch, width, height) -> extra apply_model arguments (SDXL's y, …)
    model_patches        a ``ModelPatches`` (CFG functions, UNet and attention patches)
    _nodeflow_schedule   a ``DiscreteSchedule`` that replaces the one built from the two
                         members above (ModelSamplingDiscrete: x0, LCM, zero terminal SNR)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class ModelHandle(Protocol):
    alphas_cumprod: Tensor                      # (1000,) ᾱ_t of the training schedule

    def apply_model(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
                    c_concat: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The raw network output for x already scaled by 1/√(σ²+1) at float timesteps t."""

    def process_latent_in(self, latent: Tensor) -> Tensor:
        """A RAW latent (as the VAE makes it) into the model's latent space."""

    def process_latent_out(self, latent: Tensor) -> Tensor:
        """The inverse of ``process_latent_in``."""


def prediction_type(model: ModelHandle) -> str:
    return getattr(model, "prediction_type", "eps")


def device(model: ModelHandle, given=None) -> torch.device:
    """``given`` when set, else the handle's device, else the CPU."""
    if given is not None:
        return torch.device(given)
    return torch.device(getattr(model, "device", None) or "cpu")


def latent_channels(model: ModelHandle, default: int) -> int:
    return getattr(model, "latent_channels", default)


def concat_channels(model: ModelHandle) -> int:
    """How many input channels the UNet takes beyond the latent's (5 for inpainting models:
    the mask and the masked image's latent, as c_concat)."""
    return getattr(model, "in_channels", 4) - getattr(model, "latent_channels", 4)


def condition_kwargs(model: ModelHandle) -> Callable[..., dict | None] | None:
    return getattr(model, "condition_kwargs", None)


def model_patches(model: ModelHandle):
    """The handle's ``ModelPatches``, or None for a handle without patches."""
    return getattr(model, "model_patches", None)


def schedule_override(model: ModelHandle):
    """The ``DiscreteSchedule`` a patched handle carries, or None."""
    return getattr(model, "_nodeflow_schedule", None)


def unet(model: ModelHandle, node: str):
    """The handle's UNet, for nodes that act on it (patches, compiling, DeepCache): ``ValueError``
    naming ``node`` for a handle without one."""
    found = getattr(model, "unet", None)
    if found is None:
        raise ValueError(f"{node} needs a UNet model (SD 1.x, SD 2.x, SDXL), not a {type(model).__name__}")
    return found
