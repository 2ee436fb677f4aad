"""Pixel-space upscalers of the ESRGAN family, and the UPSCALE_MODEL handle that runs them in tiles.

    from nodeflow.models.esrgan import load_upscale_model
    up = load_upscale_model("models/upscale_models/RealESRGAN_x4plus.pth")
    up.arch, up.scale                        # "RRDBNet", 4
    big = up.upscale(image)                  # (B, H, W, 3) 0..1 -> (B, 4H, 4W, 3) 0..1, on the CPU

Architectures (the hyperparameters are read from the weights' shapes, never from a table):

- **RRDBNet** (ESRGAN, Wang et al. 2018; Real-ESRGAN, Wang et al. 2021): ``conv_first``, a body of
  ``nb`` residual-in-residual dense blocks, ``conv_body`` (added back to the features), one
  nearest-neighbour ×2 upsampling conv per factor of 2 (``conv_up1``, ``conv_up2``, …), ``conv_hr``,
  ``conv_last``. Real-ESRGAN's ×2 and ×1 models pixel-unshuffle the image first (by 2 and 4), which
  shows as ``conv_first`` taking 4× or 16× the output channels. Two key layouts exist:

  * Real-ESRGAN / BasicSR ("new"): ``conv_first.weight``, ``body.0.rdb1.conv1.weight``, …,
    ``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``, often wrapped as
    ``{"params_ema": …}`` or ``{"params": …}`` — the module below uses these names;
  * the original ESRGAN repository ("old"), one flat ``nn.Sequential`` called ``model`` (see
    ``old_to_new``).

- **SRVGGNetCompact** (Real-ESRGAN's compact models, e.g. realesr-general-x4v3): ``num_conv + 2``
  3×3 convs with PReLU between them (``body.0``, ``body.1`` the PReLU, ``body.2``, …), a pixel
  shuffle by the scale, plus the nearest-upsampled input.

``.pth`` / ``.pt`` files are read with ``torch.load(weights_only=True)`` (a pickle that needs code is
refused, never run); ``.safetensors`` are memory-mapped — the same readers as the checkpoint loader.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nodeflow.models import devices
from nodeflow.models.files import (
    PICKLE_SUFFIXES,
    CheckpointError,
    TensorFile,
    TorchFile,
    assign_weights,
    open_state_dict,
)

log = logging.getLogger(__name__)

# torch.OutOfMemoryError is torch >= 2.5; torch.cuda.OutOfMemoryError (>= 1.13) is the same class there
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

WRAPPERS = ("params_ema", "params", "state_dict", "model")   # dicts a training framework nests the weights in
MIN_TILE = 128                                                 # below this, running out of memory is an error
EXPECTED = ("expected an ESRGAN-family upscale model: RRDBNet keys as Real-ESRGAN/BasicSR save them "
            "('conv_first.weight', 'body.0.rdb1.conv1.weight', …, 'conv_up1.weight', 'conv_hr.weight', "
            "'conv_last.weight'), the original ESRGAN keys ('model.0.weight', "
            "'model.1.sub.0.RDB1.conv1.0.weight', …), or SRVGGNetCompact keys ('body.0.weight', "
            "'body.1.weight' (PReLU), …). Other architectures (SwinIR, HAT, DAT, …) are not supported")


# --- RRDBNet ---------------------------------------------------------------------------------

@dataclass
class RRDBConfig:
    in_channels: int = 3     # image channels in (before any pixel-unshuffle)
    out_channels: int = 3    # image channels out
    nf: int = 64             # feature channels (BasicSR's num_feat)
    nb: int = 23             # RRDB blocks in the body (num_block)
    gc: int = 32             # growth channels of each dense block (num_grow_ch)
    upsamples: int = 2       # nearest ×2 upsampling convs (conv_up1, conv_up2, …)
    unshuffle: int = 1       # pixel-unshuffle factor of the input: 1, or 2 / 4 (Real-ESRGAN ×2 / ×1)

    @property
    def scale(self) -> int:
        return 2 ** self.upsamples // self.unshuffle


class ResidualDenseBlock(nn.Module):
    """Five 3×3 convs, each seeing the input and every earlier output (dense connections); the
    last one's output, scaled by 0.2, is added to the input."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, padding=1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, padding=1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, padding=1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, padding=1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]                                                    # (B, nf, h, w), then (B, gc, h, w) each
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks in a row, the result scaled by 0.2
    and added to the input."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc)
        self.rdb2 = ResidualDenseBlock(nf, gc)
        self.rdb3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """ESRGAN's generator, with Real-ESRGAN's parameter names."""

    def __init__(self, config: RRDBConfig):
        super().__init__()
        c = config
        self.config = c
        self.conv_first = nn.Conv2d(c.in_channels * c.unshuffle ** 2, c.nf, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(c.nf, c.gc) for _ in range(c.nb)))
        self.conv_body = nn.Conv2d(c.nf, c.nf, 3, padding=1)
        for i in range(c.upsamples):
            self.add_module(f"conv_up{i + 1}", nn.Conv2d(c.nf, c.nf, 3, padding=1))
        self.conv_hr = nn.Conv2d(c.nf, c.nf, 3, padding=1)
        self.conv_last = nn.Conv2d(c.nf, c.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) in 0..1 -> (B, out_channels, H·scale, W·scale), about 0..1."""
        H, W = x.shape[-2:]
        u = self.config.unshuffle
        if u > 1:                                                      # pad to a multiple of u, as Real-ESRGAN does
            ph, pw = -H % u, -W % u
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < H and pw < W else "replicate")
            x = F.pixel_unshuffle(x, u)                                # (B, C·u², H/u, W/u)
        feat = self.conv_first(x)                                      # (B, nf, h, w)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.config.upsamples):
            conv = getattr(self, f"conv_up{i + 1}")
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)  # (B, nf, 2h, 2w)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        s = self.config.scale
        return out[..., :H * s, :W * s]


_OLD_BODY = re.compile(r"model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)$")
_OLD_TOP = re.compile(r"model\.(\d+)\.(weight|bias)$")


def old_to_new(shapes_or_sd: Mapping[str, object]) -> dict[str, str]:
    """The original ESRGAN layout's key -> Real-ESRGAN's key. The original builds one flattened
    ``nn.Sequential`` ``model``: ``model.0`` conv_first; ``model.1`` a shortcut block whose ``sub`` holds
    the RRDBs ``sub.0 … sub.{nb-1}`` (dense-block convs as ``RDB{r}.conv{c}.0``: a conv wrapped in a
    one-element Sequential) and then conv_body as ``sub.{nb}``; per ×2 step three entries (Upsample,
    conv, LeakyReLU), so the upsampling convs are ``model.3``, ``model.6``, …; then conv_hr, its
    LeakyReLU and conv_last. With n upsampling steps: upconv k at ``3k+3``, conv_hr at ``3n+2``,
    conv_last at ``3n+4`` — for ×4 ``model.3``, ``model.6``, ``model.8``, ``model.10``.
    Raises ``ValueError`` naming what does not fit."""
    mapping: dict[str, str] = {}
    body = {int(m.group(1)) for k in shapes_or_sd if (m := _OLD_BODY.match(k))}
    if not body:
        raise ValueError("no RRDB blocks ('model.1.sub.0.RDB1.conv1.0.weight')")
    nb = max(body) + 1
    if body != set(range(nb)):
        raise ValueError(f"RRDB blocks {sorted(set(range(nb)) - body)} are missing")
    top = sorted({int(m.group(1)) for k in shapes_or_sd if (m := _OLD_TOP.match(k))})
    if not top or top[0] != 0 or len(top) < 3:
        raise ValueError(f"expected model.0 (first conv), model.N for the upsampling convs, conv_hr and "
                         f"conv_last; found model indices {top}")
    n = len(top) - 3                                                   # model.0, conv_hr, conv_last + n upconvs
    names = {0: "conv_first", 3 * n + 2: "conv_hr", 3 * n + 4: "conv_last"}
    names.update({3 * k + 3: f"conv_up{k + 1}" for k in range(n)})
    if sorted(names) != top:
        raise ValueError(f"model indices {top} are not those of an ESRGAN with {n} ×2 upsampling step(s) "
                         f"(expected {sorted(names)}; pixel-shuffle upsampling variants are not supported)")
    for key in shapes_or_sd:
        if m := _OLD_BODY.match(key):
            block, rdb, conv, kind = m.groups()
            mapping[key] = f"body.{block}.rdb{rdb}.conv{conv}.{kind}"
        elif key in (f"model.1.sub.{nb}.weight", f"model.1.sub.{nb}.bias"):
            mapping[key] = "conv_body." + key.rsplit(".", 1)[1]
        elif m := _OLD_TOP.match(key):
            mapping[key] = f"{names[int(m.group(1))]}.{m.group(2)}"
        else:
            raise ValueError(f"unexpected key {key!r} for the original ESRGAN layout")
    return mapping


def rrdb_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> RRDBConfig:
    """The RRDBNet architecture read from its state dict (Real-ESRGAN key names). A key the architecture
    cannot be read without raises ``ValueError`` naming it."""
    try:
        nf, in_raw = shapes["conv_first.weight"][:2]
        out = shapes["conv_last.weight"][0]
        gc = shapes["body.0.rdb1.conv1.weight"][0]
    except KeyError as e:
        raise ValueError(f"missing key {e.args[0]!r}") from None
    nb = len({int(m.group(1)) for k in shapes if (m := re.match(r"body\.(\d+)\.rdb1\.conv1\.weight$", k))})
    upsamples = len({int(m.group(1)) for k in shapes if (m := re.match(r"conv_up(\d+)\.weight$", k))})
    unshuffle = {out * 4: 2, out * 16: 4}.get(in_raw, 1)               # Real-ESRGAN ×2 / ×1: pixel-unshuffle first
    if unshuffle > 2 ** upsamples:
        raise ValueError(f"a pixel-unshuffle by {unshuffle} (conv_first takes {in_raw} channels, conv_last gives "
                         f"{out}) with {upsamples} ×2 upsampling conv(s) would shrink the image")
    return RRDBConfig(in_channels=in_raw // unshuffle ** 2, out_channels=out, nf=nf, nb=nb, gc=gc,
                      upsamples=upsamples, unshuffle=unshuffle)


# --- SRVGGNetCompact -------------------------------------------------------------------------

@dataclass
class CompactConfig:
    in_channels: int = 3     # image channels in (the same number comes out: the input is added back)
    nf: int = 64             # feature channels (num_feat)
    num_conv: int = 16       # 3×3 convs between the first and the last
    scale: int = 4           # pixel-shuffle factor of the last conv's output


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact VGG-style upscaler: conv, PReLU, (conv, PReLU) × num_conv, conv to
    C·scale² channels, pixel shuffle; the nearest-upsampled input is added (a residual)."""

    def __init__(self, config: CompactConfig):
        super().__init__()
        c = config
        self.config = c
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.nf, 3, padding=1), nn.PReLU(c.nf)]
        for _ in range(c.num_conv):
            layers += [nn.Conv2d(c.nf, c.nf, 3, padding=1), nn.PReLU(c.nf)]
        layers.append(nn.Conv2d(c.nf, c.in_channels * c.scale ** 2, 3, padding=1))
        self.body = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H·scale, W·scale)."""
        out = x
        for layer in self.body:
            out = layer(out)                                           # last: (B, C·s², H, W)
        out = F.pixel_shuffle(out, self.config.scale)                  # (B, C, H·s, W·s)
        return out + F.interpolate(x, scale_factor=self.config.scale, mode="nearest")


def compact_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> CompactConfig:
    convs = sorted(int(m.group(1)) for k, s in shapes.items()
                   if (m := re.match(r"body\.(\d+)\.weight$", k)) and len(s) == 4)
    prelus = [int(m.group(1)) for k, s in shapes.items() if (m := re.match(r"body\.(\d+)\.weight$", k)) and len(s) == 1]
    if not convs or convs[0] != 0 or convs != list(range(0, 2 * len(convs), 2)):
        raise ValueError(f"convs at body indices {convs}, expected body.0, body.2, body.4, …")
    if sorted(prelus) != list(range(1, 2 * len(convs) - 2, 2)):
        raise ValueError("expected a PReLU (body.1.weight, body.3.weight, …) after every conv but the last; "
                         "compact models with ReLU or LeakyReLU cannot be told apart from their weights")
    nf, in_ch = shapes["body.0.weight"][:2]
    last = shapes[f"body.{convs[-1]}.weight"][0]
    scale = math.isqrt(last // in_ch)
    if scale * scale * in_ch != last:
        raise ValueError(f"the last conv gives {last} channels, not {in_ch}·scale² for an integer scale")
    return CompactConfig(in_channels=in_ch, nf=nf, num_conv=len(convs) - 2, scale=scale)


# --- detection and loading ----------------------------------------------------------------------

def _open(path: Path) -> TensorFile:
    """The file's reader: pickles (by suffix, else by their first bytes) through ``TorchFile``
    (unwrapping ``WRAPPERS``), everything else through ``files.open_state_dict``."""
    if path.is_file() and path.suffix.lower() not in (".safetensors", ".sft"):
        with open(path, "rb") as f:
            head = f.read(2)
        if path.suffix.lower() in PICKLE_SUFFIXES or head == b"PK" or head[:1] == b"\x80":
            return TorchFile(path, wrappers=WRAPPERS)
    return open_state_dict(path)                                       # also: no such file, unknown format


def detect(shapes: Mapping[str, Sequence[int]]) -> tuple[str, object, dict[str, str]]:
    """``(arch, config, key map)`` of an upscale model's state dict: arch ``"RRDBNet"`` or
    ``"SRVGGNetCompact"``, and the map from the file's keys to the module's. ``ValueError`` if unknown."""
    prefix = "module." if shapes and all(k.startswith("module.") for k in shapes) else ""   # DataParallel saves
    shapes = {k[len(prefix):]: tuple(v) for k, v in shapes.items()}
    rename = {prefix + k: k for k in shapes}
    if "conv_first.weight" in shapes:
        return "RRDBNet", rrdb_config_from_shapes(shapes), rename
    if "model.0.weight" in shapes and any(k.startswith("model.1.sub.") for k in shapes):
        old = old_to_new(shapes)
        new = {old[k]: s for k, s in shapes.items()}
        return "RRDBNet", rrdb_config_from_shapes(new), {prefix + k: v for k, v in old.items()}
    if "body.0.weight" in shapes and len(shapes["body.0.weight"]) == 4:
        return "SRVGGNetCompact", compact_config_from_shapes(shapes), rename
    raise ValueError("unknown layout")


def load_upscale_model(path, *, device=None, dtype: torch.dtype | None = None) -> UpscaleModel:
    """Load an ESRGAN-family upscale model (``.pth``/``.pt`` read with ``weights_only``, or ``.safetensors``).

    ``device``: where it runs (default ``devices.get_device()``); the weights wait in CPU memory in
    ``dtype`` (default ``devices.compute_dtype``: fp16 on GPUs, fp32 on the CPU)."""
    path = Path(path)
    device = torch.device(device) if device is not None else devices.get_device()
    dtype = dtype or devices.compute_dtype(device)
    with _open(path) as f:
        shapes = dict(f.shapes)
        try:
            arch, config, rename = detect(shapes)
        except ValueError as e:
            shown = ", ".join(list(shapes)[:6]) + (" …" if len(shapes) > 6 else "") if shapes else "no tensors"
            why = "" if str(e) == "unknown layout" else f" ({e})"
            raise CheckpointError(f"{path}: not a supported upscale model{why}; {EXPECTED}. "
                                  f"The file has {len(shapes)} tensors: {shown}") from None
        sd = {rename[k]: f.get(k, dtype) for k in shapes}
    with torch.device("meta"):
        model = RRDBNet(config) if arch == "RRDBNet" else SRVGGNetCompact(config)
    assign_weights(model, sd, f"{arch} upscale model in {path}")
    return UpscaleModel(model, arch=arch, device=device, path=str(path))


# --- tiles ------------------------------------------------------------------------------------

def _fit(tile: int, overlap: int, align: int) -> tuple[int, int]:
    """Tile and overlap as multiples of ``align`` (so only the last start is rounded, which widens its
    overlap), the overlap at most half the tile."""
    tile = max(align, tile // align * align)
    return tile, min(-(-overlap // align) * align, tile // 2 // align * align)


def _starts(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Tile starts along one axis: every ``tile - overlap``, the last ending at ``size``, each rounded
    down to a multiple of ``align`` (a pixel-unshuffle model then sees the same pixel grid in every tile)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    return sorted({s // align * align for s in (*range(0, size - tile, stride), size - tile)})


def _weights(n: int, before: bool, after: bool, fade: int) -> torch.Tensor:
    """1-D blend weights of a tile ``n`` output pixels long: where it has a neighbour (``before``,
    ``after``), the outer quarter of the ``fade``-pixel overlap gets weight 0 (those pixels saw zero
    padding instead of the neighbour's content) and the middle half ramps up linearly to 1."""
    i = torch.arange(n, dtype=torch.float32)
    margin, ramp = fade // 4, max(1, fade - 2 * (fade // 4))
    w = torch.ones(n)
    if before:
        w = torch.minimum(w, ((i - margin + 1) / (ramp + 1)).clamp(0, 1))
    if after:
        w = torch.minimum(w, ((n - i - margin) / (ramp + 1)).clamp(0, 1))
    return w


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int, tile: int, overlap: int,
                *, align: int = 1, on_tile: Callable[[], None] | None = None) -> torch.Tensor:
    """Run ``fn`` ((1, C, h, w) -> (1, C', h·scale, w·scale)) on overlapping tiles of ``x`` (1, C, H, W)
    at most ``tile`` pixels square, and blend the results, float32 on the CPU; ``on_tile()`` after each.
    Tiles overlap by at least ``overlap`` pixels (a multiple of ``align``), cross-faded over the middle half."""
    _, _, H, W = x.shape
    tile, overlap = _fit(tile, overlap, align)
    ys, xs = _starts(H, tile, overlap, align), _starts(W, tile, overlap, align)
    out = weight = None
    for iy, y in enumerate(ys):
        y1 = H if iy == len(ys) - 1 else min(H, y + tile)
        for ix, x0 in enumerate(xs):
            x1 = W if ix == len(xs) - 1 else min(W, x0 + tile)
            part = fn(x[:, :, y:y1, x0:x1]).float().cpu()             # (1, C', h·s, w·s)
            if out is None:
                out = torch.zeros(1, part.shape[1], H * scale, W * scale)
                weight = torch.zeros(1, 1, H * scale, W * scale)
            mask = (_weights(part.shape[2], iy > 0, iy < len(ys) - 1, overlap * scale)[:, None]
                    * _weights(part.shape[3], ix > 0, ix < len(xs) - 1, overlap * scale)[None, :])
            out[:, :, y * scale:y1 * scale, x0 * scale:x1 * scale] += part * mask
            weight[:, :, y * scale:y1 * scale, x0 * scale:x1 * scale] += mask
            if on_tile is not None:
                on_tile()
    return out / weight


def tile_count(H: int, W: int, tile: int, overlap: int, align: int = 1) -> int:
    tile, overlap = _fit(tile, overlap, align)
    return len(_starts(H, tile, overlap, align)) * len(_starts(W, tile, overlap, align))


# --- the handle -------------------------------------------------------------------------------

class UpscaleModel:
    """An UPSCALE_MODEL: an upscaler module with its scale, run in tiles by ``upscale``.

    The module waits in CPU memory and moves to the compute device per call (through the model
    manager). A result with NaN/inf in half precision is redone in fp32, and the handle stays in
    fp32 from then on."""

    def __init__(self, model: nn.Module, *, arch: str, device: torch.device | None = None, path: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.arch = arch                                      # "RRDBNet" | "SRVGGNetCompact"
        self.config = model.config
        self.scale: int = model.config.scale                  # output pixels per input pixel, per side
        self.in_channels: int = model.config.in_channels
        self.align: int = getattr(model.config, "unshuffle", 1)
        self.device = device or devices.get_device()
        self.dtype = next(model.parameters()).dtype
        self.path = path

    def __repr__(self) -> str:
        return f"UpscaleModel({self.arch}, x{self.scale}, {self.config}, {self.path!r})"

    def upscale(self, image: torch.Tensor, *, tile: int = 512, overlap: int = 32,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """IMAGE (B, H, W, C) 0..1 -> (B, H·scale, W·scale, C) float32 0..1 on the CPU, in tiles of at
        most ``tile`` input pixels overlapping by ``overlap`` (ComfyUI's 512 and 32), each image on its
        own. ``progress(done, total)`` is called after each tile (it may raise to stop). Out of device
        memory, the tile is halved and the work restarted, down to 128 pixels. An alpha channel beyond
        the model's channels is scaled bicubically."""
        if image.ndim != 4 or image.shape[-1] < self.in_channels:
            raise ValueError(f"the {self.arch} upscale model takes images (B, H, W, {self.in_channels}); "
                             f"got shape {tuple(image.shape)}")
        extra = image.shape[-1] - self.in_channels
        if extra not in (0, 1):
            raise ValueError(f"the {self.arch} upscale model takes {self.in_channels} channels (and an optional "
                             f"alpha); the image has {image.shape[-1]}")
        x = image[..., :self.in_channels].movedim(-1, 1).float().cpu()  # (B, C, H, W)
        B, _, H, W = x.shape
        for attempt in range(2):
            devices.model_manager().load(self.model, self.device)
            out = self._tiled(x, tile, overlap, progress)
            if torch.isfinite(out).all() or self.dtype == torch.float32 or attempt:
                break
            log.warning("upscale model gave NaN/inf in %s; switching it to float32", self.dtype)
            devices.model_manager().offload(self.model)
            self.dtype = torch.float32
            self.model.to(torch.float32)
        out = out.clamp(0, 1)
        if extra:
            alpha = F.interpolate(image[..., -1:].movedim(-1, 1).float().cpu(), size=(H * self.scale, W * self.scale),
                                  mode="bicubic", align_corners=False).clamp(0, 1)
            out = torch.cat([out, alpha], 1)
        return out.movedim(1, -1)                                       # (B, H·s, W·s, C)

    def _tiled(self, x: torch.Tensor, tile: int, overlap: int, progress) -> torch.Tensor:
        B, _, H, W = x.shape

        def run(part: torch.Tensor) -> torch.Tensor:
            return self.model(part.to(self.device, self.dtype))

        while True:
            total, done = B * tile_count(H, W, tile, overlap, self.align), 0

            def step():
                nonlocal done
                done += 1
                if progress is not None:
                    progress(done, total)  # noqa: B023 - called within this iteration

            try:
                with torch.no_grad():
                    return torch.cat([tiled_apply(run, x[b:b + 1], self.scale, tile, overlap, align=self.align,
                                                  on_tile=step) for b in range(B)])
            except OutOfMemoryError:
                if tile // 2 < MIN_TILE:
                    raise
                tile //= 2
                log.warning("upscale model ran out of memory on %s; retrying with %d-pixel tiles", self.device, tile)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
