"""Tiny random checkpoints in the real layouts, for tests (this package's and the nodes').

Same key names and structure as real SD 1.x / SD 2.x / SDXL / refiner / inpainting files and
diffusers folders, at tiny widths (UNet width 32, CLIP width 32 / 128, 3 layers), so that they
load through exactly the code real checkpoints do, in well under a second::

    from nodeflow.models.testing import write_tiny_sd1
    path = write_tiny_sd1(tmp_path / "tiny.safetensors")          # or .ckpt
    ckpt = load_checkpoint(path)                                   # ckpt.family == "sd1"

Weights are random but deterministic (``seed``); every tensor is non-trivial (norm scales
around 1, biases around 0) so that a misplaced weight shows in outputs. The tiny VAE keeps
the real 8x downscale. The text towers keep the real 49408-token vocabulary and 77 positions.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from nodeflow.models.unet import UNet, UNetConfig
from nodeflow.models.vae import AutoencoderKL, VAEConfig

# tiny text towers: real CLIP-L is (768, 12, 3072), ViT-H (1024, 24, 4096), bigG (1280, 32, 5120)
CLIP_L = {"width": 32, "layers": 3, "intermediate": 64}
OPENCLIP_H = {"width": 128, "layers": 3, "intermediate": 256, "projection": 128}
OPENCLIP_G = {"width": 128, "layers": 3, "intermediate": 256, "projection": 128}
VOCAB, POSITIONS = 49408, 77
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)


def tiny_unet_config(family: str = "sd1", inpaint: bool = False) -> UNetConfig:
    """The tiny UNet of a family: the real one's structure (levels with/without attention, depths,
    linear projections, label embedding) at width 32 with three levels."""
    common = dict(in_channels=9 if inpaint else 4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2))
    if family == "sd1":      # real: 320, (1,2,4,4), attention on the first three levels, 8 heads, context 768
        return UNetConfig(**common, transformer_depth=(1, 1, 1, 1, 0, 0), transformer_depth_middle=1,
                          transformer_depth_output=(0, 0, 0, 1, 1, 1, 1, 1, 1), context_dim=CLIP_L["width"],
                          num_heads=8)
    if family == "sd2":      # as SD1 with linear projections, 64-wide heads, context 1024
        return UNetConfig(**common, transformer_depth=(1, 1, 1, 1, 0, 0), transformer_depth_middle=1,
                          transformer_depth_output=(0, 0, 0, 1, 1, 1, 1, 1, 1), context_dim=OPENCLIP_H["width"],
                          use_linear_in_transformer=True, num_head_channels=64)
    if family == "sdxl":     # real: 320, (1,2,4), depths (0, 2, 10), context 2048, adm 2816
        return UNetConfig(**common, transformer_depth=(0, 0, 1, 1, 2, 2), transformer_depth_middle=2,
                          transformer_depth_output=(2, 2, 2, 1, 1, 1, 0, 0, 0),
                          context_dim=CLIP_L["width"] + OPENCLIP_G["width"], use_linear_in_transformer=True,
                          adm_in_channels=OPENCLIP_G["projection"] + 6 * 256, num_head_channels=64)
    if family == "sdxl_refiner":  # real: 384, (1,2,4,4), depths (0, 4, 4, 0), context 1280, adm 2560
        return UNetConfig(**common, transformer_depth=(0, 0, 1, 1, 0, 0), transformer_depth_middle=1,
                          transformer_depth_output=(0, 0, 0, 1, 1, 1, 0, 0, 0), context_dim=OPENCLIP_G["width"],
                          use_linear_in_transformer=True, adm_in_channels=OPENCLIP_G["projection"] + 5 * 256,
                          num_head_channels=64)
    raise ValueError(f"unknown family {family!r}")


def micro_unet(levels: int = 2, adm: int = 0, seed: int = 0) -> UNet:
    """A random UNet smaller still than the tiny families' (one ResBlock per level, attention on
    the first, context width 32; a label embedding of width ``adm`` when given): Dynamo traces it
    in a second or two, for tests that compile."""
    depth = (1,) + (0,) * (levels - 1)
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2)[:levels], num_res_blocks=(1,) * levels,
                     transformer_depth=depth, transformer_depth_middle=0,
                     transformer_depth_output=tuple(d for d in depth[::-1] for _ in range(2)),
                     context_dim=32, num_heads=2, adm_in_channels=adm)
    torch.manual_seed(seed)
    return UNet(cfg).eval().requires_grad_(False)


def random_tensors(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random tensors: matrices/kernels ~ N(0, 1/fan_in), 1-D weights ~ 1 + N(0, 0.01),
    biases and scalars ~ N(0, 0.01)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            t *= math.prod(shape[1:]) ** -0.5
        elif key.endswith("weight"):
            t = 1 + 0.1 * t
        else:
            t *= 0.1
        out[key] = t
    return out


def _shapes(module_fn) -> dict[str, tuple]:
    with torch.device("meta"):
        module = module_fn()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def clip_l_shapes(width: int, layers: int, intermediate: int) -> dict[str, tuple]:
    """transformers-layout CLIP text model shapes, keys ``text_model.*`` as real files store them."""
    d, i = width, intermediate
    shapes = {"text_model.embeddings.token_embedding.weight": (VOCAB, d),
              "text_model.embeddings.position_embedding.weight": (POSITIONS, d)}
    for n in range(layers):
        p = f"text_model.encoder.layers.{n}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"], shapes[f"{p}self_attn.{proj}.bias"] = (d, d), (d,)
        shapes.update({f"{p}layer_norm1.weight": (d,), f"{p}layer_norm1.bias": (d,),
                       f"{p}mlp.fc1.weight": (i, d), f"{p}mlp.fc1.bias": (i,),
                       f"{p}mlp.fc2.weight": (d, i), f"{p}mlp.fc2.bias": (d,),
                       f"{p}layer_norm2.weight": (d,), f"{p}layer_norm2.bias": (d,)})
    shapes.update({"text_model.final_layer_norm.weight": (d,), "text_model.final_layer_norm.bias": (d,)})
    return shapes


def openclip_shapes(width: int, layers: int, intermediate: int, projection: int) -> dict[str, tuple]:
    """OpenCLIP text tower shapes (``cond_stage_model.model.*`` / ``conditioner.embedders.N.model.*``)."""
    d, i = width, intermediate
    shapes = {"positional_embedding": (POSITIONS, d), "text_projection": (d, projection),
              "token_embedding.weight": (VOCAB, d), "logit_scale": ()}
    for n in range(layers):
        p = f"transformer.resblocks.{n}."
        shapes.update({f"{p}ln_1.weight": (d,), f"{p}ln_1.bias": (d,),
                       f"{p}attn.in_proj_weight": (3 * d, d), f"{p}attn.in_proj_bias": (3 * d,),
                       f"{p}attn.out_proj.weight": (d, d), f"{p}attn.out_proj.bias": (d,),
                       f"{p}ln_2.weight": (d,), f"{p}ln_2.bias": (d,),
                       f"{p}mlp.c_fc.weight": (i, d), f"{p}mlp.c_fc.bias": (i,),
                       f"{p}mlp.c_proj.weight": (d, i), f"{p}mlp.c_proj.bias": (d,)})
    shapes.update({"ln_final.weight": (d,), "ln_final.bias": (d,)})
    return shapes


def _prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def tiny_state_dict(family: str = "sd1", *, inpaint: bool = False, v_prediction: bool = False, seed: int = 0,
                    legacy_clip_keys: bool = False) -> dict[str, torch.Tensor]:
    """A whole tiny single-file checkpoint of ``family`` ("sd1", "sd2", "sdxl", "sdxl_refiner") in LDM layout.
    ``v_prediction`` (SD2) sets the statistic that marks v models; ``legacy_clip_keys`` (SD1) leaves out
    ``text_model.`` as older files do."""
    cfg = tiny_unet_config(family, inpaint)
    sd = _prefixed("model.diffusion_model.", random_tensors(_shapes(lambda: UNet(cfg)), seed))
    sd.update(_prefixed("first_stage_model.", random_tensors(_shapes(lambda: AutoencoderKL(TINY_VAE)), seed + 1)))
    if family == "sd1":
        clip = random_tensors(clip_l_shapes(**CLIP_L), seed + 2)
        clip["text_model.embeddings.position_ids"] = torch.arange(POSITIONS)[None]   # older transformers saved it
        if legacy_clip_keys:
            clip = {k[len("text_model."):]: v for k, v in clip.items()}
        sd.update(_prefixed("cond_stage_model.transformer.", clip))
    elif family == "sd2":
        sd.update(_prefixed("cond_stage_model.model.", random_tensors(openclip_shapes(**OPENCLIP_H), seed + 2)))
        key = "model.diffusion_model.output_blocks.8.1.transformer_blocks.0.norm1.bias"
        g = torch.Generator().manual_seed(seed + 3)
        sd[key] = torch.randn(sd[key].shape, generator=g) * (0.2 if v_prediction else 0.02)
    elif family == "sdxl":
        sd.update(_prefixed("conditioner.embedders.0.transformer.", random_tensors(clip_l_shapes(**CLIP_L), seed + 2)))
        sd.update(_prefixed("conditioner.embedders.1.model.", random_tensors(openclip_shapes(**OPENCLIP_G), seed + 3)))
    elif family == "sdxl_refiner":
        sd.update(_prefixed("conditioner.embedders.0.model.", random_tensors(openclip_shapes(**OPENCLIP_G), seed + 3)))
    return sd


def save(sd: dict[str, torch.Tensor], path, dtype: torch.dtype | None = None) -> Path:
    """Save a state dict: ``.safetensors`` as is, ``.ckpt``/``.pt`` as ``{"state_dict": sd}`` (LDM style)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    sd = {k: v.contiguous() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 0}, path)
    return path


def write_tiny_sd1(path, inpaint: bool = False, **kw) -> Path:
    """A tiny SD 1.x checkpoint (9-channel inpainting UNet if ``inpaint``); format by suffix."""
    return save(tiny_state_dict("sd1", inpaint=inpaint, **kw), path)


def write_tiny_sd2(path, v_prediction: bool = False, inpaint: bool = False, **kw) -> Path:
    """A tiny SD 2.x checkpoint (OpenCLIP text tower); ``v_prediction`` marks it as a 768-v model."""
    return save(tiny_state_dict("sd2", inpaint=inpaint, v_prediction=v_prediction, **kw), path)


def write_tiny_sdxl(path, inpaint: bool = False, **kw) -> Path:
    """A tiny SDXL base checkpoint (CLIP-L + OpenCLIP bigG, label embedding for pooled text + sizes)."""
    return save(tiny_state_dict("sdxl", inpaint=inpaint, **kw), path)


def write_tiny_sdxl_refiner(path, **kw) -> Path:
    """A tiny SDXL refiner checkpoint (bigG only; sizes + aesthetic score in the label embedding)."""
    return save(tiny_state_dict("sdxl_refiner", **kw), path)


def write_tiny_vae(path, *, diffusers_keys: bool = False, seed: int = 5) -> Path:
    """A tiny standalone VAE file (LDM keys as in ``vae-ft-mse-840000``; or diffusers keys)."""
    from nodeflow.models.diffusers_format import ldm_vae_to_diffusers

    sd = random_tensors(_shapes(lambda: AutoencoderKL(TINY_VAE)), seed)
    return save(ldm_vae_to_diffusers(sd) if diffusers_keys else sd, path)


def _without_last_layer(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers-layout text tower without its last encoder layer, as diffusers stores SD 2.x's."""
    last = max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    return {k: v for k, v in sd.items() if not k.startswith(f"text_model.encoder.layers.{last}.")}


def write_tiny_diffusers(folder, family: str = "sd1", *, seed: int = 0, v_prediction: bool = False) -> Path:
    """A tiny diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
    ``text_encoder_2/`` for SDXL, tokenizers, scheduler), with the weights of ``tiny_state_dict(family)``.
    As in real SD 2.x folders, the SD 2.x ``text_encoder`` lacks OpenCLIP's last layer."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig

    from nodeflow.models.clip import openclip_to_hf
    from nodeflow.models.diffusers_format import (
        diffusers_unet_config,
        diffusers_vae_config,
        ldm_unet_to_diffusers,
        ldm_vae_to_diffusers,
    )
    from nodeflow.models.tokenizer import write_vocab_files

    folder = Path(folder)
    sd = tiny_state_dict(family, seed=seed, v_prediction=v_prediction)

    def part(prefix):
        return {k[len(prefix):]: v.contiguous() for k, v in sd.items() if k.startswith(prefix)}

    def write(sub, config, tensors, name="diffusion_pytorch_model.safetensors"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps({**config, "_diffusers_version": "0.27.0"}, indent=1))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / sub / name))

    def text_config(tensors, act, cls):
        d = tensors["text_model.embeddings.token_embedding.weight"].shape[1]
        cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=d, num_attention_heads=max(1, d // 64),
                             num_hidden_layers=sum(k.endswith("mlp.fc1.weight") for k in tensors),
                             intermediate_size=tensors["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                             max_position_embeddings=POSITIONS, hidden_act=act, bos_token_id=49406, eos_token_id=49407,
                             projection_dim=tensors.get("text_projection.weight", torch.empty(d, 1)).shape[0])
        return {**cfg.to_dict(), "architectures": [cls]}

    unet = part("model.diffusion_model.")
    from nodeflow.models.unet import config_from_shapes
    unet_cfg = config_from_shapes({k: v.shape for k, v in unet.items()},
                                  **({"num_heads": 8} if family == "sd1" else {"num_head_channels": 64}))
    write("unet", diffusers_unet_config(unet_cfg), ldm_unet_to_diffusers(unet))
    scale = 0.13025 if family.startswith("sdxl") else 0.18215
    write("vae", diffusers_vae_config(TINY_VAE, scale), ldm_vae_to_diffusers(part("first_stage_model.")))
    index = {"_class_name": "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline",
             "_diffusers_version": "0.27.0", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    if family == "sd1":
        encoders = [("text_encoder", "tokenizer", part("cond_stage_model.transformer."), "quick_gelu", "CLIPTextModel")]
    elif family == "sd2":          # diffusers drops OpenCLIP's last layer (23 of ViT-H's 24; here 2 of 3)
        encoders = [("text_encoder", "tokenizer", _without_last_layer(openclip_to_hf(part("cond_stage_model.model."))),
                     "gelu", "CLIPTextModel")]
    elif family == "sdxl":
        encoders = [("text_encoder", "tokenizer", part("conditioner.embedders.0.transformer."), "quick_gelu",
                     "CLIPTextModel"),
                    ("text_encoder_2", "tokenizer_2", openclip_to_hf(part("conditioner.embedders.1.model.")), "gelu",
                     "CLIPTextModelWithProjection")]
    else:
        raise ValueError(f"write_tiny_diffusers: unsupported family {family!r}")
    for sub, tok, tensors, act, cls in encoders:
        tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
        if cls == "CLIPTextModel":
            tensors.pop("text_projection.weight", None)
        write(sub, text_config(tensors, act, cls), tensors, "model.safetensors")
        write_vocab_files(folder / tok)
        index[sub], index[tok] = ["transformers", cls], ["transformers", "CLIPTokenizer"]
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction" if v_prediction else "epsilon"}, indent=1))
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


# --- ControlNets and T2I-Adapters ------------------------------------------------------------------

def tiny_controlnet_state_dict(family: str = "sd1", *, seed: int = 10, hint_channels: int = 3) -> dict:
    """A tiny ControlNet for ``tiny_unet_config(family)`` in LDM key names (no prefix)."""
    from nodeflow.models.controlnet import ControlNet

    cfg = tiny_unet_config(family)
    return random_tensors(_shapes(lambda: ControlNet(cfg, hint_channels)), seed)


def write_tiny_controlnet(path, family: str = "sd1", *, layout: str = "ldm", seed: int = 10,
                          diff_of: dict | None = None) -> Path:
    """A tiny ControlNet file. ``layout``: "ldm" (``control_model.*``, as the control_v11 files),
    "bare" (no prefix), "diffusers" (``ControlNetModel`` keys) or "diff" (``control_model.*`` as
    differences from ``diff_of``, the UNet's LDM state dict, plus the ``difference`` key)."""
    from nodeflow.models.controlnet import ldm_to_diffusers

    sd = tiny_controlnet_state_dict(family, seed=seed)
    if layout == "diffusers":
        sd = ldm_to_diffusers(sd)
    elif layout == "bare":
        pass
    elif layout in ("ldm", "diff"):
        if layout == "diff":
            sd = {k: v - diff_of[k] if k in diff_of and diff_of[k].shape == v.shape else v for k, v in sd.items()}
        sd = _prefixed("control_model.", sd)
        if layout == "diff":
            sd["difference"] = torch.tensor([])
    else:
        raise ValueError(f"unknown ControlNet layout {layout!r}")
    return save(sd, path)


def tiny_adapter_state_dict(kind: str = "full", *, seed: int = 20, width: int = 32, hint_channels: int = 3) -> dict:
    """A tiny T2I-Adapter whose features fit the tiny UNets: "full" (SD 1.x, 2 ResnetBlocks per
    level, conv downsampling), "light" (SD 1.x), "xl" (SDXL: unshuffle 16). Widths per level:
    ``width`` × (1, 2, 2, 2), as the tiny UNets' (1, 2, 2)."""
    from nodeflow.models.t2i_adapter import Adapter, AdapterLight

    widths = [width, 2 * width, 2 * width, 2 * width]
    if kind == "light":
        shapes = _shapes(lambda: AdapterLight(hint_channels * 64, widths, [w // 4 for w in widths], 4))
    elif kind in ("full", "xl"):
        xl = kind == "xl"
        cin = hint_channels * (256 if xl else 64)
        shapes = _shapes(lambda: Adapter(cin, widths, 2, 1 if xl else 3, use_conv=not xl, xl=xl))
    else:
        raise ValueError(f"unknown adapter kind {kind!r}")
    return random_tensors(shapes, seed)


def write_tiny_adapter(path, kind: str = "full", *, diffusers_keys: bool = False, **kw) -> Path:
    """A tiny T2I-Adapter file (TencentARC keys, or diffusers' ``adapter.body.N.resnets.M``)."""
    sd = tiny_adapter_state_dict(kind, **kw)
    if diffusers_keys:
        out = {}
        for key, value in sd.items():
            m = re.match(r"body\.(\d+)\.(.*)$", key)
            if m:
                i, rest = int(m.group(1)), m.group(2)
                level, j = divmod(i, 2)
                if rest.startswith("in_conv."):
                    key = f"adapter.body.{level}.{rest}"
                else:
                    key = f"adapter.body.{level}.resnets.{j}.{rest}"
            else:
                key = "adapter." + key
            out[key] = value
        sd = out
    return save(sd, path)


# --- separate component files (UNETLoader, CLIPLoader) -------------------------------------------------

#: Layer counts that tell the towers apart in a lone text-encoder file (ComfyUI's rule: a 23rd layer
#: means ViT-H, a 31st bigG), at the tiny widths.
TOWER_LAYERS = {"l": CLIP_L["layers"], "h": 24, "g": 32}


def tiny_text_encoder(tower: str, *, seed: int = 30, openclip: bool = True) -> dict[str, torch.Tensor]:
    """A lone tiny text tower: CLIP-L in transformers' layout; ViT-H / bigG in OpenCLIP's (or,
    with ``openclip=False``, transformers' with ``text_projection.weight``), with the layer counts
    of ``TOWER_LAYERS``."""
    from nodeflow.models.clip import openclip_to_hf

    if tower == "l":
        return random_tensors(clip_l_shapes(**CLIP_L), seed)
    dims = dict(OPENCLIP_H if tower == "h" else OPENCLIP_G, layers=TOWER_LAYERS[tower])
    sd = random_tensors(openclip_shapes(**dims), seed)
    return sd if openclip else openclip_to_hf(sd)


def split_checkpoint(family: str, towers: dict[str, dict], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A single-file checkpoint of ``family`` whose text towers are ``towers`` (lone tower state
    dicts as ``tiny_text_encoder`` makes them): what the split files assemble to."""
    sd = {k: v for k, v in tiny_state_dict(family, seed=seed).items()
          if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    prefixes = {"sd1": {"l": "cond_stage_model.transformer."}, "sd2": {"h": "cond_stage_model.model."},
                "sdxl": {"l": "conditioner.embedders.0.transformer.", "g": "conditioner.embedders.1.model."}}[family]
    for tower, tower_sd in towers.items():
        sd.update(_prefixed(prefixes[tower], tower_sd))
    return sd


# --- CLIP vision, unCLIP, GLIGEN ---------------------------------------------------------------------

#: tiny image towers: the real layer counts (which tell L, H and bigG apart), width 32, patch 14, 224²
VISION_LAYERS = {"l": 24, "h": 32, "g": 48}
VISION = {"width": 32, "intermediate": 64, "patch": 14, "positions": 257}


def openclip_visual_shapes(layers: int, projection: int) -> dict[str, tuple]:
    """OpenCLIP ``VisionTransformer`` shapes (``visual.*``), at the tiny width."""
    d, i, p = VISION["width"], VISION["intermediate"], VISION["patch"]
    shapes = {"class_embedding": (d,), "conv1.weight": (d, 3, p, p), "positional_embedding": (VISION["positions"], d),
              "ln_pre.weight": (d,), "ln_pre.bias": (d,), "ln_post.weight": (d,), "ln_post.bias": (d,),
              "proj": (d, projection)}
    for n in range(layers):
        q = f"transformer.resblocks.{n}."
        shapes.update({f"{q}ln_1.weight": (d,), f"{q}ln_1.bias": (d,), f"{q}attn.in_proj_weight": (3 * d, d),
                       f"{q}attn.in_proj_bias": (3 * d,), f"{q}attn.out_proj.weight": (d, d),
                       f"{q}attn.out_proj.bias": (d,), f"{q}ln_2.weight": (d,), f"{q}ln_2.bias": (d,),
                       f"{q}mlp.c_fc.weight": (i, d), f"{q}mlp.c_fc.bias": (i,), f"{q}mlp.c_proj.weight": (d, i),
                       f"{q}mlp.c_proj.bias": (d,)})
    return shapes


def tiny_clip_vision(tower: str = "h", *, projection: int = 32, seed: int = 40, openclip: bool = False) -> dict:
    """A tiny CLIP image encoder: transformers keys (``vision_model.*``), or OpenCLIP's (``visual.*``)."""
    from nodeflow.models.clip_vision import openclip_visual_to_hf

    sd = _prefixed("visual.", random_tensors(openclip_visual_shapes(VISION_LAYERS[tower], projection), seed))
    return sd if openclip else openclip_visual_to_hf(sd, "visual.")


def write_tiny_unclip(path, *, seed: int = 0) -> Path:
    """A tiny SD 2.1 unCLIP checkpoint: SD 2.x with a label embedding for a 32-wide image embedding
    and its noise level, and its image encoder (ViT-H-like) under ``embedder.model.visual.``."""
    from dataclasses import replace

    sd = {k: v for k, v in tiny_state_dict("sd2", seed=seed).items() if not k.startswith("model.diffusion_model.")}
    cfg = replace(tiny_unet_config("sd2"), adm_in_channels=2 * 32)
    sd.update(_prefixed("model.diffusion_model.", random_tensors(_shapes(lambda: UNet(cfg)), seed)))
    visual = tiny_clip_vision("h", projection=32, seed=seed + 7, openclip=True)
    sd.update(_prefixed("embedder.model.", visual))
    return save(sd, path)


def tiny_gligen_state_dict(*, seed: int = 50, prefix: str = "") -> dict[str, torch.Tensor]:
    """A tiny SD 1.x text-box GLIGEN: a fuser in every transformer block of the tiny SD 1.x UNet and
    a position net over CLIP-L's (tiny) pooled width; ``alpha`` gates open."""
    from nodeflow.models.gligen import GatedSelfAttention, PositionNet

    key_dim = CLIP_L["width"]
    unet = UNet(tiny_unet_config("sd1"))
    shapes: dict[str, tuple] = {}
    for name, module in unet.named_modules():
        if name.endswith("transformer_blocks.0"):
            width = module.norm1.normalized_shape[0]
            fuser = _shapes(lambda width=width: GatedSelfAttention(width, key_dim, 8, width // 8))
            shapes.update({f"{prefix}{name}.fuser.{k}": s for k, s in fuser.items()})
    shapes.update(_prefixed("position_net.", _shapes(lambda: PositionNet(key_dim, key_dim))))
    sd = random_tensors(shapes, seed)
    for key in sd:
        if key.endswith(("alpha_attn", "alpha_dense")):
            sd[key] = torch.tensor(0.8)
    return sd
