"""The diffusers layout: key renaming between LDM and diffusers names, and diffusers configs.

The UNet and VAE are stored under different names by diffusers (``down_blocks.1.resnets.0``
for LDM's ``input_blocks.4.0``, ...). The correspondence is a table of prefixes built from
the number of levels, res blocks per level and which levels have attention; both directions
use the same table. The VAE's attention projections are 1x1 convs in LDM and Linear layers
in diffusers (same numbers, other shape).

Used by ``load_diffusers`` (diffusers -> LDM) and by the tests and the bench (LDM ->
diffusers, to give diffusers' own models our weights).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from nodeflow.models.unet import UNetConfig, config_from_shapes
from nodeflow.models.vae import VAEConfig

_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
           ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]
_VAE_RESNET = [("nin_shortcut.", "conv_shortcut.")]
_VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
_VAE_ATTN_OLD = [("group_norm.", "norm."), ("query.", "q."), ("key.", "k."), ("value.", "v."),   # older diffusers
                 ("proj_attn.", "proj_out.")]


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _unet_table(levels: int, n: int, attn_down: list[bool], attn_up: list[bool], attn_mid: bool):
    """[(ldm prefix, diffusers prefix, inner renames)], for ``levels`` levels of ``n`` res blocks.
    ``attn_up`` is in diffusers' up-block order (lowest resolution first)."""
    t = [("time_embed.0.", "time_embedding.linear_1.", []), ("time_embed.2.", "time_embedding.linear_2.", []),
         ("label_emb.0.0.", "add_embedding.linear_1.", []), ("label_emb.0.2.", "add_embedding.linear_2.", []),
         ("input_blocks.0.0.", "conv_in.", []), ("out.0.", "conv_norm_out.", []), ("out.2.", "conv_out.", []),
         ("middle_block.0.", "mid_block.resnets.0.", _RESNET)]
    if attn_mid:
        t += [("middle_block.1.", "mid_block.attentions.0.", []), ("middle_block.2.", "mid_block.resnets.1.", _RESNET)]
    else:
        t += [("middle_block.1.", "mid_block.resnets.1.", _RESNET)]
    for i in range(levels):
        for j in range(n):
            k = 1 + i * (n + 1) + j
            t.append((f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}.", _RESNET))
            if attn_down[i]:
                t.append((f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}.", []))
        if i < levels - 1:
            t.append((f"input_blocks.{(i + 1) * (n + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", []))
    for i in range(levels):
        for j in range(n + 1):
            k = i * (n + 1) + j
            t.append((f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}.", _RESNET))
            if attn_up[i]:
                t.append((f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}.", []))
        if i < levels - 1:
            k = i * (n + 1) + n
            t.append((f"output_blocks.{k}.{2 if attn_up[i] else 1}.conv.", f"up_blocks.{i}.upsamplers.0.conv.", []))
    return t


def _rename(sd: Mapping[str, torch.Tensor], table, reverse: bool, what: str) -> dict[str, torch.Tensor]:
    """Rename every key by the longest matching prefix of ``table`` (src -> dst, or dst -> src if reverse)."""
    pairs = [((d, s, [(b, a) for a, b in inner]) if reverse else (s, d, inner)) for s, d, inner in table]
    pairs.sort(key=lambda p: -len(p[0]))
    out = {}
    for key, value in sd.items():
        for src, dst, inner in pairs:
            if key.startswith(src):
                rest = key[len(src):]
                for a, b in inner:
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
                out[dst + rest] = value
                break
        else:
            raise ValueError(f"{what}: no counterpart for key {key!r}")
    return out


def ldm_unet_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM UNet keys (no ``model.diffusion_model.``) -> ``UNet2DConditionModel`` keys."""
    cfg = config_from_shapes({k: v.shape for k, v in sd.items()})
    n = _uniform(cfg.num_res_blocks)
    levels = len(cfg.channel_mult)
    attn_down = [cfg.transformer_depth[i * n] > 0 for i in range(levels)]
    attn_up = [cfg.transformer_depth_output[i * (n + 1)] > 0 for i in range(levels)]
    table = _unet_table(levels, n, attn_down, attn_up, cfg.transformer_depth_middle > 0)
    return _rename(sd, table, reverse=False, what="LDM UNet")


def diffusers_unet_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``UNet2DConditionModel`` keys -> LDM UNet keys (no ``model.diffusion_model.``)."""
    keys = list(sd)
    levels = _count(keys, r"down_blocks\.(\d+)\.")
    n = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    attn_down = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(levels)]
    attn_up = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) for i in range(levels)]
    attn_mid = any(k.startswith("mid_block.attentions.") for k in keys)
    table = _unet_table(levels, n, attn_down, attn_up, attn_mid)
    return _rename(sd, table, reverse=True, what="diffusers UNet")


def _vae_table(levels: int):
    t = [("encoder.norm_out.", "encoder.conv_norm_out.", []), ("decoder.norm_out.", "decoder.conv_norm_out.", []),
         ("encoder.conv_in.", "encoder.conv_in.", []), ("encoder.conv_out.", "encoder.conv_out.", []),
         ("decoder.conv_in.", "decoder.conv_in.", []), ("decoder.conv_out.", "decoder.conv_out.", []),
         ("quant_conv.", "quant_conv.", []), ("post_quant_conv.", "post_quant_conv.", [])]
    for part in ("encoder", "decoder"):
        t += [(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", _VAE_RESNET),
              (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _VAE_ATTN),
              (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", _VAE_RESNET)]
    for i in range(levels):
        t += [(f"encoder.down.{i}.block.", f"encoder.down_blocks.{i}.resnets.", []),
              (f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.", []),
              (f"decoder.up.{levels - 1 - i}.block.", f"decoder.up_blocks.{i}.resnets.", []),
              (f"decoder.up.{levels - 1 - i}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv.", [])]
    return t


def _vae_shortcut(sd: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    return {(k.replace(src, dst) if ".block." in k or ".resnets." in k else k): v for k, v in sd.items()}


def ldm_vae_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM VAE keys (no ``first_stage_model.``) -> diffusers ``AutoencoderKL`` keys."""
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    out = _vae_shortcut(_rename(sd, _vae_table(levels), reverse=False, what="LDM VAE"), "nin_shortcut", "conv_shortcut")
    return {k: (v.reshape(v.shape[:2]) if ".attentions." in k and k.endswith("weight") and v.ndim == 4 else v)
            for k, v in out.items()}


def diffusers_vae_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys (also the older query/key/value names) -> LDM VAE keys."""
    fixed = {}
    for k, v in sd.items():
        if ".attentions." in k:
            head, _, rest = k.partition(".attentions.0.")
            for a, b in _VAE_ATTN_OLD:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            k = f"{head}.attentions.0.{rest}"
        fixed[k] = v
    levels = _count(fixed, r"encoder\.down_blocks\.(\d+)\.")
    out = _vae_shortcut(_rename(fixed, _vae_table(levels), reverse=True, what="diffusers VAE"),
                        "conv_shortcut", "nin_shortcut")
    return {k: (v.reshape(*v.shape, 1, 1) if ".attn_1." in k and k.endswith("weight") and v.ndim == 2 else v)
            for k, v in out.items()}


def _uniform(values) -> int:
    if len(set(values)) != 1:
        raise ValueError(f"the diffusers layout needs the same number of res blocks per level, got {values}")
    return values[0]


# --- configs ---------------------------------------------------------------------------------

def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """``UNet2DConditionModel`` config of the same architecture (SD 1/2, SDXL base and refiner shapes)."""
    n = _uniform(cfg.num_res_blocks)
    levels = len(cfg.channel_mult)
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    depth = [cfg.transformer_depth[i * n] for i in range(levels)]
    layers = [d or 1 for d in depth]
    if not depth[-1]:
        layers[-1] = max(cfg.transformer_depth_middle, 1)
    elif cfg.transformer_depth_middle != depth[-1]:
        raise ValueError("diffusers' mid block has the depth of the last level")
    heads = [cfg.heads(w)[0] for w in widths]
    config = {
        "_class_name": "UNet2DConditionModel", "sample_size": 64,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
        "block_out_channels": widths, "layers_per_block": n,
        "transformer_layers_per_block": layers,
        "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,   # diffusers: this is the head count
        "use_linear_projection": cfg.use_linear_in_transformer,
        "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
        "downsample_padding": 1, "act_fn": "silu", "center_input_sample": False, "upcast_attention": False,
    }
    if cfg.adm_in_channels:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return config


def diffusers_vae_config(cfg: VAEConfig, scaling_factor: float = 0.18215) -> dict:
    """Diffusers ``AutoencoderKL`` config of the same architecture."""
    levels = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512,
        "scaling_factor": scaling_factor,
    }
