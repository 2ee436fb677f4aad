"""The Stable Diffusion UNet (SD 1.x, SD 2.x, SDXL), named after the original LDM checkpoint keys.

``UNet(config).load_state_dict(sd)`` takes the keys under ``model.diffusion_model.`` of a
real checkpoint as they are (``strict=True``, no renaming). ``config_from_shapes`` reads
every architecture hyperparameter the weights show (widths, levels, res blocks, transformer
depths, context width, input channels, label embedding); only the attention head layout,
which the weights cannot show, comes from the caller (the family's known config).

``forward`` also takes ControlNet / T2I-Adapter residuals (``control``: lists under "input",
"middle", "output", consumed from the end as ComfyUI's ``apply_control`` does), model
patches (``nodeflow.models.model_patches``) and DeepCache's plan for the step
(``nodeflow.models.step_cache``); without them it is the plain network.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nodeflow.models.model_patches import ModelPatches, replacement

if TYPE_CHECKING:
    from nodeflow.models.step_cache import DeepStep


@dataclass
class UNetConfig:
    in_channels: int = 4                                   # 4; 9 for inpainting (latent + mask + masked latent)
    out_channels: int = 4                                  # channels predicted (ε or v)
    model_channels: int = 320                              # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)           # width of level i = model_channels * channel_mult[i]
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)         # ResBlocks per level going down (one more going up)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 0, 0)   # transformer blocks after each down ResBlock
    transformer_depth_middle: int = 1                      # transformer blocks in the middle block (0 = none)
    transformer_depth_output: tuple[int, ...] = (0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1)  # ... after each up ResBlock
    context_dim: int = 768                                 # width of the text conditioning (cross-attention input)
    use_linear_in_transformer: bool = False                # proj_in/out are Linear (SD2, SDXL), else 1x1 conv (SD1)
    adm_in_channels: int = 0                               # width of SDXL's y vector (pooled text + sizes); 0 = none
    num_heads: int = 8                                     # heads per attention when num_head_channels == -1 (SD1)
    num_head_channels: int = -1                            # width of a head (SD2, SDXL: 64); -1 = fixed num_heads

    def heads(self, channels: int) -> tuple[int, int]:
        """(heads, head width) of a transformer at ``channels``. A head width wider than the
        layer (tiny test models) gives one head."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        heads = max(1, channels // self.num_head_channels)
        return heads, channels // heads


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps, cosines first: (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Identity(),  # 2: dropout
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention of projected q (B, T, h·d) over k, v (B, S, h·d)."""
    B, T, _ = q.shape
    q, k, v = (t.view(B, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, T, -1)                                              # (B, T, heads·d)


class CrossAttention(nn.Module):
    """Multi-head attention of x over ``context`` (itself when None), through SDPA."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                replace=None, info: dict | None = None) -> torch.Tensor:
        """``value`` (default: ``context``) feeds to_v; ``replace(q, k, v, info)`` stands in for the
        attention itself (a model patch)."""
        context = x if context is None else context
        value = context if value is None else value
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(value)
        out = attention(q, k, v, self.heads) if replace is None else replace(q, k, v, info)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))  # 1: dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention over the text, GEGLU feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.heads, self.dim_head = heads, dim_head

    def forward(self, x: torch.Tensor, context: torch.Tensor, patches: ModelPatches | None = None,
                info: dict | None = None) -> torch.Tensor:
        if patches is None:
            x = x + self.attn1(self.norm1(x))
            x = x + self.attn2(self.norm2(x), context)
            return x + self.ff(self.norm3(x))
        return self._patched(x, context, patches, {**info, "n_heads": self.heads, "dim_head": self.dim_head})

    def _patched(self, x, context, patches: ModelPatches, info: dict) -> torch.Tensor:
        """The same block with model patches, in ComfyUI's order: attn1 patches, attn1 (or its
        replacement), attn1 output patches, residual, transformer-middle patches, the same for
        attn2 over the text, then the feed-forward."""
        for which, own_context in (("attn1", None), ("attn2", context)):
            norm, attn = (self.norm1, self.attn1) if which == "attn1" else (self.norm2, self.attn2)
            n, ctx, value = norm(x), own_context, None
            if getattr(patches, which):
                ctx = n if ctx is None else ctx
                value = ctx
                for p in getattr(patches, which):
                    n, ctx, value = p(n, ctx, value, info)
            n = attn(n, ctx, value, replace=replacement(getattr(patches, which + "_replace"), info), info=info)
            for p in getattr(patches, which + "_output"):
                n = p(n, info)
            x = x + n
            if which == "attn1":
                for p in patches.transformer_middle:
                    x = p(x, info)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, patches: ModelPatches | None = None,
                info: dict | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)                  # (B, HW, inner)
        if self.use_linear:
            h = self.proj_in(h)
        for i, block in enumerate(self.transformer_blocks):
            if patches is not None:
                info["block_index"] = i
            h = block(h, context, patches, info)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, -1).permute(0, 3, 1, 2)                   # (B, inner, H, W)
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class Block(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks (LDM's TimestepEmbedSequential)."""

    def forward(self, x, emb, context, size=None, patches: ModelPatches | None = None, info: dict | None = None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, patches, info)
                if info is not None:
                    info["transformer_index"] = info.get("transformer_index", 0) + 1
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def build_encoder(cfg: UNetConfig) -> tuple[nn.Module, nn.ModuleList, Block, list[int]]:
    """The half a UNet and a ControlNet share: (time_embed, input_blocks, middle_block, the
    width of each input block's output)."""
    mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
    time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    input_blocks = nn.ModuleList([Block([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
    widths, ch, depths = [mc], mc, iter(cfg.transformer_depth)
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks[level]):
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, mc * mult)]
            ch = mc * mult
            if (depth := next(depths)) > 0:
                layers.append(_transformer(cfg, ch, depth))
            input_blocks.append(Block(layers))
            widths.append(ch)
        if level != last:
            input_blocks.append(Block([Downsample(ch)]))
            widths.append(ch)
    middle: list[nn.Module] = [ResBlock(ch, emb_dim, ch)]
    if cfg.transformer_depth_middle > 0:
        middle.append(_transformer(cfg, ch, cfg.transformer_depth_middle))
    return time_embed, input_blocks, Block([*middle, ResBlock(ch, emb_dim, ch)]), widths


def _transformer(cfg: UNetConfig, ch: int, depth: int) -> SpatialTransformer:
    heads, dim_head = cfg.heads(ch)
    return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer)


def label_embedding(adm_in_channels: int, emb_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))


def embed(net: nn.Module, timesteps: torch.Tensor, y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The time (and, with a label embedding, y) embedding every ResBlock of ``net`` (a UNet or a
    ControlNet: ``config``, ``time_embed``, ``label_emb``) adds."""
    emb = net.time_embed(timestep_embedding(timesteps, net.config.model_channels).to(dtype))
    if net.config.adm_in_channels:
        if y is None:
            raise ValueError(f"this {type(net).__name__} needs the y vector (SDXL: pooled text + size embeddings; "
                             "unCLIP: image embedding + noise level): is it made for another model?")
        emb = emb + net.label_emb(y.to(dtype))
    return emb


def _add_control(h: torch.Tensor, control: dict | None, where: str) -> torch.Tensor:
    """h plus the next residual of ``control[where]`` (lists consumed from the end, None = none)."""
    if control is None or not control.get(where):
        return h
    residual = control[where].pop()
    if residual is None:
        return h
    if residual.shape[1:] != h.shape[1:]:
        raise ValueError(f"a control residual of shape {tuple(residual.shape)} does not fit the UNet's "
                         f"{where} features {tuple(h.shape)}: the ControlNet or adapter is for another model")
    return h + residual.to(h.dtype)


def _drop_control(control: dict | None, where: str) -> None:
    """Consume the next residual of ``control[where]`` unused (its block does not run)."""
    if control is not None and control.get(where):
        control[where].pop()


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        self.time_embed, self.input_blocks, self.middle_block, skip_channels = build_encoder(cfg)
        if cfg.adm_in_channels:
            self.label_emb = label_embedding(cfg.adm_in_channels, emb_dim)
        ch = skip_channels[-1]
        self.output_blocks = nn.ModuleList()
        depths = iter(cfg.transformer_depth_output)
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                if (depth := next(depths)) > 0:
                    layers.append(_transformer(cfg, ch, depth))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        return embed(self, timesteps, y, dtype)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, control: dict | None = None,
                patches: ModelPatches | None = None, info: dict | None = None,
                deep: DeepStep | None = None) -> torch.Tensor:
        """x (B, in_channels, h, w), timesteps (B,) float, context (B, T, context_dim), y (B, adm).
        ``control``: {"input" | "middle" | "output": [residual or None, ...]}; ``patches`` and
        ``info``: see ``nodeflow.models.model_patches``. ``deep`` (DeepCache): input blocks
        0 … depth and the last depth + 1 output blocks are the shallow part; a full step keeps
        the features entering that part in ``deep.features``, a ``deep.reuse`` step computes
        only the shallow part and takes the rest from there."""
        emb = self.embed(timesteps, y, x.dtype)
        if control is not None:
            control = {k: list(v) for k, v in control.items()}
        if patches is not None and not patches.touches_unet:
            patches = None
        if patches is not None:
            info = {**(info or {}), "original_shape": list(x.shape), "transformer_index": 0}
        inner = patches if patches is not None and patches.touches_attention else None
        reuse = deep is not None and deep.reuse
        depth = len(self.input_blocks) - 1 if deep is None else min(deep.depth, len(self.input_blocks) - 1)
        skips, h = [], x
        for i, block in enumerate(self.input_blocks[:depth + 1] if reuse else self.input_blocks):
            if patches is not None:
                info["block"] = ("input", i)
            h = _add_control(block(h, emb, context, patches=inner, info=info), control, "input")
            for p in patches.input_block if patches is not None else ():
                h = p(h, info)
            skips.append(h)
            for p in patches.input_block_after_skip if patches is not None else ():
                h = p(h, info)
        if not reuse:
            if patches is not None:
                info["block"] = ("middle", 0)
            h = _add_control(self.middle_block(h, emb, context, patches=inner, info=info), control, "middle")
            for p in patches.middle_block if patches is not None else ():
                h = p(h, info)
        shallow = len(self.output_blocks) - 1 - depth              # the first output block of the shallow part
        for i, block in enumerate(self.output_blocks):
            if reuse and i < shallow:                              # deep: its features come from the cache
                _drop_control(control, "output")
                continue
            if deep is not None and i == shallow:
                if reuse:
                    h = deep.features
                else:
                    deep.features = h
            skip = _add_control(skips.pop(), control, "output")
            if patches is not None:
                info["block"] = ("output", i)
                for p in patches.output_block:
                    h, skip = p(h, skip, info)
            h = block(torch.cat([h, skip], dim=1), emb, context, size=skips[-1].shape[-2:] if skips else None,
                      patches=inner, info=info)
        return self.out(h)


# --- architecture from the state dict -------------------------------------------------------

def _depth(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    """Number of transformer blocks of the SpatialTransformer at ``prefix`` (0 if there is none):
    one past the highest block index among its keys, so a block missing a weight still counts."""
    pattern = re.compile(re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.")
    found = [int(m.group(1)) for k in shapes if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def config_from_shapes(shapes: Mapping[str, Sequence[int]], *, num_heads: int = 8,
                       num_head_channels: int = -1) -> UNetConfig:
    """The UNet's architecture read from its state dict (keys without ``model.diffusion_model.``,
    values: shapes or tensors). Head layout from the caller: SD1 uses 8 heads, SD2/SDXL 64-wide heads.
    A key the architecture cannot be read without raises ``ValueError`` naming it."""
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in shapes.items()}
    try:
        return _config_from_shapes(shapes, num_heads, num_head_channels)
    except KeyError as e:
        raise ValueError(f"missing key {e.args[0]!r}") from None


def _config_from_shapes(shapes: dict[str, tuple[int, ...]], num_heads: int, num_head_channels: int) -> UNetConfig:
    mc, in_channels = shapes["input_blocks.0.0.weight"][:2]
    # a ControlNet is the encoder half: no output blocks, no "out"
    out_channels = shapes["out.2.weight"][0] if "out.2.weight" in shapes or "zero_convs.0.0.weight" not in shapes \
        else in_channels
    n_input = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"input_blocks\.(\d+)\.", k)))

    channel_mult, num_res_blocks, depth = [], [0], []
    for k in range(1, n_input):
        if any(key.startswith(f"input_blocks.{k}.0.op.") for key in shapes):   # a Downsample closes the level
            num_res_blocks.append(0)
            continue
        if num_res_blocks[-1] == 0:
            width = shapes[f"input_blocks.{k}.0.out_layers.3.weight"][0]
            if width % mc:
                raise ValueError(f"level width {width} is not a multiple of model_channels {mc}")
            channel_mult.append(width // mc)
        num_res_blocks[-1] += 1
        depth.append(_depth(shapes, f"input_blocks.{k}.1"))
    n_output = sum(n + 1 for n in num_res_blocks)
    depth_output = [_depth(shapes, f"output_blocks.{k}.1") for k in range(n_output)]

    context = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), 0)
    use_linear = any(len(s) == 2 for k, s in shapes.items() if k.endswith("proj_in.weight"))
    adm = shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else 0
    return UNetConfig(
        in_channels=in_channels, out_channels=out_channels, model_channels=mc,
        channel_mult=tuple(channel_mult), num_res_blocks=tuple(num_res_blocks),
        transformer_depth=tuple(depth), transformer_depth_middle=_depth(shapes, "middle_block.1"),
        transformer_depth_output=tuple(depth_output), context_dim=context, use_linear_in_transformer=use_linear,
        adm_in_channels=adm, num_heads=num_heads, num_head_channels=num_head_channels)
