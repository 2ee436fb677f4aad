"""DeepCache (Ma, Fang and Wang 2023, "DeepCache: Accelerating Diffusion Models for Free"):
reuse the UNet's deep features from one step to the next few.

Neighbouring denoising steps change the UNet's high-level (deep, low-resolution) features
little, while the shallow, full-resolution branch carries the detail. So every ``interval``
steps the UNet runs in full and the features entering its last ``depth + 1`` output blocks are
kept; the steps in between run only the shallow part — input blocks 0 … depth and those output
blocks, with their own skips — and take the deep features from the last full step:

    full step  k ≡ 0 (mod interval):  h = U_deep(x_k)            kept: h
    reuse step:                       ε = U_shallow(x_k, h)       (input blocks ≤ depth, output blocks ≥ N − 1 − depth)

The paper reports 2.3× on SD 1.5 and 2.6× on SDXL at a small cost in quality (its FID and
CLIP-score tables); the cost grows with the interval and with a shallower ``depth`` (less of
the UNet recomputed), and shows first as softer fine detail. It is an approximation: the
pictures differ from the full model's, which is why it is opt-in (the ``DeepCache`` node).

Steps are counted as the well-known ComfyUI node (laksjdjf's "DeepCache") counts them: model
calls, from the first call whose timestep lies in the window ``1000 − end_step ≤ t ≤ 1000 −
start_step`` (timesteps run 999 → 0); a call with a larger timestep than the last starts a new
run. Each batch layout (shape, which rows are cond/uncond, extra attention patches) keeps its
own count and features, so the extra model calls of PAG, SAG or Perp-Neg never read features
made for another batch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class DeepStep:
    """What one UNet forward does with the deep features (read by ``UNet.forward``)."""

    depth: int                          # input blocks 0 … depth (and as many output blocks) are shallow
    reuse: bool = False                 # take ``features`` instead of computing the deep part
    features: torch.Tensor | None = None  # the deep features of the last full step (written by the UNet)
    step: int = -1                      # calls counted in the window so far (0: the first)
    timestep: float = float("inf")      # the last call's timestep


class DeepCache:
    """The step cache a ``DeepCache`` node puts on a MODEL handle (``model_patches.step_cache``)."""

    LAYOUTS = 4          # batch layouts remembered (one per kind of model call in a step)

    def __init__(self, interval: int, depth: int, start_step: int = 0, end_step: int = 1000):
        if interval < 1:
            raise ValueError(f"cache_interval must be at least 1, got {interval}")
        self.interval, self.depth = int(interval), int(depth)
        self.start_step, self.end_step = start_step, end_step
        self._layouts: OrderedDict[tuple, DeepStep] = OrderedDict()

    def plan(self, x: torch.Tensor, timesteps: torch.Tensor, info: dict | None,
             attention_patches: bool) -> DeepStep | None:
        """The ``DeepStep`` of this call (None: outside the window, a plain full forward)."""
        layout = (tuple(x.shape), tuple((info or {}).get("cond_or_uncond") or ()), attention_patches)
        state = self._layouts.get(layout)
        if state is None:
            state = self._layouts[layout] = DeepStep(self.depth)
            while len(self._layouts) > self.LAYOUTS:
                self._layouts.popitem(last=False)
        self._layouts.move_to_end(layout)
        t = float(timesteps.reshape(-1)[0])
        if t > state.timestep:                           # noisier than the last call: a new run
            state.step, state.features = -1, None
        state.timestep = t
        if not 1000 - self.end_step <= t <= 1000 - self.start_step:
            state.step, state.features = -1, None
            return None
        state.step += 1
        state.reuse = state.step % self.interval != 0 and state.features is not None
        return state
