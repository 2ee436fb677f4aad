"""CLIP image encoders (CLIP_VISION): OpenAI ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14, run as
transformers' ``CLIPVisionModelWithProjection``.

Files come in transformers' layout (``vision_model.*``, ``visual_projection.weight``; ComfyUI's
``clip_vision_g.safetensors``, the IP-Adapter encoders) or OpenCLIP's (``visual.*`` in
``open_clip_pytorch_model.bin``; ``embedder.model.visual.*`` inside SD 2.1 unCLIP checkpoints),
converted on load. The tower is told by its depth as ComfyUI tells it (a 48th layer: bigG, a
31st: H, a 23rd: L, which alone uses quick-GELU); widths, patch and image size come from the
weights, heads are 16.

``encode(image, crop)`` preprocesses as ComfyUI's ``clip_preprocess``: with ``crop`` the short
side is scaled to 224 (bicubic, antialiased) and the centre cut out, else the image is squashed
to 224²; values are rounded to 8 bits, then normalised with CLIP's mean and std. The output has
ComfyUI's fields: ``image_embeds`` (projected pooled output), ``last_hidden_state`` (the last
layer, before the final norm) and ``penultimate_hidden_states``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nodeflow.models import devices
from nodeflow.models.files import CheckpointError, assign_weights, open_state_dict

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TOWERS = {48: ("ViT-bigG/14", "gelu"), 31: ("ViT-H/14", "gelu"), 23: ("ViT-L/14", "quick_gelu")}   # min layers


@dataclass
class ClipVisionOutput:
    """CLIP_VISION_OUTPUT; readable as attributes or ``output["image_embeds"]`` (as ComfyUI's)."""
    last_hidden_state: torch.Tensor
    penultimate_hidden_states: torch.Tensor
    image_embeds: torch.Tensor
    mm_projected: torch.Tensor | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)


def preprocess(image: torch.Tensor, size: int = 224, crop: bool = True) -> torch.Tensor:
    """IMAGE (B, H, W, C) in 0..1 -> normalised pixel values (B, 3, size, size)."""
    image = image[..., :3].movedim(-1, 1)
    if image.shape[2] != size or image.shape[3] != size:
        if crop:
            scale = size / min(image.shape[2], image.shape[3])
            target = (round(scale * image.shape[2]), round(scale * image.shape[3]))
        else:
            target = (size, size)
        image = F.interpolate(image, size=target, mode="bicubic", antialias=True)
        top, left = (image.shape[2] - size) // 2, (image.shape[3] - size) // 2
        image = image[:, :, top:top + size, left:left + size]
    image = torch.clip(255.0 * image, 0, 255).round() / 255.0
    mean = torch.tensor(MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean) / std


def openclip_visual_to_hf(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP ``VisionTransformer`` keys under ``prefix`` -> transformers' vision keys."""
    out: dict[str, torch.Tensor] = {}
    names = {"class_embedding": "vision_model.embeddings.class_embedding",
             "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
             "ln_post.weight": "vision_model.post_layernorm.weight", "ln_post.bias": "vision_model.post_layernorm.bias"}
    block = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
             ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))
    for key, t in sd.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key in names:
            out[names[key]] = t
        elif key == "proj":
            out["visual_projection.weight"] = t.T.contiguous()                # x @ W  ->  Linear(W.T)
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.*)$", key):
            layer, rest = f"vision_model.encoder.layers.{m.group(1)}.", m.group(2)
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}.{kind}"] = part
            else:
                for a, b in block:
                    if rest.startswith(a):
                        out[layer + b + rest[len(a):]] = t
                        break
    return out


def vision_config(shapes: dict[str, tuple], where: str):
    """A ``CLIPVisionConfig`` read from transformers-layout shapes."""
    from transformers import CLIPVisionConfig

    layers = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))),
                     default=-1)
    tower = next((TOWERS[n] for n in sorted(TOWERS, reverse=True) if layers >= n), None)
    if tower is None or "vision_model.embeddings.patch_embedding.weight" not in shapes:
        raise CheckpointError(f"{where}: not a CLIP vision model of a known layout (ViT-L/14, ViT-H/14 or "
                              f"ViT-bigG/14 in transformers' 'vision_model.*' or OpenCLIP's 'visual.*' keys; found "
                              f"{layers} encoder layers)")
    width, _, patch, _ = shapes["vision_model.embeddings.patch_embedding.weight"]
    positions = shapes["vision_model.embeddings.position_embedding.weight"][0]
    side = math.isqrt(positions - 1)
    projection = shapes.get("visual_projection.weight", (width,))[0]
    return tower[0], CLIPVisionConfig(
        hidden_size=width, intermediate_size=shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=layers, num_attention_heads=16, num_channels=3, image_size=side * patch, patch_size=patch,
        hidden_act=tower[1], layer_norm_eps=1e-5, projection_dim=projection, attn_implementation="sdpa")


class ClipVision:
    """A CLIP image encoder handle (CLIP_VISION)."""

    def __init__(self, model, name: str, tower: str, device=None):
        self.model, self.name, self.tower = model, name, tower
        self.device = torch.device(device) if device is not None else devices.get_device()
        self.image_size = model.config.image_size

    @torch.no_grad()
    def encode(self, image: torch.Tensor, crop: bool = True) -> ClipVisionOutput:
        devices.model_manager().load(self.model, self.device)
        dtype = next(self.model.parameters()).dtype
        pixels = preprocess(image.float().to(self.device), self.image_size, crop)
        out = self.model(pixel_values=pixels.to(dtype), output_hidden_states=True)
        return ClipVisionOutput(last_hidden_state=out.last_hidden_state.float().cpu(),
                                penultimate_hidden_states=out.hidden_states[-2].float().cpu(),
                                image_embeds=out.image_embeds.float().cpu())


def build_clip_vision(sd: dict[str, torch.Tensor], where: str, device=None, dtype=None) -> ClipVision:
    """A ClipVision from a transformers- or OpenCLIP-layout state dict (OpenCLIP keys under
    ``visual.`` or ``embedder.model.visual.``)."""
    from transformers import CLIPVisionModelWithProjection

    for prefix in ("embedder.model.visual.", "visual."):
        if f"{prefix}transformer.resblocks.0.attn.in_proj_weight" in sd:
            sd = openclip_visual_to_hf(sd, prefix)
            break
    sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))
          and not k.endswith("position_ids")}
    tower, config = vision_config({k: tuple(v.shape) for k, v in sd.items()}, where)
    device = torch.device(device) if device is not None else devices.get_device()
    dtype = dtype or devices.compute_dtype(device)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    if "visual_projection.weight" not in sd:
        raise CheckpointError(f"{where}: the CLIP vision model has no projection ('visual_projection.weight' or "
                              "OpenCLIP's 'proj'): its image embeddings cannot be made")
    assign_weights(model, {k: v.to(dtype) for k, v in sd.items()}, f"CLIP vision model in {where}")
    model.vision_model.embeddings.position_ids = torch.arange(
        model.vision_model.embeddings.num_positions).expand(1, -1)                         # non-persistent
    return ClipVision(model, Path(where).name, tower, device)


VISION_PREFIXES = ("vision_model.", "visual_projection.", "visual.", "embedder.model.visual.")


def load_clip_vision(path, *, device=None, dtype=None) -> ClipVision:
    """A CLIP vision file, or the image encoder inside a checkpoint (SD 2.1 unCLIP's)."""
    with open_state_dict(path) as f:
        sd = {k: f.get(k) for k in list(f.keys()) if k.startswith(VISION_PREFIXES)}
    return build_clip_vision(sd, str(path), device, dtype)
