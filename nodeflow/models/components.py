"""A model's parts from separate files, as ComfyUI's split-file workflows load them: the
diffusion model alone (``UNETLoader``: models/diffusion_models or models/unet) and text encoders
alone (``CLIPLoader`` / ``DualCLIPLoader``: models/text_encoders or models/clip).

- A diffusion-model file holds the UNet's LDM keys, with or without ``model.diffusion_model.``
  (so a whole checkpoint works too), or diffusers' ``UNet2DConditionModel`` keys. The family
  comes from the weights, as for a checkpoint without text encoders.
- A text-encoder file holds one CLIP text tower in transformers' layout (``text_model.*``) or
  OpenCLIP's (``transformer.resblocks.*``). Which tower, as ComfyUI tells them: a 31st layer means
  OpenCLIP bigG, a 23rd ViT-H (diffusers' SD 2.x encoder keeps 23 of its 24), else CLIP-L. One L
  makes SD 1.x's encoder, one H SD 2.x's, one bigG the SDXL refiner's; L + bigG (DualCLIPLoader,
  type "sdxl", in either order) SDXL's.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from nodeflow.models import devices
from nodeflow.models.checkpoint import HIDDEN_ACT, UNET_PREFIX, _build_unet, _missing_last_layers, detect
from nodeflow.models.clip import TextEncoder, build_text_model, make_text_encoder, openclip_to_hf
from nodeflow.models.diffusers_format import diffusers_unet_to_ldm
from nodeflow.models.files import CheckpointError, read_all

FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
TOWER_NAMES = {"l": "CLIP-L", "h": "OpenCLIP ViT-H", "g": "OpenCLIP bigG"}
TOWERS_OF = {frozenset("l"): "sd1", frozenset("h"): "sd2", frozenset("g"): "sdxl_refiner", frozenset("lg"): "sdxl"}


def load_diffusion_model(path, *, device=None, dtype: torch.dtype | None = None, weight_dtype: str = "default"):
    """A DiffusionModel from a file holding only (or at least) a UNet. ``weight_dtype`` "fp8_*"
    rounds the weights to that format, as ComfyUI stores them (they are kept, and computed, in
    the compute precision: the same numbers without the memory saving)."""
    path = Path(path)
    device = torch.device(device) if device is not None else devices.get_device()
    dtype = dtype or devices.compute_dtype(device)
    sd = read_all(path)
    if any(k.startswith(UNET_PREFIX) for k in sd):
        sd = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    elif "conv_in.weight" in sd and any(k.startswith("down_blocks.") for k in sd):
        sd = diffusers_unet_to_ldm(sd)
    if "input_blocks.0.0.weight" not in sd:
        raise CheckpointError(f"{path}: not a diffusion model (UNet): expected keys like 'input_blocks.0.0.weight', "
                              "'model.diffusion_model.input_blocks.0.0.weight' or diffusers' 'conv_in.weight'")
    round_to = FP8.get(weight_dtype)
    if weight_dtype != "default" and round_to is None:
        raise ValueError(f"unknown weight_dtype {weight_dtype!r}; expected default, {', '.join(FP8)}")
    sd = {k: (v.to(round_to) if round_to is not None and v.is_floating_point() else v).to(dtype)
          if v.is_floating_point() else v for k, v in sd.items()}
    layout = detect({UNET_PREFIX + k: tuple(v.shape) for k, v in sd.items()}, lambda k: sd.get(k[len(UNET_PREFIX):]),
                    towers={}, where=str(path))
    return _build_unet(sd, layout, device, str(path))


def _tower(sd: dict[str, torch.Tensor]) -> str:
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    return "g" if 30 in layers else "h" if 22 in layers else "l"


def read_text_encoder(path, dtype: torch.dtype) -> tuple[str, dict[str, torch.Tensor]]:
    """(tower name, transformers-layout state dict) of a text-encoder file."""
    sd = read_all(path, dtype)
    if "transformer.resblocks.0.ln_1.weight" in sd:
        sd = openclip_to_hf(sd)
    elif "text_projection" in sd:                           # saved by ComfyUI's CLIPSave: x @ W
        sd["text_projection.weight"] = sd.pop("text_projection").T.contiguous()
    elif not any(k.startswith("text_model.") for k in sd) and "embeddings.token_embedding.weight" in sd:
        sd = {"text_model." + k: v for k, v in sd.items()}   # older SD 1.x exports without "text_model."
    if "text_model.embeddings.token_embedding.weight" not in sd:
        raise CheckpointError(f"{path}: not a CLIP text encoder: expected transformers keys "
                              "('text_model.embeddings.token_embedding.weight') or OpenCLIP keys "
                              "('transformer.resblocks.0.ln_1.weight')")
    return _tower(sd), sd


def load_text_encoders(paths, *, device=None, dtype: torch.dtype | None = None) -> TextEncoder:
    """The TextEncoder of the towers in ``paths`` (one file per tower)."""
    device = torch.device(device) if device is not None else devices.get_device()
    dtype = dtype or devices.compute_dtype(device)
    models, names = {}, {}
    for path in paths:
        tower, sd = read_text_encoder(path, dtype)
        if tower in models:
            raise ValueError(f"{path} and {names[tower]} are both {TOWER_NAMES[tower]} text encoders")
        models[tower] = build_text_model(sd, hidden_act=HIDDEN_ACT[tower], missing_last_layers=_missing_last_layers(
            tower, sd), what=f"CLIP-{tower.upper()} in {path}")
        names[tower] = str(path)
    family = TOWERS_OF.get(frozenset(models))
    if family is None:
        found = " + ".join(f"{TOWER_NAMES[t]} ({names[t]})" for t in models)
        raise ValueError(f"these text encoders do not make a Stable Diffusion text encoder: {found}; expected "
                         "CLIP-L (SD 1.x), ViT-H (SD 2.x), bigG (SDXL refiner), or CLIP-L + bigG (SDXL)")
    return make_text_encoder(models, family, device)
