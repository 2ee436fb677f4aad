"""GLIGEN (Li et al. 2023, "GLIGEN: Open-Set Grounded Text-to-Image Generation"), text boxes.

Each grounded phrase is its text's pooled CLIP embedding p and a box (x₀, y₀, x₁, y₁) in 0..1;
a position net turns them into grounding tokens (up to 30; unused slots take learnt null
features):

    e = linears([p ; Fourier(box)])             Fourier: sin and cos of 100^(k/8)·box, k < 8

and a gated self-attention ("fuser") after every transformer block's self-attention lets the
visual tokens attend to them:

    v ← v + tanh(α_attn) · SelfAttn(LN([v ; W e]))[:N_visual];  v ← v + tanh(α_dense) · FF(LN(v))

The n-th fuser belongs to the n-th SpatialTransformer of the UNet (input, middle, output
blocks in order); it runs as a ``transformer_middle`` model patch. Files: the SD 1.x text-box
GLIGEN files (keys ``….fuser.*`` per block and ``position_net.*``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from nodeflow.models import devices
from nodeflow.models.files import CheckpointError, assign_weights, read_all
from nodeflow.models.unet import CrossAttention, FeedForward

MAX_OBJECTS = 30
FOURIER_FREQS = 8


class GatedSelfAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        self.linear = nn.Linear(context_dim, query_dim)
        self.attn = CrossAttention(query_dim, query_dim, heads, dim_head)
        self.ff = FeedForward(query_dim)
        self.norm1, self.norm2 = nn.LayerNorm(query_dim), nn.LayerNorm(query_dim)
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
        n_visual = x.shape[1]
        objs = self.linear(objs)
        x = x + torch.tanh(self.alpha_attn) * self.attn(self.norm1(torch.cat([x, objs], dim=1)))[:, :n_visual]
        return x + torch.tanh(self.alpha_dense) * self.ff(self.norm2(x))


def fourier(boxes: torch.Tensor, freqs: int = FOURIER_FREQS, temperature: float = 100.0) -> torch.Tensor:
    """(…, 4) -> (…, 4·2·freqs): [sin(f₀x), cos(f₀x), sin(f₁x), …] with f_k = temperature^(k/freqs)."""
    bands = temperature ** (torch.arange(freqs) / freqs)
    return torch.cat([g(f * boxes) for f in bands for g in (torch.sin, torch.cos)], dim=-1)


class PositionNet(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        position_dim = FOURIER_FREQS * 2 * 4
        self.linears = nn.Sequential(nn.Linear(in_dim + position_dim, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(),
                                     nn.Linear(512, out_dim))
        self.null_positive_feature = nn.Parameter(torch.zeros(in_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(position_dim))

    def forward(self, boxes: torch.Tensor, masks: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """boxes (B, N, 4), masks (B, N), embeddings (B, N, in_dim) -> grounding tokens (B, N, out_dim)."""
        masks = masks.unsqueeze(-1)
        xyxy = fourier(boxes).to(boxes.dtype)
        embeddings = embeddings * masks + (1 - masks) * self.null_positive_feature.view(1, 1, -1)
        xyxy = xyxy * masks + (1 - masks) * self.null_position_feature.view(1, 1, -1)
        return self.linears(torch.cat([embeddings, xyxy], dim=-1))


class Gligen(nn.Module):
    """The fusers, in SpatialTransformer order, and the position net."""

    def __init__(self, fusers: list[GatedSelfAttention], position_net: PositionNet, key_dim: int):
        super().__init__()
        self.module_list = nn.ModuleList(fusers)
        self.position_net = position_net
        self.key_dim = key_dim


class GligenModel:
    """A loaded GLIGEN (the GLIGEN value)."""

    def __init__(self, net: Gligen, path: str, device=None):
        self.net, self.path = net, path
        self.device = torch.device(device) if device is not None else devices.get_device()

    @property
    def name(self) -> str:
        return Path(self.path).name

    def tokens(self, params: list, shape: tuple, device) -> torch.Tensor:
        """Grounding tokens (B, 30, D) for ``params`` [(pooled, h, w, y, x) in latent cells] on a
        model input of ``shape`` (B, C, h, w); boxes relative to that input, as ComfyUI makes them."""
        batch, _, h, w = shape
        device = torch.device(device)
        boxes = torch.zeros(MAX_OBJECTS, 4)
        masks = torch.zeros(MAX_OBJECTS)
        embeddings = torch.zeros(MAX_OBJECTS, self.net.key_dim)
        for i, (pooled, bh, bw, by, bx) in enumerate(params[:MAX_OBJECTS]):
            pooled = pooled.reshape(-1).float()
            if pooled.shape[0] != self.net.key_dim:
                raise ValueError(f"the GLIGEN model '{self.name}' takes text embeddings of width {self.net.key_dim}, "
                                 f"got {pooled.shape[0]}: it is for SD 1.x's CLIP-L")
            boxes[i] = torch.tensor([bx / w, by / h, (bx + bw) / w, (by + bh) / h])
            masks[i] = 1.0
            embeddings[i] = pooled
        dtype = next(self.net.parameters()).dtype
        devices.model_manager().load(self.net, device)
        return self.net.position_net(boxes.expand(batch, -1, -1).to(device, dtype),
                                     masks.expand(batch, -1).to(device, dtype),
                                     embeddings.expand(batch, -1, -1).to(device, dtype))

    def transformer_patch(self, kind: str, params: list, shape: tuple, device):
        """A ``transformer_middle`` patch: the fuser of the current SpatialTransformer."""
        objs = self.tokens(params if kind == "position" else [], shape, device)
        fusers = self.net.module_list

        def patch(x: torch.Tensor, info: dict) -> torch.Tensor:
            index = info["transformer_index"]
            if index >= len(fusers):
                raise ValueError(f"the GLIGEN model '{self.name}' has {len(fusers)} fusers, but the UNet has more "
                                 "transformers: it is for another model")
            return fusers[index](x, objs.to(x.device, x.dtype))

        return patch


def load_gligen(path, *, device=None, dtype: torch.dtype | None = None) -> GligenModel:
    """A GLIGEN text-box file. Unknown layouts raise CheckpointError naming the file."""
    device = torch.device(device) if device is not None else devices.get_device()
    dtype = dtype or devices.compute_dtype(device)
    sd = read_all(path, dtype)
    groups: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    order = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}
    for key, value in sd.items():
        m = re.search(r"(input_blocks|middle_block|output_blocks)\.(\d+)\..*?\.fuser\.(.+)$", key)
        if m:
            groups.setdefault((order[m.group(1)], int(m.group(2))), {})[m.group(3)] = value
    if not groups or "position_net.null_positive_feature" not in sd:
        raise CheckpointError(f"{path}: not a GLIGEN model of a known layout (expected '….fuser.*' keys per "
                              "transformer and 'position_net.*')")
    in_dim = sd["position_net.null_positive_feature"].shape[0]
    out_dim = sd["position_net.linears.4.weight"].shape[0]
    fusers = []
    with torch.device("meta"):
        for key in sorted(groups):
            query_dim, key_dim = groups[key]["linear.weight"].shape
            heads = 8 if key_dim == 768 or query_dim < 64 else query_dim // 64      # SD 1.x: 8 heads
            heads = heads if query_dim % heads == 0 else 1
            fusers.append(GatedSelfAttention(query_dim, key_dim, heads, query_dim // heads))
        net = Gligen(fusers, PositionNet(in_dim, out_dim), in_dim)
    state = {f"module_list.{i}.{k}": v for i, key in enumerate(sorted(groups)) for k, v in groups[key].items()}
    state.update({k: v for k, v in sd.items() if k.startswith("position_net.")})
    assign_weights(net, state, f"GLIGEN model in {path}")
    return GligenModel(net, str(path), device)
