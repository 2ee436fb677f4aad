"""Noise, seeded the way ComfyUI seeds it (DESIGN §4).

Initial noise (``prepare_noise``)
    A CPU ``torch.Generator`` seeded with the seed; ``torch.randn(latent.shape, float32)``.
    With ``batch_index`` (latents cut out of a larger batch), one ``[1, C, H, W]`` draw per
    index 0 … max(batch_index) from that generator, keeping those in ``batch_index`` — so
    image k of a batch gets the same noise whether it is sampled alone or with the others.

Per-step noise of ancestral samplers (``default_noise_sampler``)
    A generator on the latent's device, seeded with ``seed + 1`` on the CPU (so it does
    not replay the initial noise) and ``seed`` on other devices; one ``randn`` of the latent's
    shape per call. Same device type ⇒ same numbers as ComfyUI.

Per-step noise of the DPM-Solver++ SDE samplers (``BrownianTreeNoiseSampler``)
    Increments of one Brownian motion W indexed by σ, sampled lazily on a binary tree whose
    nodes are seeded by their position, so that W(σ) never depends on the order of the
    queries, and overlapping increments are correlated as they must be. ComfyUI uses
    ``torchsde.BrownianTree``; when torchsde is importable we use it the same way, and the
    noise is ComfyUI's. Without it, our own tree (same law, different numbers) is used.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["prepare_noise", "default_noise_sampler", "BrownianTreeNoiseSampler", "NoiseSampler"]

NoiseSampler = Callable[[Tensor, Tensor], Tensor]   # (σ, σ_next) -> standard normal, x's shape

_U64 = 0xFFFF_FFFF_FFFF_FFFF
_KNOT_TOLERANCE = 4e-6   # in log σ: a query this close to a knot is that knot (float32 round-off)


def prepare_noise(latent: Tensor, seed: int, batch_index: Sequence[int] | None = None) -> Tensor:
    """The initial noise for ``latent`` ([B, C, H, W]): CPU, float32, ComfyUI-identical."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed) & _U64)
    shape = tuple(latent.shape)
    if batch_index is None:
        return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")
    indices = [int(i) for i in batch_index]
    wanted = set(indices)
    drawn: dict[int, Tensor] = {}
    for i in range(max(indices) + 1):
        noise = torch.randn((1,) + shape[1:], dtype=torch.float32, generator=generator, device="cpu")
        if i in wanted:
            drawn[i] = noise
    return torch.cat([drawn[i] for i in indices], dim=0)


def default_noise_sampler(x: Tensor, seed: int | None = None) -> NoiseSampler:
    """Fresh standard-normal noise of x's shape at each call, from a generator on x's device
    seeded with ``seed`` (+1 on the CPU); the global generator when ``seed`` is None."""
    generator = None
    if seed is not None:
        if x.device.type == "cpu":
            seed = int(seed) + 1
        generator = torch.Generator(device=x.device).manual_seed(int(seed) & _U64)

    def sample(sigma, sigma_next) -> Tensor:
        return torch.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return sample


# -- Brownian tree --------------------------------------------------------------------------------

def _splitmix64(value: int) -> int:
    """A 64-bit integer hash (SplitMix64's finaliser): distinct tree nodes get unrelated seeds."""
    value = (value + 0x9E3779B97F4A7C15) & _U64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _U64
    return value ^ (value >> 31)


class _VirtualBrownianTree:
    """W on [t0, t1] (0 < t0 < t1) with W(t0) = 0, sampled on demand by recursive bisection
    (a "virtual Brownian tree", Li et al. 2020, arXiv:2001.01328). A node splits its interval
    [a, b] at a point m and draws W there from the Brownian bridge, which is exact for any m:

        W(m) | W(a), W(b)  ~  N(W(a) + (m−a)/(b−a) · (W(b)−W(a)),  (m−a)(b−m)/(b−a))

    The upper levels split at the *knots* — the points the sampler will ask for (the schedule
    and its sub-steps), the median knot first — so a knot is a node of the tree and a run
    that walks down the schedule creates about one node per knot: one normal draw per query
    instead of one per level. A point between two knots is reached by bisecting that interval
    in log t for ``depth`` more levels, then drawing from the bridge over the final interval.
    Every draw comes from a generator seeded by a hash of (seed, node), so W is a function of
    (seed, knots, t), never of the order of the queries; the joint law of the values returned
    is exactly Brownian as long as no two queried points that are not knots share a final
    interval.
    """

    def __init__(self, shape, t0: float, t1: float, seed: int, device, dtype, knots: Sequence[float] = (),
                 depth: int = 16, cache_size: int = 64):
        self.shape, self.depth = tuple(shape), int(depth)
        self.device, self.dtype = torch.device(device), dtype
        self.seed = int(seed) & _U64
        self.generator = torch.Generator(device=self.device)
        inner = sorted({float(k) for k in knots if t0 < float(k) < t1})
        self.points = [float(t0)] + inner + [float(t1)]     # node i of the top tree sits at points[i]
        self.log_points = [math.log(v) for v in self.points]
        self.nodes: OrderedDict[tuple, Tensor] = OrderedDict()     # node key -> W there
        self.values: OrderedDict[float, Tensor] = OrderedDict()    # recent query results
        self.cache_size = cache_size
        self.w0 = torch.zeros(self.shape, dtype=dtype, device=self.device)
        self.w1 = self._normal(0, 0, 0) * math.sqrt(self.points[-1] - self.points[0])

    def _normal(self, *node: int) -> Tensor:
        key = 0
        for part in node:
            key = _splitmix64(key ^ (part & _U64))
        self.generator.manual_seed(_splitmix64(self.seed ^ key))
        return torch.randn(self.shape, dtype=self.dtype, device=self.device, generator=self.generator)

    def _bridge(self, key: tuple, t: float, ta: float, tb: float, wa: Tensor, wb: Tensor, cache: bool) -> Tensor:
        if cache:
            w = self.nodes.get(key)
            if w is not None:
                self.nodes.move_to_end(key)
                return w
        std = math.sqrt((t - ta) * (tb - t) / (tb - ta))
        w = torch.lerp(wa, wb, (t - ta) / (tb - ta)).add_(self._normal(*key), alpha=std)
        if cache:
            self._remember(self.nodes, key, w, self.cache_size)
        return w

    @staticmethod
    def _remember(cache: OrderedDict, key, value, size: int) -> None:
        cache[key] = value
        if len(cache) > size:
            cache.popitem(last=False)

    def _knot(self, t: float) -> int | None:
        """The index of the knot at t (to float32 rounding of the sampler's arithmetic), if any."""
        i = bisect.bisect_left(self.points, t)
        log_t = math.log(t)
        for j in (i - 1, i):
            if 0 <= j < len(self.points) and abs(self.log_points[j] - log_t) < _KNOT_TOLERANCE:
                return j
        return None

    def __call__(self, t: float) -> Tensor:
        t = min(max(float(t), self.points[0]), self.points[-1])
        if t in self.values:
            return self.values[t]
        target = self._knot(t)
        lo, hi = 0, len(self.points) - 1
        w_lo, w_hi = self.w0, self.w1
        # down the knot tree: to the knot itself, or to the two knots around t
        while hi - lo > 1 and target not in (lo, hi):
            mid = (lo + hi) // 2
            w_mid = self._bridge((1, mid), self.points[mid], self.points[lo], self.points[hi], w_lo, w_hi, True)
            if target == mid:
                lo, w_lo = mid, w_mid
                break
            if t < self.points[mid]:
                hi, w_hi = mid, w_mid
            else:
                lo, w_lo = mid, w_mid
        if target is not None:
            w = w_lo if target == lo else w_hi
        else:
            # between knots lo and hi: bisect in log t, then the bridge over the final interval
            ta, tb = self.points[lo], self.points[hi]
            log_a, span = self.log_points[lo], self.log_points[hi] - self.log_points[lo]
            u = (math.log(t) - log_a) / span
            a, b, wa, wb = 0.0, 1.0, w_lo, w_hi
            for level in range(1, self.depth + 1):
                m = 0.5 * (a + b)
                tm = math.exp(log_a + m * span)
                wm = self._bridge((2, lo, level, int(m * (1 << level))), tm, ta, tb, wa, wb, True)
                if u < m:
                    b, wb, tb = m, wm, tm
                else:
                    a, wa, ta = m, wm, tm
            w = self._bridge((3, lo, int(a * (1 << self.depth))), t, ta, tb, wa, wb, False)
        self._remember(self.values, t, w, 8)
        return w


class BrownianTreeNoiseSampler:
    """noise(σ, σ_next) = (W(σ_next) − W(σ)) / √|σ_next − σ| for one Brownian motion W per
    sampling run: standard normal for each call, correlated between overlapping intervals
    exactly as Brownian increments are (which SDE solvers with sub-steps rely on).

    ``cpu=True`` draws on the CPU and moves the result (ComfyUI's ``dpmpp_*_sde``);
    ``cpu=False`` draws on x's device (the ``_gpu`` variants). ``sigmas`` (optional): the
    schedule, whose points and geometric midpoints become knots of the built-in tree.
    """

    def __init__(self, x: Tensor, sigma_min, sigma_max, seed: int | None = None, *, cpu: bool = True,
                 sigmas: Tensor | None = None, use_torchsde: bool | None = None):
        self.device, self.dtype, self.shape = x.device, x.dtype, tuple(x.shape)
        t0, t1 = float(sigma_min), float(sigma_max)
        if t0 > t1:
            t0, t1 = t1, t0
        if seed is None:
            seed = int(torch.randint(0, 2 ** 63 - 1, ()).item())
        tree_device = torch.device("cpu") if cpu else x.device
        self._torchsde_tree = None
        if use_torchsde is None or use_torchsde:
            try:
                import torchsde  # optional: the exact noise of ComfyUI
            except ImportError:
                if use_torchsde:
                    raise
            else:
                w0 = torch.zeros_like(x, device=tree_device)
                self._torchsde_tree = torchsde.BrownianTree(
                    torch.as_tensor(t0, device=tree_device), w0, torch.as_tensor(t1, device=tree_device), entropy=int(seed))
                self._tree_device = tree_device
        if self._torchsde_tree is None:
            t0 = max(t0, 1e-6 * t1, 1e-12)          # the built-in tree works in log σ
            knots = []
            if sigmas is not None:
                s = [float(v) for v in sigmas if float(v) > 0]
                # and the sub-step points of the two-stage SDE solvers: geometric midpoints
                knots = s + [math.sqrt(a * b) for a, b in zip(s, s[1:])]
            self._tree = _VirtualBrownianTree(x.shape, t0, t1, seed, tree_device, torch.float32, knots=knots)

    def __call__(self, sigma, sigma_next) -> Tensor:
        t0 = torch.as_tensor(sigma).detach().to("cpu", torch.float32).reshape(())
        t1 = torch.as_tensor(sigma_next).detach().to("cpu", torch.float32).reshape(())
        if t0 == t1:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        lo, hi, sign = (t0, t1, 1.0) if t0 < t1 else (t1, t0, -1.0)
        if self._torchsde_tree is not None:         # exactly ComfyUI's arithmetic
            with warnings.catch_warnings():         # float32 end points trip torchsde's range check
                warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
                w = self._torchsde_tree(lo.to(self._tree_device), hi.to(self._tree_device))
            w = w.to(device=self.device, dtype=self.dtype) * sign
            return w / (t1 - t0).abs().sqrt().to(self.device)
        w = self._tree(float(hi)) - self._tree(float(lo))
        return w.mul_(sign / math.sqrt(float(hi) - float(lo))).to(device=self.device, dtype=self.dtype)
