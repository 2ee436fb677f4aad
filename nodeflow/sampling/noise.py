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
    ``torchsde.BrownianTree`` (seeded with the seed, tolerance 1e-6, a 24-word entropy pool).
    By default the same tree is computed here (``_ComfyBrownianTree``): bit for bit
    torchsde's numbers, about three times faster, because each node's normal draw is made
    once (torchsde draws a parent's noise again for each of its two children) and more
    values stay cached. ``use_torchsde=True`` runs torchsde's own object instead (the tests
    compare the two); ``use_torchsde=False`` a tree of our own with the same law but other
    numbers, whose knots are the schedule's points (about one draw per query).
"""

from __future__ import annotations

import bisect
import itertools
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["BrownianTreeNoiseSampler", "NoiseSampler", "default_noise_sampler", "prepare_noise"]

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


class _Node:
    """An interval [start, end] of the dyadic tree; split at its rounded midpoint on demand."""
    __slots__ = ("depth", "end", "is_left", "key", "left", "mid", "parent", "right", "seed", "start")

    def __init__(self, start: float, end: float, parent: _Node | None, is_left: bool):
        self.start, self.end, self.parent, self.is_left = start, end, parent, is_left
        self.mid = self.left = self.right = self.seed = None
        self.key, self.depth = 0, 0


class _ComfyBrownianTree:
    """The Brownian motion of ``torchsde.BrownianTree(t0, zeros, t1, entropy=seed)`` with
    torchsde's defaults (tol 1e-6, pool_size 24, no Lévy area) — what ComfyUI samples its
    SDE noise from — computed bit for bit the same way:

    * times are rounded to 6 decimals (tol); the root holds W(t1) − W(t0) = √(t1 − t0)·N₀,
      N₀ drawn with the first of ``SeedSequence(seed, pool_size=24).generate_state(3)``;
    * every interval splits at its (rounded) midpoint: the "halfway" dyadic tree; node n has
      spawn key (2·key(parent) + side, depth) and its seed is the first word of
      ``SeedSequence(seed, spawn_key=(key, depth), pool_size=24).generate_state(4)``;
    * the left child's increment is the Brownian bridge at the midpoint,
      W_L = (m − a)·W·(1/(b − a)) + √((m − a)(b − m)/(b − a))·N(seed of the node), and
      W_R = W − W_L; a draw is ``torch.randn`` from a generator seeded with that seed;
    * a query [ta, tb] is the sum, left to right, of the maximal tree intervals that tile it.

    torchsde recomputes the left increment (a fresh normal draw) for each child and keeps 45
    values; here W_L is made once and reused for W_R, and ``cache_size`` values are kept:
    about 17 draws per query of a sampler walking down its schedule instead of about 55.
    The results are the same tensors, bit for bit (tests/sampling/test_noise.py).
    """

    def __init__(self, t0: float, t1: float, shape, dtype, device, entropy: int, *, tol: float = 1e-6,
                 pool_size: int = 24, cache_size: int = 160):
        t0, t1 = float(t0), float(t1)
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.entropy, self.pool_size = int(entropy), pool_size
        self.ndigits = -int(math.log10(tol))
        self.generator = torch.Generator(device=self.device)
        self.root = _Node(round(t0, self.ndigits), round(t1, self.ndigits), None, False)
        seed = np.random.SeedSequence(entropy=self.entropy, pool_size=pool_size).generate_state(3)[0]
        self.w_root = self._randn(seed) * math.sqrt(t1 - t0)
        # node -> W over its interval, the most recently used last. A sampler walking down the
        # schedule needs the paths to the last two or three query points (about 24 levels each);
        # 160 values hold them (fewer make the draws double), more only cost memory.
        self.cache_size = cache_size
        self.cache: OrderedDict[_Node, Tensor] = OrderedDict()

    def _randn(self, seed) -> Tensor:
        self.generator.manual_seed(int(seed))
        return torch.randn(self.shape, dtype=self.dtype, device=self.device, generator=self.generator)

    def _split(self, node: _Node, target: float) -> None:
        """Split ``node`` at its midpoint, and its children towards ``target`` until a
        midpoint is ``target`` (torchsde's halfway ``_split``)."""
        for _ in range(1024):                       # ~24 levels at tol 1e-6; never unbounded
            midway = 0.5 * (node.end + node.start)
            node.mid = round(midway, self.ndigits)
            if node.parent is not None:
                node.key = 2 * node.parent.key + (0 if node.is_left else 1)
                node.depth = node.parent.depth + 1
            node.left = _Node(node.start, node.mid, node, True)
            node.right = _Node(node.mid, node.end, node, False)
            if target > node.mid:
                node = node.right
            elif target < node.mid:
                node = node.left
            else:
                return
        raise RuntimeError(f"Brownian tree: cannot reach t = {target} by halving")

    def _tiling(self, ta: float, tb: float) -> list[_Node]:
        """The tree intervals that tile [ta, tb], left to right (creating the splits needed)."""
        out, pending = [], [(self.root, ta, tb)]
        while pending:
            node, a, b = pending.pop()
            while not (a == node.start and b == node.end):
                if node.mid is None:
                    self._split(node, b if a == node.start else a)
                if b <= node.mid:
                    node = node.left
                elif a >= node.mid:
                    node = node.right
                else:                                   # both halves: the left one first
                    pending.append((node.right, node.mid, b))
                    node, b = node.left, node.mid
            out.append(node)
        return out

    def _increment(self, node: _Node) -> Tensor:
        """W over ``node``'s interval."""
        if node.parent is None:
            return self.w_root
        w = self.cache.get(node)
        if w is not None:
            self.cache.move_to_end(node)
            return w
        parent = node.parent
        if node.is_left:
            w_parent = self._increment(parent)
            h_reciprocal = 1 / (parent.end - parent.start)
            left_diff, right_diff = parent.mid - parent.start, parent.end - parent.mid
            var = left_diff * right_diff * h_reciprocal
            if parent.seed is None:
                parent.seed = np.random.SeedSequence(entropy=self.entropy, spawn_key=(parent.key, parent.depth),
                                                     pool_size=self.pool_size).generate_state(4)[0]
            # torchsde's  left_diff * W * h_reciprocal + sqrt(var) * noise,  the same roundings in the
            # same order, in place on the two fresh tensors
            w = torch.mul(w_parent, left_diff).mul_(h_reciprocal)
            w.add_(self._randn(parent.seed).mul_(math.sqrt(var)))
        else:
            w_left = self._increment(parent.left)
            w = self._increment(parent) - w_left
        self.cache[node] = w
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return w

    def __call__(self, ta: float, tb: float) -> Tensor:
        """W(tb) − W(ta) for ta ≤ tb (clamped to the tree's range, as torchsde does)."""
        start, end = self.root.start, self.root.end
        ta, tb = min(max(float(ta), start), end), min(max(float(tb), start), end)
        ta, tb = round(ta, self.ndigits), round(tb, self.ndigits)
        if ta == tb:        # (torchsde recurses without end on an interval below its resolution)
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        tiles = self._tiling(ta, tb)
        w = self._increment(tiles[0])
        for node in tiles[1:]:
            w = w + self._increment(node)
        return w


class BrownianTreeNoiseSampler:
    """noise(σ, σ_next) = (W(σ_next) − W(σ)) / √|σ_next − σ| for one Brownian motion W per
    sampling run: standard normal for each call, correlated between overlapping intervals
    exactly as Brownian increments are (which SDE solvers with sub-steps rely on).

    ``cpu=True`` draws on the CPU and moves the result (ComfyUI's ``dpmpp_*_sde``);
    ``cpu=False`` draws on x's device (the ``_gpu`` variants). ``use_torchsde``: None (the
    default) computes ComfyUI's tree here, True uses torchsde's own ``BrownianTree`` (same
    numbers, slower), False the built-in tree (same law, other numbers), whose knots are the
    points of ``sigmas`` and their geometric midpoints.
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
        self._comfy_tree = self._torchsde_tree = self._tree = None
        if use_torchsde:
            import torchsde  # torchsde's own object, for comparison
            w0 = torch.zeros_like(x, device=tree_device)
            self._torchsde_tree = torchsde.BrownianTree(
                torch.as_tensor(t0, device=tree_device), w0, torch.as_tensor(t1, device=tree_device), entropy=int(seed))
        elif use_torchsde is None:
            # t0, t1 as float32 values, as ComfyUI hands them to torchsde
            t0f, t1f = (float(torch.tensor(v, dtype=torch.float32)) for v in (t0, t1))
            self._comfy_tree = _ComfyBrownianTree(t0f, t1f, x.shape, x.dtype, tree_device, int(seed))
        else:
            t0 = max(t0, 1e-6 * t1, 1e-12)          # the built-in tree works in log σ
            knots = []
            if sigmas is not None:
                s = [float(v) for v in sigmas if float(v) > 0]
                # and the sub-step points of the two-stage SDE solvers: geometric midpoints
                knots = s + [math.sqrt(a * b) for a, b in itertools.pairwise(s)]
            self._tree = _VirtualBrownianTree(x.shape, t0, t1, seed, tree_device, torch.float32, knots=knots)

    def __call__(self, sigma, sigma_next) -> Tensor:
        t0 = torch.as_tensor(sigma).detach().to("cpu", torch.float32).reshape(())
        t1 = torch.as_tensor(sigma_next).detach().to("cpu", torch.float32).reshape(())
        a, b = float(t0), float(t1)
        if a == b:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        if self._tree is not None:
            w = self._tree(hi) - self._tree(lo)
            return w.mul_(sign / math.sqrt(hi - lo)).to(device=self.device, dtype=self.dtype)
        # exactly ComfyUI's arithmetic: W over [lo, hi], signed, / √|σ_next − σ| in float32
        if self._comfy_tree is not None:
            w = self._comfy_tree(lo, hi)
        else:
            with warnings.catch_warnings():         # float32 end points trip torchsde's range check
                warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
                w = self._torchsde_tree(lo, hi)
        w = w.to(device=self.device, dtype=self.dtype)
        if sign < 0:
            w = -w
        return w / (t1 - t0).abs().sqrt().to(self.device)
