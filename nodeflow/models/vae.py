"""AutoencoderKL (the SD / SDXL VAE), named after the original LDM keys, and the VAE handle.

``AutoencoderKL(config).load_state_dict(sd)`` takes the keys under ``first_stage_model.``
of a real checkpoint (or a standalone VAE file) as they are. ``config_from_shapes`` reads
the architecture from them. LATENT values between nodes are raw VAE latents (ComfyUI's
convention): the family's scale factor (0.18215 SD 1/2, 0.13025 SDXL) is applied by the
diffusion model, and ``VAE.scale_factor`` only reports it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nodeflow.models import compiled, devices

log = logging.getLogger(__name__)

# torch.OutOfMemoryError is torch >= 2.5; torch.cuda.OutOfMemoryError (>= 1.13) is the same class there
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class VAEConfig:
    in_channels: int = 3                        # image channels in
    out_ch: int = 3                             # image channels out
    ch: int = 128                               # width of the first level
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)     # width of level i = ch * ch_mult[i]; 2**(levels-1) = downscale
    num_res_blocks: int = 2                     # ResnetBlocks per encoder level (the decoder has one more)
    z_channels: int = 4                         # latent channels
    embed_dim: int = 4                          # channels after quant_conv (= z_channels in SD)


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3)
                   for conv in (self.q, self.k, self.v))                           # (B, 1, HW, C): one head
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))                       # asymmetric pad, as in LDM


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, width in enumerate(widths):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(ch, width))
                ch = width
            if i != len(widths) - 1:
                level.downsample = Downsample(ch)
            self.down.append(level)
        self.mid = Mid(ch)
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch)
        levels = []
        for i, width in reversed(list(enumerate(widths))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(ch, width))
                ch = width
            if i != 0:
                level.upsample = Upsample(ch)
            levels.insert(0, level)                                    # up[0] is the full-resolution level
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in -1..1 (B, 3, H, W) -> the posterior's mean (B, embed_dim, H/8, W/8)."""
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : self.config.embed_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, embed_dim, h, w) -> image in about -1..1 (B, 3, 8h, 8w)."""
        return self.decoder(self.post_quant_conv(z))


def config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> VAEConfig:
    """The VAE architecture read from its state dict (LDM keys, no ``first_stage_model.``). A key the
    architecture cannot be read without raises ``ValueError`` naming it."""
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in shapes.items()}

    def count(pattern: str, example: str) -> int:
        found = [int(m.group(1)) for k in shapes if (m := re.match(pattern, k))]
        if not found:
            raise KeyError(example)
        return max(found) + 1

    try:
        ch, in_channels = shapes["encoder.conv_in.weight"][:2]
        levels = count(r"encoder\.down\.(\d+)\.", "encoder.down.0.block.0.conv1.weight")
        ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
        num_res_blocks = count(r"encoder\.down\.0\.block\.(\d+)\.", "encoder.down.0.block.0.conv1.weight")
        return VAEConfig(in_channels=in_channels, out_ch=shapes["decoder.conv_out.weight"][0], ch=ch,
                         ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                         z_channels=shapes["decoder.conv_in.weight"][1],
                         embed_dim=shapes["post_quant_conv.weight"][1])
    except KeyError as e:
        raise ValueError(f"missing key {e.args[0]!r}") from None


# --- the handle -----------------------------------------------------------------------------

def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    return sorted({*range(0, size - tile, stride), size - tile})


def _ramp(n: int, fade: int) -> torch.Tensor:
    """1-D blend weights: rising over ``fade`` samples at both ends, 1 in between."""
    i = torch.arange(n, dtype=torch.float32)
    return (torch.minimum(i + 1, n - i) / (fade + 1)).clamp(max=1.0)


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
          scale: float, out_channels: int) -> torch.Tensor:
    """Run ``fn`` on overlapping ``tile``-sized tiles of ``x`` (B, C, H, W) and blend the results
    (each ``scale`` times the tile's size) with linear ramps over the overlaps."""
    B, _, H, W = x.shape
    out = torch.zeros(B, out_channels, round(H * scale), round(W * scale))
    weight = torch.zeros(1, 1, out.shape[2], out.shape[3])
    stride = max(1, tile - overlap)
    for y in _starts(H, tile, stride):
        for x0 in _starts(W, tile, stride):
            part = fn(x[:, :, y:y + tile, x0:x0 + tile]).float().cpu()
            h, w = part.shape[-2:]
            fade = round(overlap * scale)
            mask = _ramp(h, fade)[:, None] * _ramp(w, fade)[None, :]
            oy, ox = round(y * scale), round(x0 * scale)
            out[:, :, oy:oy + h, ox:ox + w] += part * mask
            weight[:, :, oy:oy + h, ox:ox + w] += mask
    return out / weight


class VAE:
    """A VAE handle: ``encode`` images to raw latents and ``decode`` raw latents to images.

    Images are float (B, H, W, 3) in 0..1 on the CPU; latents float32 (B, 4, H/8, W/8) on
    the CPU. The module waits in CPU memory and moves to the compute device per call. A
    decode that gives NaN/inf in half precision (SDXL's VAE in fp16) is redone in fp32, and
    the handle stays in fp32 from then on. ``tile_size`` (in latent pixels) works tile by
    tile to save memory; running out of GPU memory falls back to tiles of 64 by itself. With
    ``compile_options`` (or ``--compile``) the decoder runs compiled (``nodeflow.models.compiled``).
    """

    def __init__(self, model: AutoencoderKL, *, scale_factor: float = 0.18215, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        self.model = model.eval().requires_grad_(False)
        self.scale_factor = scale_factor                  # the family's latent scale (reported, not applied)
        self.device = device or devices.get_device()
        self.dtype = dtype or next(model.parameters()).dtype
        self.downscale = model.downscale
        self.latent_channels = model.config.embed_dim
        self.compile_options = None                       # the decoder's fast path (compiled.CompileOptions)

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_size: int | None,
             tile: int, overlap: int, scale: float, out_channels: int) -> torch.Tensor:
        def run_tile(part):
            return fn(part.to(self.device, self.dtype))

        # The module decides: another handle on it (CompileVAE's copy) may have switched it to fp32.
        self.dtype = next(self.model.parameters()).dtype

        for attempt in range(2):
            devices.model_manager().load(self.model, self.device)
            with torch.no_grad():
                try:
                    if tile_size:
                        out = tiled(run_tile, x, tile, overlap, scale, out_channels)
                    else:
                        out = run_tile(x).float().cpu()
                except OutOfMemoryError:
                    if tile_size:
                        raise
                    log.warning("VAE ran out of memory on %s; retrying in tiles", self.device)
                    tile_size, tile = 64, round(64 * (1 if scale > 1 else self.downscale))
                    overlap = tile // 8
                    out = tiled(run_tile, x, tile, overlap, scale, out_channels)
            if torch.isfinite(out).all() or self.dtype == torch.float32 or attempt:
                return out
            log.warning("VAE gave NaN/inf in %s; switching it to float32", self.dtype)
            devices.model_manager().offload(self.model)
            self.dtype = torch.float32
            self.model.to(torch.float32)
        return out

    def encode(self, image: torch.Tensor, tile_size: int | None = None) -> torch.Tensor:
        """Image (B, H, W, 3) 0..1 -> raw latent (B, 4, H/8, W/8) float32 CPU (the posterior mean).
        Sizes that are not multiples of 8 are centre-cropped down to one."""
        if image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError(f"VAE.encode expects an image (B, H, W, 3), got shape {tuple(image.shape)}")
        f = self.downscale
        H, W = image.shape[1] // f * f, image.shape[2] // f * f
        if tuple(image.shape[1:3]) != (H, W):
            top, left = (image.shape[1] - H) // 2, (image.shape[2] - W) // 2
            image = image[:, top:top + H, left:left + W]
        x = image[..., :3].movedim(-1, 1).float() * 2 - 1                           # (B, 3, H, W) in -1..1
        tile = (tile_size or 64) * f
        return self._run(self.model.encode, x, tile_size, tile, tile // 8, 1 / f, self.latent_channels)

    def decode(self, latent: torch.Tensor, tile_size: int | None = None) -> torch.Tensor:
        """Raw latent (B, 4, h, w) -> image (B, 8h, 8w, 3) float32 0..1 CPU."""
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"VAE.decode expects a latent (B, {self.latent_channels}, h, w), "
                             f"got shape {tuple(latent.shape)}")
        tile = tile_size or 64
        decode = compiled.vae_decode(self)
        out = self._run(decode, latent.float(), tile_size, tile, tile // 8, self.downscale, 3)
        return ((out + 1) / 2).clamp(0, 1).movedim(1, -1)                          # (B, H, W, 3)
