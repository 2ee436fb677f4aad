"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models") and the control chain a conditioning carries.

A ControlNet is a trainable copy of the UNet's encoder half (time embedding, input blocks,
middle block) fed the noisy latent plus an encoded hint image, whose every input-block output
and the middle-block output pass a 1×1 "zero convolution" and are added, times a strength, to
the UNet's skip connections and middle output:

    guided = input_hint_block(hint)                      # (B, 320, h, w) from (B, 3, 8h, 8w)
    h₀ = input_blocks[0](x) + guided;  hᵢ = input_blocks[i](hᵢ₋₁)
    residuals: zero_convs[i](hᵢ) → the skip of output block N−1−i;  middle_block_out(middle(h)) → middle

Files (``load_control_model``; the architecture is read from the weights' shapes as for the
UNet): the original single-file layout (``control_model.*``, the ``control_v11*`` files), the
same without prefix, diffusers' ``ControlNetModel`` layout (``controlnet_cond_embedding.*``,
``controlnet_down_blocks.*``, ``controlnet_mid_block.*``; SDXL ControlNets ship this way), and
"diff" ControlNets (``control_model.*`` holding differences from a UNet, plus a ``difference``
key: the given model's UNet weights, its LoRAs included as in ComfyUI, are added at load).
T2I-Adapters load through the same function (``nodeflow.models.t2i_adapter``).

A conditioning entry's ``"control"`` is a ``ControlHint``: a control model, a hint image, a
strength, a range of the schedule (start/end percent, as σ), and the previous control in the
chain; the residuals of a chain add up (ComfyUI's ``control_merge``). The hint is resized to
8× the latent (of the entry's area) with a centre crop to that aspect ratio and nearest-exact
interpolation, as ComfyUI does; the control model is moved to the UNet's device through the
model manager right before the UNet, and offloaded with it under memory pressure.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from nodeflow import imaging
from nodeflow.models import devices, patching
from nodeflow.models.files import CheckpointError, assign_weights, read_all
from nodeflow.models.unet import Block, UNetConfig, build_encoder, config_from_shapes, embed, label_embedding

log = logging.getLogger(__name__)

HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)     # input_hint_block widths; stride 2 at 32, 96, 256


class ControlNet(nn.Module):
    """The encoder half of a UNet with a hint encoder and zero convolutions (LDM key names)."""

    def __init__(self, cfg: UNetConfig, hint_channels: int):
        super().__init__()
        self.config = cfg
        self.time_embed, self.input_blocks, self.middle_block, widths = build_encoder(cfg)
        if cfg.adm_in_channels:
            self.label_emb = label_embedding(cfg.adm_in_channels, cfg.model_channels * 4)
        layers: list[nn.Module] = []
        prev = hint_channels
        for i, ch in enumerate(HINT_CHANNELS):
            layers += [nn.Conv2d(prev, ch, 3, padding=1, stride=2 if i in (2, 4, 6) else 1), nn.SiLU()]
            prev = ch
        self.input_hint_block = Block([*layers, nn.Conv2d(prev, cfg.model_channels, 3, padding=1)])
        self.zero_convs = nn.ModuleList([Block([nn.Conv2d(w, w, 1)]) for w in widths])
        self.middle_block_out = Block([nn.Conv2d(widths[-1], widths[-1], 1)])

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> dict[str, list[torch.Tensor]]:
        """x (B, C, h, w) scaled noisy latent, hint (B|1, 3, 8h, 8w) in 0..1 -> {"output": [one per
        input block], "middle": [one]}, the residuals before strength."""
        emb = embed(self, timesteps, y, x.dtype)
        guided = self.input_hint_block(hint, emb, context)
        outs, h = [], x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zero(h, emb, context))
        h = self.middle_block(h, emb, context)
        return {"output": outs, "middle": [self.middle_block_out(h, emb, context)]}


# --- key layouts ------------------------------------------------------------------------------

def _diffusers_table(keys) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) of the ControlNet-only parts."""
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))}
    n = max(blocks) + 1 if blocks else len(HINT_CHANNELS) - 1
    table = [("controlnet_cond_embedding.conv_in.", "input_hint_block.0."),
             ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (n + 1)}."),
             ("controlnet_mid_block.", "middle_block_out.0.")]
    table += [(f"controlnet_cond_embedding.blocks.{i}.", f"input_hint_block.{2 * (i + 1)}.") for i in range(n)]
    downs = {int(m.group(1)) for k in keys if (m := re.match(r"controlnet_down_blocks\.(\d+)\.", k))}
    table += [(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.") for i in sorted(downs)]
    return table


def diffusers_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``ControlNetModel`` keys -> LDM ControlNet keys."""
    from nodeflow.models.diffusers_format import diffusers_unet_to_ldm

    table = _diffusers_table(sd)
    out, encoder = {}, {}
    for key, value in sd.items():
        for src, dst in table:
            if key.startswith(src) and key[len(src):] in ("weight", "bias"):
                out[dst + key[len(src):]] = value
                break
        else:
            encoder[key] = value
    out.update(diffusers_unet_to_ldm(encoder))
    return out


def ldm_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM ControlNet keys -> diffusers ``ControlNetModel`` keys (tests, the bench)."""
    from nodeflow.models.diffusers_format import _rename, _unet_table

    cfg = config_from_shapes({k: v.shape for k, v in sd.items()})
    n, levels = cfg.num_res_blocks[0], len(cfg.channel_mult)
    table = _unet_table(levels, n, [cfg.transformer_depth[i * n] > 0 for i in range(levels)], [False] * levels,
                        cfg.transformer_depth_middle > 0)
    own = {k: v for k, v in sd.items() if k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))}
    out = _rename({k: v for k, v in sd.items() if k not in own}, table, reverse=False, what="LDM ControlNet")
    hints = sorted({int(k.split(".")[1]) for k in own if k.startswith("input_hint_block.")})
    for key, value in own.items():
        parts = key.split(".")
        if parts[0] == "zero_convs":
            out[f"controlnet_down_blocks.{parts[1]}.{parts[3]}"] = value
        elif parts[0] == "middle_block_out":
            out[f"controlnet_mid_block.{parts[2]}"] = value
        else:
            i = int(parts[1])
            name = ("conv_in" if i == hints[0] else "conv_out" if i == hints[-1]
                    else f"blocks.{i // 2 - 1}")
            out[f"controlnet_cond_embedding.{name}.{parts[2]}"] = value
    return out


# --- the loaded model ---------------------------------------------------------------------------

def fit_hint(hint: torch.Tensor, height: int, width: int, method: str = "nearest-exact") -> torch.Tensor:
    """ComfyUI's ``common_upscale(..., crop="center")``: cut the hint (B, C, H, W) to the target's
    aspect ratio around its centre, then resize it to (height, width)."""
    return imaging.resize(hint, width, height, method, crop="center")


def broadcast_hint(hint: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
    """ComfyUI's ``broadcast_image_to``: a hint batch of one broadcasts; a longer one is cut or
    cycled to the images of one chunk, then repeated for each of the ``chunks`` entries."""
    if hint.shape[0] == 1 or hint.shape[0] == batch:
        return hint
    per = batch // chunks
    hint = hint[:per]
    if per > hint.shape[0]:
        hint = torch.cat([hint] * (per // hint.shape[0]) + [hint[:per % hint.shape[0]]])
    return hint if hint.shape[0] == batch else torch.cat([hint] * chunks)


def describe(cfg: UNetConfig) -> str:
    """The family a UNet-shaped config belongs to, by the features that tell them apart."""
    if cfg.adm_in_channels:
        family = "SDXL refiner" if cfg.context_dim == 1280 else "SDXL"
    else:
        family = "SD 2.x" if cfg.use_linear_in_transformer else "SD 1.x"
    return f"{family} (text context {cfg.context_dim}, width {cfg.model_channels})"


class LoadedControl:
    """A CONTROL_NET value: a control network, where it runs, and its file. Subclasses add
    ``check(model)`` (is it made for that model?) and ``residuals``."""

    kind = "control model"

    def __init__(self, net: nn.Module, path: str, device=None):
        self.net, self.path = net, path
        self.device = torch.device(device) if device is not None else devices.get_device()

    @property
    def name(self) -> str:
        return Path(self.path).name


class ControlModel(LoadedControl):
    """A loaded ControlNet."""

    kind = "ControlNet"

    def __init__(self, net: ControlNet, path: str, global_average_pooling: bool = False, device=None):
        super().__init__(net, path, device)
        self.global_average_pooling = global_average_pooling    # the "shuffle" ControlNets

    def check(self, model) -> None:
        """Raise ValueError when this ControlNet was made for another model than ``model``."""
        unet = getattr(model, "unet", None)
        if unet is None:
            return
        mine, theirs = self.net.config, unet.config
        same = (mine.context_dim, mine.model_channels, mine.channel_mult, bool(mine.adm_in_channels)) == \
            (theirs.context_dim, theirs.model_channels, theirs.channel_mult, bool(theirs.adm_in_channels))
        if not same:
            raise ValueError(f"the {self.kind} '{self.name}' is for {describe(mine)}, but the model is "
                             f"{getattr(model, 'family', '?')}, {describe(theirs)}: use a {self.kind} made for it")

    @torch.no_grad()
    def residuals(self, hint: ControlHint, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  y: torch.Tensor | None, chunks: int) -> dict[str, list]:
        dtype = next(self.net.parameters()).dtype
        image = hint.fitted(x.shape[-2] * 8, x.shape[-1] * 8, x.device, dtype)
        image = broadcast_hint(image, x.shape[0], chunks)
        # runs where the UNet runs (x is its input), loaded through the manager just before it
        dev = x.device
        devices.model_manager().load(self.net, dev)
        out = self.net(x.to(dev, dtype), image.to(dev), t.to(dev, dtype), context.to(dev, dtype),
                       None if y is None else y.to(dev, dtype))
        scale = hint.strength
        for key, values in out.items():
            if self.global_average_pooling:
                values = [v.mean(dim=(2, 3), keepdim=True).expand_as(v) for v in values]
            out[key] = [(v * scale).to(x.device) for v in values]
        return out


def merge(own: dict | None, previous: dict | None) -> dict | None:
    """ComfyUI's control_merge: the previous chain's residuals added to this one's, index by index."""
    if previous is None:
        return own
    if own is None:
        return previous
    out = {k: list(v) for k, v in own.items()}
    for key, values in previous.items():
        mine = out.setdefault(key, [])
        for i, value in enumerate(values):
            if i >= len(mine):
                mine.append(value)
            elif value is not None:
                mine[i] = value if mine[i] is None else value + mine[i]
    return out


class ControlHint:
    """A control model applied to a conditioning: its hint, strength and schedule range, after
    ``previous`` (the control the conditioning had before). Shared by the positive and negative
    entries one ControlNetApplyAdvanced made, so they batch together."""

    def __init__(self, model, image: torch.Tensor, strength: float, start_percent: float = 0.0,
                 end_percent: float = 1.0, previous: ControlHint | None = None):
        self.model = model                                   # ControlModel or T2IAdapterModel
        self.image = image                                   # (B, C, H, W) float 0..1, on the CPU
        self.strength, self.start_percent, self.end_percent = float(strength), start_percent, end_percent
        self.previous = previous
        self._fitted: dict[tuple, torch.Tensor] = {}
        self._features: dict[tuple, dict] = {}
        self._range: tuple | None = None

    def chain(self):
        node = self
        while node is not None:
            yield node
            node = node.previous

    def check(self, model) -> None:
        for node in self.chain():
            node.model.check(model)

    def fitted(self, height: int, width: int, device, dtype, multiple: int = 1, channels: int | None = None):
        """The hint at (height, width) rounded up to ``multiple``, centre-cropped and resized as
        ComfyUI does (cached per size)."""
        height, width = -(-height // multiple) * multiple, -(-width // multiple) * multiple
        key = (height, width, str(device), dtype, channels)
        found = self._fitted.get(key)
        if found is None:
            found = fit_hint(self.image.float(), height, width)
            if channels == 1 and found.shape[1] > 1:
                found = found.mean(1, keepdim=True)
            found = found.to(device, dtype)
            self._fitted = {key: found}
        return found

    def _active(self, sigma: float, schedule) -> bool:
        if self._range is None or self._range[0] is not schedule:
            self._range = (schedule, schedule.percent_to_sigma(self.start_percent),
                           schedule.percent_to_sigma(self.end_percent))
        _, high, low = self._range
        return not (sigma > high or sigma < low)

    def residuals(self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                  y: torch.Tensor | None, chunks: int, schedule) -> dict | None:
        """The chain's residuals for one forward pass: x the scaled model input (n·B rows), t its
        timesteps, σ the step's noise level; None when no control in the chain is active."""
        previous = None if self.previous is None else self.previous.residuals(x, t, sigma, context, y, chunks,
                                                                                schedule)
        if not self._active(float(sigma.reshape(-1)[0]), schedule):
            return previous
        return merge(self.model.residuals(self, x, t, context, y, chunks), previous)


# --- loading -------------------------------------------------------------------------------------

def _unet_weights(model) -> dict[str, torch.Tensor]:
    """The model's UNet weights, for a diff ControlNet: with the model's own weight patches (its
    LoRAs) applied, as ComfyUI reads them (it loads the patched model, then its state dict)."""
    unet = model.unet
    patching.sync(unet, getattr(model, "patches", None) or {})
    return {k: v.detach().cpu() for k, v in unet.state_dict().items()}


def load_control_model(path, model=None, *, device=None, dtype: torch.dtype | None = None):
    """A ControlNet or T2I-Adapter file as a ``ControlModel`` / ``T2IAdapterModel``; ``model``
    (a DiffusionModel) is needed for diff ControlNets. Unknown layouts raise CheckpointError."""
    from nodeflow.models import t2i_adapter

    path = Path(path)
    device = torch.device(device) if device is not None else devices.get_device()
    dtype = dtype or devices.compute_dtype(device)
    sd = read_all(path, torch.float32)
    if "lora_controlnet" in sd:
        raise CheckpointError(f"{path}: Control-LoRA files are not supported (only full ControlNets, diff "
                              "ControlNets and T2I-Adapters)")
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        sd = diffusers_to_ldm(sd)
    elif "control_model.zero_convs.0.0.weight" in sd:
        difference = "difference" in sd
        sd = {k[len("control_model."):]: v for k, v in sd.items() if k.startswith("control_model.")}
        if difference:
            if model is None or getattr(model, "unet", None) is None:
                raise CheckpointError(f"{path} is a diff ControlNet (differences from a UNet): load it with "
                                      "DiffControlNetLoader and the model it was made for")
            base = _unet_weights(model)
            for key, value in sd.items():
                if key in base and base[key].shape == value.shape:
                    sd[key] = value + base[key].float()
    elif "zero_convs.0.0.weight" not in sd:
        adapter = t2i_adapter.load_adapter(sd, str(path), device=device)
        if adapter is None:
            prefixes = sorted({k.split(".")[0] for k in sd})[:6]
            raise CheckpointError(f"{path}: not a ControlNet or T2I-Adapter of a known layout (expected keys "
                                  "'control_model.*', 'zero_convs.*', 'controlnet_cond_embedding.*' or a "
                                  f"T2I-Adapter's 'body.*'/'conv_in.*'; found {', '.join(prefixes)})")
        return adapter
    if "input_hint_block.0.weight" not in sd:
        raise CheckpointError(f"{path}: the ControlNet has no hint encoder ('input_hint_block.0.weight')")
    heads = _head_layout(sd)
    try:
        cfg = config_from_shapes({k: v.shape for k, v in sd.items()}, **heads)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot read the ControlNet's architecture: {e}") from None
    with torch.device("meta"):
        net = ControlNet(cfg, sd["input_hint_block.0.weight"].shape[1])
    sd = {k: v.to(dtype) for k, v in sd.items()}
    assign_weights(net, sd, f"ControlNet in {path}")
    stem = path.stem
    return ControlModel(net, str(path), stem.endswith(("_shuffle", "_shuffle_fp16")), device)


def _head_layout(sd: dict) -> dict:
    """SD 1.x ControlNets (convolutional transformer projections) have 8 heads; SD 2.x and SDXL
    ones (linear projections) 64-wide heads, as the UNets they copy."""
    linear = any(v.ndim == 2 for k, v in sd.items() if k.endswith("proj_in.weight"))
    return {"num_head_channels": 64} if linear else {"num_heads": 8}
