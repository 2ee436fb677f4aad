"""T2I-Adapter (Mou et al. 2023): a small convolutional network that turns the hint image into
one feature map per UNet level, added to the output of that level's last input block.

    x = pixel_unshuffle(hint, 8)  (16 for SDXL)   # (B, 64·c, H/8, W/8)
    full:  x = conv_in(x), then per level nums_rb ResnetBlocks (the first one of levels 1–3
           downsamples and/or widens);  light: per level an extractor (1×1 in, ResnetBlock_light ×
           nums_rb, 1×1 out), levels 1–3 average-pooled first

The features go to the input blocks as ComfyUI places them: for SD 1.x/2.x after input blocks
2, 5, 8, 11 (the last of each level); for SDXL after blocks 3, 5 and 8, and the fourth to the
middle block. They depend only on the hint, so they are computed once per hint size (the
strength is applied at each step). Key layouts: TencentARC's (``conv_in.*``, ``body.N.*``; light
``body.N.in_conv``/``body.N.body.M``) and diffusers' (``adapter.body.N.resnets.M.*``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from nodeflow.models import devices
from nodeflow.models.controlnet import LoadedControl
from nodeflow.models.files import assign_weights

LEVELS = 4           # every T2I-Adapter has four levels, whatever the UNet's depth


class Downsample(nn.Module):
    """Stride-2 3×3 convolution, or 2×2 average pooling padded on odd sides."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op is not None:
            return self.op(x)
        return F.avg_pool2d(x, 2, 2, padding=(x.shape[2] % 2, x.shape[3] % 2))


class ResnetBlock(nn.Module):
    def __init__(self, in_c: int, out_c: int, down: bool, ksize: int, use_conv: bool):
        super().__init__()
        pad = ksize // 2
        self.in_conv = nn.Conv2d(in_c, out_c, ksize, 1, pad) if in_c != out_c else None
        self.block1 = nn.Conv2d(out_c, out_c, 3, 1, 1)
        self.block2 = nn.Conv2d(out_c, out_c, ksize, 1, pad)
        self.down_opt = Downsample(in_c, use_conv) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(F.relu(self.block1(x)))


class Adapter(nn.Module):
    """The full adapter (SD 1.x/2.x, and SDXL with ``xl``: unshuffle 16, level 1 widens without
    downsampling, level 2 downsamples)."""

    def __init__(self, cin: int, widths: list[int], nums_rb: int, ksize: int, use_conv: bool, xl: bool):
        super().__init__()
        self.xl, self.nums_rb, self.unshuffle_amount = xl, nums_rb, 16 if xl else 8
        self.conv_in = nn.Conv2d(cin, widths[0], 3, 1, 1)
        down_levels = (2,) if xl else (1, 2, 3)
        blocks = []
        for i in range(LEVELS):
            for j in range(nums_rb):
                first = i > 0 and j == 0
                blocks.append(ResnetBlock(widths[i - 1] if first else widths[i], widths[i],
                                          down=first and i in down_levels, ksize=ksize, use_conv=use_conv))
        self.body = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv_in(F.pixel_unshuffle(x, self.unshuffle_amount))
        out = []
        for i in range(LEVELS):
            for j in range(self.nums_rb):
                x = self.body[i * self.nums_rb + j](x)
            out.append(x)
        return out


class LightBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.block2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(F.relu(self.block1(x)))


class Extractor(nn.Module):
    def __init__(self, in_c: int, inter_c: int, out_c: int, nums_rb: int, down: bool):
        super().__init__()
        self.in_conv = nn.Conv2d(in_c, inter_c, 1)
        self.body = nn.Sequential(*[LightBlock(inter_c) for _ in range(nums_rb)])
        self.out_conv = nn.Conv2d(inter_c, out_c, 1)
        self.down_opt = Downsample(in_c, use_conv=False) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class AdapterLight(nn.Module):
    xl, unshuffle_amount = False, 8

    def __init__(self, cin: int, widths: list[int], inner: list[int], nums_rb: int):
        super().__init__()
        self.body = nn.ModuleList([Extractor(cin if i == 0 else widths[i - 1], inner[i], widths[i], nums_rb, i > 0)
                                   for i in range(LEVELS)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.pixel_unshuffle(x, self.unshuffle_amount)
        out = []
        for block in self.body:
            x = block(x)
            out.append(x)
        return out


def residual_lists(features: list[torch.Tensor], xl: bool) -> dict[str, list]:
    """Per-level features -> the UNet's "input" (and SDXL's "middle") residual lists, in the
    order the UNet consumes them from the end: a feature after each level's last input block."""
    placed: list = []
    for i, f in enumerate(features):
        if xl:
            placed += [None] * (3 if i == 0 else 2 if i == 2 else 1)
        else:
            placed += [None, None]
        placed.append(f)
    placed.reverse()
    return {"input": placed[1:], "middle": placed[:1]} if xl else {"input": placed}


class T2IAdapterModel(LoadedControl):
    """A loaded T2I-Adapter (a CONTROL_NET value, as in ComfyUI)."""

    kind = "T2I-Adapter"

    def __init__(self, net: nn.Module, path: str, input_channels: int, device=None):
        super().__init__(net, path, device)
        self.input_channels = input_channels

    def check(self, model) -> None:
        unet = getattr(model, "unet", None)
        if unet is None:
            return
        sdxl = bool(unet.config.adm_in_channels)
        if sdxl != self.net.xl:
            mine = "SDXL" if self.net.xl else "SD 1.x/2.x"
            raise ValueError(f"the T2I-Adapter '{self.name}' is for {mine}, but the model is "
                             f"{getattr(model, 'family', '?')}: use an adapter made for it")

    @torch.no_grad()
    def residuals(self, hint, x: torch.Tensor, t, context, y, chunks: int) -> dict[str, list]:
        dtype = x.dtype
        key = (x.shape[-2], x.shape[-1], dtype)
        features = hint._features.get(key)
        if features is None:
            image = hint.fitted(x.shape[-2] * 8, x.shape[-1] * 8, x.device, torch.float32,
                                multiple=self.net.unshuffle_amount, channels=self.input_channels)
            from nodeflow.models.controlnet import broadcast_hint

            image = broadcast_hint(image, x.shape[0], chunks)
            devices.model_manager().load(self.net, x.device)
            weights = next(self.net.parameters()).dtype
            features = [f.to(x.device, dtype) for f in self.net(image.to(weights))]
            hint._features = {key: features}
        return residual_lists([f * hint.strength for f in features], self.net.xl)


# --- loading --------------------------------------------------------------------------------------

def _from_diffusers(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^adapter\.body\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"body.{int(m.group(1)) * 2 + int(m.group(2))}.", key)
        key = re.sub(r"^adapter\.body\.(\d+)\.", lambda m: f"body.{int(m.group(1)) * 2}.", key)
        out[key.removeprefix("adapter.")] = value
    return out


def load_adapter(sd: dict[str, torch.Tensor], path: str, device=None) -> T2IAdapterModel | None:
    """A T2I-Adapter from its state dict, or None when ``sd`` is not one."""
    if "adapter.body.0.resnets.0.block1.weight" in sd:
        sd = _from_diffusers(sd)
    if "body.0.in_conv.weight" in sd and "body.0.out_conv.weight" in sd:
        cin = sd["body.0.in_conv.weight"].shape[1]
        widths = [sd[f"body.{i}.out_conv.weight"].shape[0] for i in range(LEVELS)]
        inner = [sd[f"body.{i}.in_conv.weight"].shape[0] for i in range(LEVELS)]
        nums_rb = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"body\.0\.body\.(\d+)\.", k)))
        with torch.device("meta"):
            net = AdapterLight(cin, widths, inner, nums_rb)
    elif "conv_in.weight" in sd and "body.0.block2.weight" in sd:
        cin = sd["conv_in.weight"].shape[1]
        blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"body\.(\d+)\.", k)))
        nums_rb = blocks // LEVELS
        widths = [sd[f"body.{i * nums_rb}.block1.weight"].shape[0] for i in range(LEVELS)]
        use_conv = any(k.endswith("down_opt.op.weight") for k in sd)
        with torch.device("meta"):
            net = Adapter(cin, widths, nums_rb, sd["body.0.block2.weight"].shape[2], use_conv, xl=cin in (256, 768))
    else:
        return None
    if any(".skep." in k for k in sd):
        return None        # the sk=False variant ComfyUI does not load either
    assign_weights(net, {k: v.float() for k, v in sd.items()}, f"T2I-Adapter in {path}")
    return T2IAdapterModel(net, path, cin // net.unshuffle_amount ** 2, device)
