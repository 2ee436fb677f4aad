"""Checkpoints: family detection and loading (single files, diffusers folders, standalone VAEs).

Families (``detect_family``): ``"sd1"``, ``"sd2"`` (512, ε), ``"sd2_v"`` (768, v-prediction),
``"sdxl"``, ``"sdxl_refiner"``; inpainting models (9 UNet input channels) add ``"_inpaint"``
(``"sd1_inpaint"``, ``"sd2_inpaint"``, ``"sdxl_inpaint"``). They are told apart by keys and
shapes:

- the UNet (``model.diffusion_model.*``): a label embedding (``label_emb``) means SDXL; the
  refiner's is 1280 wider than its context (pooled bigG + 5 size numbers, not 6);
- the text encoders: ``cond_stage_model.transformer`` (CLIP-L: SD 1.x),
  ``cond_stage_model.model`` (OpenCLIP ViT-H: SD 2.x), ``conditioner.embedders.0.transformer``
  + ``conditioner.embedders.1.model`` (SDXL), ``conditioner.embedders.0.model`` alone (refiner);
- without text encoders, the context width: 768 SD 1.x, 1024 SD 2.x;
- SD 2.1 unCLIP: an SD 2.x model (ViT-H text tower) whose UNet has a label embedding (the noised
  CLIP image embedding and its noise level; its image encoder is under ``embedder.model.visual.``).

SD 2.x v-prediction, which the architecture does not show, comes from, in order: the
``prediction_type`` argument; a ``v_pred`` key; a ``parameterization: v`` line in a ``.yaml``
next to the file; a diffusers scheduler config; else, for 4-channel UNets only (as in ComfyUI),
the statistic ComfyUI also uses (the std of the last output block's first ``norm1.bias`` is
above 0.09 in v models). Inpainting models are ε unless a hint says v.

``load_checkpoint`` takes a file or a diffusers folder; ``load_diffusers`` a folder. diffusers'
SD 2.x ``text_encoder`` lacks OpenCLIP's last layer; its conditioning (and clip skip) still
equals the single file's: layers are counted from the original tower's end.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nodeflow.models import devices
from nodeflow.models.clip import TextEncoder, build_text_model, make_text_encoder, openclip_to_hf
from nodeflow.models.diffusers_format import diffusers_unet_to_ldm, diffusers_vae_to_ldm
from nodeflow.models.diffusion import LATENT_SCALE, DiffusionModel, base_family
from nodeflow.models.files import CheckpointError, DictFile, TensorFile, assign_weights, open_state_dict
from nodeflow.models.unet import UNet
from nodeflow.models.unet import config_from_shapes as unet_config_from_shapes
from nodeflow.models.vae import VAE, AutoencoderKL
from nodeflow.models.vae import config_from_shapes as vae_config_from_shapes

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# text tower prefixes of single-file checkpoints: (prefix, tower, layout)
TEXT_PREFIXES = [
    ("cond_stage_model.transformer.", "l", "hf"),
    ("cond_stage_model.model.", "h", "openclip"),
    ("conditioner.embedders.0.transformer.", "l", "hf"),
    ("conditioner.embedders.1.model.", "g", "openclip"),
    ("conditioner.embedders.0.model.", "g", "openclip"),
]
HEADS = {"sd1": {"num_heads": 8}, "sd2": {"num_head_channels": 64}, "sdxl": {"num_head_channels": 64},
         "sdxl_refiner": {"num_head_channels": 64}}
HIDDEN_ACT = {"l": "quick_gelu", "h": "gelu", "g": "gelu"}
VIT_H_WIDTH, VIT_H_LAYERS = 1024, 24   # OpenCLIP ViT-H/14's text tower (SD 2.x)
V_PRED_STD = 0.09     # SD 2.x v models: std of output_blocks[last].1.transformer_blocks.0.norm1.bias above this
EXPECTED = ("expected a Stable Diffusion checkpoint with keys under 'model.diffusion_model.' (UNet), "
            "'cond_stage_model.' or 'conditioner.embedders.' (text encoders) and 'first_stage_model.' (VAE)")


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` gives: the three handles (each None if the file lacks it) and the family."""
    model: DiffusionModel | None
    clip: TextEncoder | None
    vae: VAE | None
    family: str
    path: str = ""


@dataclass
class Layout:
    """Where each part of a checkpoint is: the result of detection."""
    family: str                                             # full family, e.g. "sd1_inpaint"
    base: str                                               # "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    prediction_type: str                                    # "eps" | "v"
    has_unet: bool
    has_vae: bool
    towers: dict[str, tuple[str, str]] = field(default_factory=dict)   # tower -> (key prefix, layout)


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _towers(keys) -> dict[str, tuple[str, str]]:
    found = {}
    for prefix, tower, layout in TEXT_PREFIXES:
        if any(k.startswith(prefix) for k in keys) and tower not in found:
            found[tower] = (prefix, layout)
    return found


def _v_pred_statistic(unet_shapes: dict, get) -> bool:
    """ComfyUI's test for SD 2.x v models: the last transformer's first norm1.bias is spread out."""
    blocks = [int(m.group(1)) for k in unet_shapes
              if (m := re.match(r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias$", k))]
    if not blocks or get is None:
        return False
    bias = get(f"{UNET_PREFIX}output_blocks.{max(blocks)}.1.transformer_blocks.0.norm1.bias")
    return bias is not None and torch.std(bias.float(), unbiased=False).item() > V_PRED_STD


def detect(shapes: dict[str, tuple], get=None, *, prediction_type: str | None = None,
           towers: dict | None = None, hint: str | None = None, where: str = "checkpoint") -> Layout:
    """Detect the layout of a single-file state dict (``shapes``: key -> shape). ``get(key)`` reads a
    tensor for the v-prediction statistic; ``hint`` is a prediction type from outside the weights."""
    towers = _towers(shapes) if towers is None else towers
    unet = {k[len(UNET_PREFIX):]: s for k, s in shapes.items() if k.startswith(UNET_PREFIX)}
    has_vae = f"{VAE_PREFIX}encoder.conv_in.weight" in shapes
    if unet:
        if "input_blocks.0.0.weight" not in unet:
            raise CheckpointError(f"{where}: the UNet is incomplete: "
                                  "no 'model.diffusion_model.input_blocks.0.0.weight'")
        in_channels = unet["input_blocks.0.0.weight"][1]
        context = next((s[1] for k, s in unet.items() if k.endswith("attn2.to_k.weight")), 0)
        adm = unet.get("label_emb.0.0.weight", (0, 0))[1]
        linear = any(len(s) == 2 for k, s in unet.items() if k.endswith("proj_in.weight"))
        unclip = adm and ("h" in towers or (not towers and context == 1024 and adm in (1536, 2048)))
        if unclip:                       # SD 2.1 unCLIP: y = noised CLIP image embedding + its noise level
            base = "sd2"
        elif adm:
            refiner = set(towers) == {"g"} or (not towers and adm == context + 5 * 256)
            base = "sdxl_refiner" if refiner else "sdxl"
        elif "h" in towers:
            base = "sd2"
        elif "l" in towers or context == 768:
            base = "sd1"
        else:
            base = "sd2" if context == 1024 or linear else "sd1"
        if in_channels not in (4, 9):
            raise CheckpointError(f"{where}: the UNet takes {in_channels} input channels; expected 4, or 9 "
                                  "for an inpainting model")
    else:
        in_channels = 4
        names = set(towers)
        base = {frozenset("l"): "sd1", frozenset("h"): "sd2", frozenset("lg"): "sdxl",
                frozenset("g"): "sdxl_refiner"}.get(frozenset(names))
        if base is None:
            prefixes = Counter(".".join(k.split(".")[:2]) for k in shapes).most_common(6)
            found = ", ".join(f"'{p}.*' ({n})" for p, n in prefixes) or "no tensors"
            raise CheckpointError(f"{where}: unknown model: {EXPECTED}; found {found}")

    if prediction_type is None:
        if "v_pred" in shapes:
            prediction_type = "v"
        elif hint is not None:
            prediction_type = hint
        elif base == "sd2" and in_channels == 4 and _v_pred_statistic(unet, get):   # not for inpainting UNets
            prediction_type = "v"
        else:
            prediction_type = "eps"
    if prediction_type not in ("eps", "v"):
        raise ValueError(f"prediction_type must be 'eps' or 'v', got {prediction_type!r}")
    family = base + ("_v" if base == "sd2" and prediction_type == "v" else "")
    family += "_inpaint" if in_channels == 9 else ""
    return Layout(family, base, prediction_type, bool(unet), has_vae, towers)


def detect_family(state_dict) -> str:
    """The family of a state dict given as ``{key: tensor}`` or ``{key: shape}`` (see the module doc).
    With shapes only, SD 2.x v-prediction cannot be told (unless a ``v_pred`` key is present)."""
    shapes = {k: _shape(v) for k, v in state_dict.items()}
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    return detect(shapes, tensors.get, where="state dict").family


def _yaml_hint(path: Path) -> str | None:
    """``parameterization: "v"`` in an LDM config next to the checkpoint means v-prediction."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file() and re.search(r"parameterization:\s*[\"']?v[\"']?\s*$", yaml.read_text(errors="ignore"), re.M):
        return "v"
    return None


# --- building ------------------------------------------------------------------------------

def _build_unet(sd: dict[str, torch.Tensor], layout: Layout, device, where: str) -> DiffusionModel:
    try:
        cfg = unet_config_from_shapes({k: v.shape for k, v in sd.items()}, **HEADS[layout.base])
    except ValueError as e:
        raise CheckpointError(f"{where}: cannot read the architecture of the {layout.family} UNet: {e}. "
                              "Is the file truncated or a different kind of model?") from None
    with torch.device("meta"):
        unet = UNet(cfg)
    assign_weights(unet, sd, f"{layout.family} UNet in {where}")
    return DiffusionModel(unet, family=layout.family, prediction_type=layout.prediction_type, device=device)


def _build_vae(sd: dict[str, torch.Tensor], scale: float, device, where: str) -> VAE:
    try:
        cfg = vae_config_from_shapes({k: v.shape for k, v in sd.items()})
    except ValueError as e:
        raise CheckpointError(f"{where}: cannot read the architecture of the VAE: {e}. "
                              "Is the file truncated or a different kind of model?") from None
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    assign_weights(model, sd, f"VAE in {where}")
    return VAE(model, scale_factor=scale, device=device)


def _read(f: TensorFile, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: f.get(k, dtype) for k in list(f.keys()) if k.startswith(prefix)}


def load_checkpoint(path, *, device=None, dtype: torch.dtype | None = None, prediction_type: str | None = None,
                    components=("model", "clip", "vae")) -> Checkpoint:
    """Load a single-file checkpoint (``.safetensors``, or ``.ckpt``/``.pt`` read with ``weights_only``),
    or a diffusers folder (``load_diffusers``).

    ``device``: where the models run (default ``devices.get_device()``); weights wait in CPU
    memory, already in their run dtype: ``dtype`` for the UNet and text encoders (default
    ``devices.compute_dtype``), ``devices.vae_dtype`` for the VAE. ``prediction_type``
    ("eps" | "v") overrides detection. ``components`` limits what is loaded.
    """
    path = Path(path)
    if path.is_dir():
        return load_diffusers(path, device=device, dtype=dtype, prediction_type=prediction_type, components=components)
    device = torch.device(device) if device is not None else devices.get_device()
    dtype = dtype or devices.compute_dtype(device)
    with open_state_dict(path) as f:
        layout = detect(f.shapes, lambda k: f.get(k) if k in f else None, prediction_type=prediction_type,
                        hint=_yaml_hint(path), where=str(path))
        model = clip = vae = None
        if "model" in components and layout.has_unet:
            model = _build_unet(_read(f, UNET_PREFIX, dtype), layout, device, str(path))
        if "clip" in components and layout.towers:
            clip = _text_encoder(f, layout, dtype, device, str(path))
        if "vae" in components and layout.has_vae:
            vae = _build_vae(_read(f, VAE_PREFIX, devices.vae_dtype(device)), LATENT_SCALE[layout.base],
                             device, str(path))
    return Checkpoint(model, clip, vae, layout.family, str(path))


def _text_encoder(f: TensorFile, layout: Layout, dtype, device, where: str) -> TextEncoder:
    models = {}
    for tower, (prefix, kind) in layout.towers.items():
        sd = _read(f, prefix, dtype)
        if kind == "openclip":
            sd = openclip_to_hf(sd)
        elif not any(k.startswith("text_model.") for k in sd):        # older SD 1.x files: no "text_model."
            sd = {"text_model." + k: v for k, v in sd.items()}
        models[tower] = build_text_model(sd, hidden_act=HIDDEN_ACT[tower], what=f"CLIP-{tower.upper()} in {where}")
    return make_text_encoder(models, base_family(layout.family), device)


# --- diffusers folders ---------------------------------------------------------------------

_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")


def _weights_file(folder: Path) -> Path:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file (expected one of {', '.join(_WEIGHT_NAMES)})")


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _missing_last_layers(tower: str, sd: dict[str, torch.Tensor]) -> int:
    """How many final layers of the original OpenCLIP ViT-H a diffusers SD 2.x ``text_encoder`` lacks.
    diffusers' conversion drops the last of its 24 layers, so that ``last_hidden_state`` is SD 2's
    conditioning (the penultimate layer, final norm); clip-skip layers count from the original's end.
    A full-width tower is compared with the real 24 layers; a narrower (test) one lacks one."""
    if tower != "h":
        return 0
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    embedding = sd.get("text_model.embeddings.token_embedding.weight")
    width = embedding.shape[1] if embedding is not None else 0
    return max(0, VIT_H_LAYERS - len(layers)) if width == VIT_H_WIDTH else 1


def load_diffusers(folder, *, device=None, dtype: torch.dtype | None = None, prediction_type: str | None = None,
                   components=("model", "clip", "vae")) -> Checkpoint:
    """Load a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
    ``text_encoder_2/``); same arguments as ``load_checkpoint``. Tokenizers are the built-in ones."""
    folder = Path(folder)
    index = _json(folder / "model_index.json")
    if not index:
        raise CheckpointError(f"{folder}: not a diffusers folder (no model_index.json)")
    device = torch.device(device) if device is not None else devices.get_device()
    dtype = dtype or devices.compute_dtype(device)

    unet_sd = {}
    if (folder / "unet").is_dir():
        with open_state_dict(_weights_file(folder / "unet")) as f:
            unet_sd = diffusers_unet_to_ldm(_read(f, "", dtype))
    text = {}                           # tower -> (folder, transformers state dict, hidden_act, heads, missing layers)
    for sub in ("text_encoder", "text_encoder_2"):
        if (folder / sub).is_dir() and index.get(sub) and index[sub][0] is not None:
            config = _json(folder / sub / "config.json")
            with open_state_dict(_weights_file(folder / sub)) as f:
                sd = _read(f, "", dtype)
            act = config.get("hidden_act", "quick_gelu")
            tower = "g" if sub == "text_encoder_2" else ("l" if act == "quick_gelu" else "h")
            text[tower] = (sub, sd, act, config.get("num_attention_heads"), _missing_last_layers(tower, sd))

    hint = {"v_prediction": "v", "epsilon": "eps"}.get(
        _json(folder / "scheduler" / "scheduler_config.json").get("prediction_type"))
    shapes = {UNET_PREFIX + k: tuple(v.shape) for k, v in unet_sd.items()}
    layout = detect(shapes, lambda k: unet_sd.get(k[len(UNET_PREFIX):]), prediction_type=prediction_type,
                    towers={t: ("", "hf") for t in text}, hint=hint, where=str(folder))
    model = clip = vae = None
    if "model" in components and unet_sd:
        model = _build_unet(unet_sd, layout, device, str(folder))
    if "clip" in components and text:
        models = {t: build_text_model(sd, hidden_act=act, num_heads=heads, missing_last_layers=missing,
                                      what=f"CLIP-{t.upper()} in {folder / sub}")
                  for t, (sub, sd, act, heads, missing) in text.items()}
        clip = make_text_encoder(models, layout.base, device)
    if "vae" in components and (folder / "vae").is_dir():
        vae = load_vae(folder / "vae", device=device, scale_factor=LATENT_SCALE[layout.base])
    return Checkpoint(model, clip, vae, layout.family, str(folder))


# --- standalone VAE ------------------------------------------------------------------------

def load_vae(path, *, device=None, dtype: torch.dtype | None = None, scale_factor: float | None = None) -> VAE:
    """Load a VAE from a standalone file (LDM keys, with or without ``first_stage_model.``, or diffusers
    keys), a diffusers ``vae/`` folder, or the VAE part of a full checkpoint. ``scale_factor`` defaults to
    the folder's config, else 0.18215 (SD 1/2; pass 0.13025 for SDXL's VAE: the weights look the same)."""
    path = Path(path)
    device = torch.device(device) if device is not None else devices.get_device()
    dtype = dtype or devices.vae_dtype(device)
    if path.is_dir():
        scale_factor = scale_factor or _json(path / "config.json").get("scaling_factor")
        path = _weights_file(path)
    with open_state_dict(path) as f:
        keys = list(f.keys())
        prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in keys) else ""
        parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
        sd = {k[len(prefix):]: f.get(k, dtype) for k in keys
              if k.startswith(prefix) and k[len(prefix):].startswith(parts)}
    if any(".down_blocks." in k or ".up_blocks." in k for k in sd):
        sd = diffusers_vae_to_ldm(sd)
    if "encoder.conv_in.weight" not in sd and "decoder.conv_in.weight" not in sd:
        raise CheckpointError(f"{path}: not a VAE: expected keys like 'encoder.conv_in.weight' or "
                              f"'first_stage_model.encoder.conv_in.weight'")
    return _build_vae(sd, scale_factor or 0.18215, device, str(path))


__all__ = ["Checkpoint", "CheckpointError", "DictFile", "detect", "detect_family", "load_checkpoint",
           "load_diffusers", "load_vae"]
