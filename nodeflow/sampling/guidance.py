"""The denoiser samplers call: D(x, σ) from the model, with conditioning and
classifier-free guidance (Ho & Salimans 2022):

    D(x, σ) = D_u + cfg · (D_c − D_u)

where D_c (D_u) is the weighted average of the predictions of the positive (negative)
conditioning entries. An entry may cover only an ``area`` of the latent (ConditioningSetArea),
carry a ``strength`` and a ``mask``, or be active only for part of the schedule
(``start_percent``/``end_percent``); several entries (ConditioningCombine) are averaged with
these weights, exactly as ComfyUI does:

    D_c = Σ_e  w_e ⊙ D(x[area_e], σ | c_e)  /  Σ_e w_e          (sums over the area each covers)

Every active entry of both signs that can share a forward pass is run in **one** batched
``apply_model`` call; with cfg = 1 the negative entries are skipped (unless a CFG++ sampler
asks for D_u). Conditioning tensors of different token lengths are batched by repeating them
to their least common multiple (at most 4×), which leaves cross-attention unchanged.

An entry may also carry a ``control`` (ControlNet / T2I-Adapter chain: its residuals are
computed for each forward pass the entry is in, which only entries with the same control
share) and ``gligen`` boxes (a transformer patch, one forward pass per entry), and the model
handle may carry model patches (``nodeflow.models.model_patches``): a CFG function replacing
the formula above, post-CFG functions after it, and UNet patches passed to every forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from nodeflow.sampling import handle
from nodeflow.sampling.handle import ModelHandle
from nodeflow.sampling.model_sampling import DiscreteSchedule

__all__ = ["CFGDenoiser", "blank_inpaint_latent", "prepare_conditioning", "repeat_to_batch_size"]

FEATHER = 8   # at most this many latent rows/columns over which an area's weight ramps up at its
              # inner edges: min(FEATHER, size // 4) along each axis, as ComfyUI does


def repeat_to_batch_size(t: Tensor, batch: int) -> Tensor:
    """Cut or tile t along dim 0 to ``batch`` rows."""
    if t.shape[0] > batch:
        return t[:batch]
    if t.shape[0] < batch:
        return t.repeat((math.ceil(batch / t.shape[0]),) + (1,) * (t.ndim - 1))[:batch]
    return t


def blank_inpaint_latent(like: Tensor) -> Tensor:
    """The (processed) SD latent of an all-grey image: the masked image of an inpainting
    model when no mask is given."""
    values = torch.tensor([0.8223, -0.6876, 0.6364, 0.1380], dtype=like.dtype, device=like.device)
    return torch.ones_like(like) * values.reshape(1, -1, 1, 1)


# -- preparing the entries ------------------------------------------------------------------------

@dataclass
class Entry:
    """One conditioning entry, ready for sampling."""
    cond: Tensor                          # (B, T, D) text conditioning, batched to the latent batch
    kwargs: dict                          # extra apply_model arguments (y, c_concat) for the full latent
    meta: dict                            # the entry's options, areas/masks resolved
    uncond: bool = False
    area: tuple[int, int, int, int] | None = None     # (h, w, y, x) in latent cells
    sigma_start: float | None = None      # active while σ ≤ sigma_start …
    sigma_end: float | None = None        # … and σ ≥ sigma_end
    mult: Tensor | None = None            # (B, C, h, w) weight of this entry's prediction, or None when …
    weight: float = 1.0                   # … it is the same everywhere (no area, no mask): the strength
    crop_kwargs: dict = field(default_factory=dict)   # kwargs cut to the area
    size: tuple[int, int] = (0, 0)        # (h, w) of the model input: the area's, or the latent's

    def active(self, sigma: float) -> bool:
        if self.sigma_start is not None and sigma > self.sigma_start:
            return False
        return self.sigma_end is None or sigma >= self.sigma_end


def _mask_bounds(mask: Tensor):
    """(y0, x0, y1, x1) of the non-zero cells of a (H, W) mask, or None if it is all zero."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def _resolve_area_and_mask(meta: dict, h: int, w: int, device) -> dict:
    """Turn percentage areas into cells, resize masks to the latent, and replace the area by
    the mask's bounding box when ``set_area_to_bounds`` is set."""
    meta = dict(meta)
    area = meta.get("area")
    if area is not None and area[0] == "percentage":
        meta["area"] = (max(1, round(area[1] * h)), max(1, round(area[2] * w)), round(area[3] * h), round(area[4] * w))
    if meta.get("mask") is not None:
        mask = torch.as_tensor(meta["mask"]).to(device=device, dtype=torch.float32)
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape[1:]) != (h, w):
            mask = F.interpolate(mask.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
        if meta.get("set_area_to_bounds", False):
            bounds = _mask_bounds(mask.abs().max(dim=0).values)
            if bounds is None:
                meta["area"] = (8, 8, 0, 0)
            else:
                y0, x0, y1, x1 = bounds
                meta["area"] = (max(8, y1 - y0 + 1), max(8, x1 - x0 + 1), y0, x0)
        meta["mask"] = mask
    return meta


def _concat_kwargs(model, meta: dict, batch: int, shape, latent_image, denoise_mask, device) -> dict:
    """c_concat for inpainting models (in_channels = latent channels + 5): the denoise mask
    and the masked image's latent, as VAEEncodeForInpaint / InpaintModelConditioning mean."""
    extra = handle.concat_channels(model)
    if extra <= 0:
        return {}
    h, w = shape[-2:]
    image = meta.get("concat_latent_image")
    if image is not None:
        image = model.process_latent_in(torch.as_tensor(image).to(device=device, dtype=torch.float32))
    elif latent_image is not None:
        image = latent_image.to(device)
    else:
        image = torch.zeros(shape, device=device)
    if tuple(image.shape[-2:]) != (h, w):
        image = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)
    image = repeat_to_batch_size(image, batch)
    mask = meta.get("concat_mask", denoise_mask)
    if mask is not None:
        mask = torch.as_tensor(mask).to(device=device, dtype=torch.float32)
        if mask.ndim == 4:
            mask = mask[:, :1]
        mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:]))
        if tuple(mask.shape[-2:]) != (h, w):
            mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
        mask = repeat_to_batch_size(mask.round(), batch)
    else:
        mask = torch.ones((batch, 1, h, w), device=device)
        image = blank_inpaint_latent(image)
    return {"c_concat": torch.cat([mask, image], dim=1)}


def _model_kwargs(model, meta: dict, batch: int, shape, latent_image, denoise_mask, device, seed: int = 0) -> dict:
    """Extra apply_model arguments of one entry (SDXL's ``y``; c_concat), batched. The sampling
    seed joins the entry's options, as in ComfyUI (unCLIP's noise augmentation draws from it)."""
    kwargs = {}
    condition_kwargs = handle.condition_kwargs(model)
    if condition_kwargs is not None:
        for key, value in (condition_kwargs({**meta, "seed": seed}, batch, shape[-1] * 8, shape[-2] * 8) or {}).items():
            if isinstance(value, Tensor):
                value = repeat_to_batch_size(value.to(device), batch)
            kwargs[key] = value
    kwargs.update(_concat_kwargs(model, meta, batch, shape, latent_image, denoise_mask, device))
    return kwargs


def _add_same_area_counterparts(entries: list[Entry], others: list[Entry]) -> None:
    """For each entry of ``others`` with an area, give ``entries`` an entry with the same
    area and weights, using the text of the smallest entry of ``entries`` that encloses it
    (so both sides of CFG are averaged over the same regions)."""
    for c in list(others):
        if c.area is None:
            continue
        ch, cw, cy, cx = c.area
        smallest = None
        for e in entries:
            if e.area is None:
                if smallest is None:
                    smallest = e
                continue
            h, w, y, x = e.area
            inside = cy >= y and cx >= x and h + y >= ch + cy and w + x >= cw + cx
            if inside and (smallest is None or smallest.area is None or smallest.area[0] * smallest.area[1] > h * w):
                smallest = e
        if smallest is None or (smallest.area is not None and smallest.area == c.area):
            continue
        entries.append(Entry(cond=smallest.cond, kwargs=smallest.kwargs, meta=c.meta, uncond=entries[0].uncond,
                             area=c.area, sigma_start=c.sigma_start, sigma_end=c.sigma_end))


def _share_with_negative(positive: list[Entry], negative: list[Entry], key: str, only_flagged: bool) -> None:
    """ComfyUI's apply_empty_x_to_equal_area: the ``key`` ("control" of ControlNetApply, "gligen")
    of whole-latent positive entries is given to whole-latent negative entries that have none,
    unless a negative entry already has one."""
    sources = [e.meta[key] for e in positive if e.area is None and e.meta.get(key) is not None
               and (not only_flagged or e.meta.get("control_apply_to_uncond", False))]
    if any(e.area is None and e.meta.get(key) is not None for e in negative):
        return
    targets = [e for e in negative if e.area is None]
    if not targets:
        return
    for i, value in enumerate(sources):
        target = targets[i % len(targets)]
        target.meta = {**target.meta, key: value}


def _finish(entry: Entry, shape) -> None:
    """Clip the area to the latent and compute the entry's weight (strength × mask × feather)."""
    b, ch, h, w = shape
    meta = entry.meta
    area = entry.area
    if area is not None:
        ah, aw, ay, ax = (int(v) for v in area)
        area = (min(h - ay, ah), min(w - ax, aw), ay, ax)
        entry.area = area
    ah, aw, ay, ax = area if area is not None else (h, w, 0, 0)
    entry.size = (ah, aw)
    mask = meta.get("mask")
    entry.crop_kwargs = {}
    for key, value in entry.kwargs.items():
        if key == "c_concat" and area is not None:
            value = value[:, :, ay:ay + ah, ax:ax + aw]
        entry.crop_kwargs[key] = value
    if mask is None and area is None:
        entry.mult, entry.weight = None, float(meta.get("strength", 1.0))
        return
    if mask is not None:
        mask = mask[:b, ay:ay + ah, ax:ax + aw] * meta.get("mask_strength", 1.0)
        mult = mask.unsqueeze(1).repeat(b // mask.shape[0], ch, 1, 1)
    else:
        mult = torch.ones((b, ch, ah, aw), device=entry.cond.device)
    mult = mult * meta.get("strength", 1.0)
    if mask is None and area is not None:
        # feather the edges that lie inside the latent: the weight ramps 1/rr, 2/rr, … 1 over
        # rr = min(8, size // 4) cells along each axis (no ramp for an area under 4 cells)
        for dim, size, start, full in ((2, ah, ay, h), (3, aw, ax, w)):
            rr = min(FEATHER, size // 4)
            for t in range(rr):
                r = (1.0 / rr) * (t + 1)
                if start != 0:
                    mult.narrow(dim, t, 1).mul_(r)
                if size + start < full:
                    mult.narrow(dim, size - 1 - t, 1).mul_(r)
    entry.mult = mult


def prepare_conditioning(model, schedule: DiscreteSchedule, positive, negative, shape, device,
                         latent_image: Tensor | None = None, denoise_mask: Tensor | None = None,
                         seed: int = 0) -> list[Entry]:
    """Entries of both signs for a latent of ``shape`` (B, C, h, w), as ComfyUI's
    process_conds prepares them."""
    b, _, h, w = shape
    sides = []
    for conds, uncond in ((positive, False), (negative, True)):
        side = []
        for cond, meta in conds:
            meta = _resolve_area_and_mask(meta or {}, h, w, device)
            if meta.get("control") is not None:
                meta["control"].check(model)          # a ControlNet made for another model family
            cond = repeat_to_batch_size(torch.as_tensor(cond).to(device=device, dtype=torch.float32), b)
            kwargs = _model_kwargs(model, meta, b, shape, latent_image, denoise_mask, device, seed)
            entry = Entry(cond=cond, kwargs=kwargs, meta=meta, uncond=uncond, area=meta.get("area"))
            if "start_percent" in meta:
                entry.sigma_start = schedule.percent_to_sigma(meta["start_percent"])
            if "end_percent" in meta:
                entry.sigma_end = schedule.percent_to_sigma(meta["end_percent"])
            side.append(entry)
        sides.append(side)
    pos, neg = sides
    if neg:
        _add_same_area_counterparts(neg, pos)
    if pos:
        _add_same_area_counterparts(pos, neg)
    _share_with_negative(pos, neg, "control", only_flagged=True)
    _share_with_negative(pos, neg, "gligen", only_flagged=False)
    entries = pos + neg
    for entry in entries:
        _finish(entry, shape)
    return entries


# -- batching ------------------------------------------------------------------------------------

def _can_batch(a: Entry, b: Entry) -> bool:
    """Whether two entries can share a forward pass: same size, the same control chain (or
    none), no GLIGEN boxes (each such entry runs alone, as in ComfyUI), compatible tensors."""
    if a.size != b.size or a.meta.get("control") is not b.meta.get("control"):
        return False
    if a is not b and (a.meta.get("gligen") is not None or b.meta.get("gligen") is not None):
        return False
    s1, s2 = a.cond.shape, b.cond.shape
    if s1 != s2:
        if s1[0] != s2[0] or s1[2] != s2[2]:
            return False
        if math.lcm(s1[1], s2[1]) // min(s1[1], s2[1]) > 4:
            return False
    if a.crop_kwargs.keys() != b.crop_kwargs.keys():
        return False
    return all(getattr(a.crop_kwargs[k], "shape", None) == getattr(b.crop_kwargs[k], "shape", None)
               for k in a.crop_kwargs)


def _cat_conds(conds: list[Tensor]) -> Tensor:
    """Concatenate text conditionings, repeating each to the LCM of their token lengths."""
    length = 1
    for c in conds:
        length = math.lcm(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in conds])


@dataclass
class _Batch:
    entries: list[Entry]
    context: Tensor
    kwargs: dict
    whole: bool = False        # every entry covers the whole latent: the model input is x, n times

    @property
    def control(self):
        return self.entries[0].meta.get("control")

    @property
    def gligen(self):
        return self.entries[0].meta.get("gligen")


def _make_batches(entries: list[Entry], max_entries: int | None) -> list[_Batch]:
    batches, todo = [], list(entries)
    while todo:
        first = todo[0]
        group = [e for e in todo if _can_batch(first, e)]
        if max_entries:
            group = group[:max_entries]
        todo = [e for e in todo if not any(e is g for g in group)]
        kwargs = {k: torch.cat([e.crop_kwargs[k] for e in group]) if isinstance(first.crop_kwargs[k], Tensor)
                  else first.crop_kwargs[k] for k in first.crop_kwargs}
        batches.append(_Batch(group, _cat_conds([e.cond for e in group]), kwargs,
                              whole=all(e.area is None for e in group)))
    return batches


class CFGDenoiser:
    """D(x, σ) with conditioning and classifier-free guidance, for one sampling run.

    Per call the work outside the model is a few tensor operations: the batches are prepared
    once per set of active entries, the σ-dependent factors (σ per row, timestep, σ² + 1,
    √(σ² + 1)) once per call and remembered per σ value when σ is on the CPU; a σ on another
    device is never read back to Python unless an entry has a start/end percentage."""

    _TERMS_CACHE = 32            # σ values remembered (a run revisits few; multistage ones more)

    def __init__(self, model: ModelHandle, schedule: DiscreteSchedule, positive, negative, cfg: float, shape, device,
                 latent_image: Tensor | None = None, denoise_mask: Tensor | None = None,
                 max_batch_entries: int | None = None, seed: int = 0):
        self.model, self.schedule, self.cfg = model, schedule, float(cfg)
        self.shape, self.device, self.seed = shape, device, seed
        self._latent_image, self._denoise_mask = latent_image, denoise_mask
        self.entries = prepare_conditioning(model, schedule, positive, negative, shape, device,
                                            latent_image=latent_image, denoise_mask=denoise_mask, seed=seed)
        self.positive = [e for e in self.entries if not e.uncond]
        self.negative = [e for e in self.entries if e.uncond]
        self.patches = handle.model_patches(model)
        self.max_batch_entries = max_batch_entries
        self._prepared: dict[int, tuple] = {}
        self._batches: dict[tuple, list[_Batch]] = {}
        self._timed = any(e.sigma_start is not None or e.sigma_end is not None for e in self.entries)
        # the per-call shortcuts assume DiscreteSchedule's own σ maps (a subclass, e.g. LCM's or
        # x₀-prediction's, gets the plain per-row computation)
        self._plain_schedule = all(getattr(type(schedule), name) is getattr(DiscreteSchedule, name)
                                   for name in ("timestep", "terms", "calculate_input", "calculate_denoised"))
        self._terms: dict[tuple, tuple] = {}
        self.model_calls = 0                      # forward passes so far (for tests and stats)

    def _batches_for(self, sigma: Tensor, with_uncond: bool) -> list[_Batch]:
        if self._timed:
            value = float(sigma.reshape(-1)[0])
            active = tuple(e.active(value) and (with_uncond or not e.uncond) for e in self.entries)
        else:
            active = with_uncond
        batches = self._batches.get(active)
        if batches is None:
            if isinstance(active, bool):
                chosen = [e for e in self.entries if with_uncond or not e.uncond]
            else:
                chosen = [e for e, on in zip(self.entries, active) if on]
            batches = self._batches[active] = _make_batches(chosen, self.max_batch_entries)
        return batches

    def _sigma_terms(self, sigma: Tensor, n: int, like: Tensor):
        """(σ for the n·B rows, their timesteps, their SigmaTerms), remembered per σ. A σ on
        the CPU that is the same for every row (as samplers pass it) is worked out on the
        host, without a tensor operation per factor."""
        if sigma.device.type != "cpu" or not self._plain_schedule:
            sigma_in = sigma.repeat(n) if n > 1 else sigma
            return sigma_in, self.schedule.timestep(sigma_in), self.schedule.terms(sigma_in, like)
        values = sigma.tolist()
        key = (tuple(values), n, like.dtype, like.device)
        found = self._terms.get(key)
        if found is not None:
            return found
        if like.dtype == torch.float32 and values.count(values[0]) == len(values):
            t = self.schedule.timestep_value(values[0])
            found = (sigma, torch.full((n * len(values),), t, device=sigma.device),
                     self.schedule.terms_value(values[0], like))
        else:
            sigma_in = sigma.repeat(n) if n > 1 else sigma
            found = (sigma_in, self.schedule.timestep(sigma_in), self.schedule.terms(sigma_in, like))
        if len(self._terms) >= self._TERMS_CACHE:
            self._terms.pop(next(iter(self._terms)))
        self._terms[key] = found
        return found

    def _forward(self, batch: _Batch, x: Tensor, sigma: Tensor, extra_patches=None) -> Tensor:
        """D of each entry of ``batch``: (B, C, h, w) for one entry, else (n, B, C, h', w')."""
        b, _, h, w = x.shape
        n = len(batch.entries)
        sigma_in, t, terms = self._sigma_terms(sigma, n, x)
        whole = batch.whole and (n == 1 or (self._plain_schedule and terms.root.shape[0] == 1))
        if whole:
            # n copies of x under one σ: scale x once, and take D against x broadcast
            # over the n entries — the same values as on n stacked copies, with less work
            scaled = self.schedule.calculate_input(sigma_in, x, terms)
            x_in, scaled = x, (scaled if n == 1 else torch.cat([scaled] * n))
        else:
            crops = []
            for e in batch.entries:
                ah, aw, ay, ax = e.area if e.area is not None else (h, w, 0, 0)
                crops.append(x[:, :, ay:ay + ah, ax:ax + aw])
            x_in = torch.cat(crops) if n > 1 else crops[0]                 # (n·B, C, ah, aw)
            scaled = self.schedule.calculate_input(sigma_in, x_in, terms)
        kwargs = self._call_options(batch, scaled, t, sigma, n, extra_patches)
        output = self.model.apply_model(scaled, t, batch.context, **kwargs).float()
        self.model_calls += 1
        if whole:
            if n > 1:
                output = output.reshape((n,) + tuple(x.shape))               # (n, B, C, h, w)
            return self.schedule.calculate_denoised(sigma_in, output, x_in, terms)
        denoised = self.schedule.calculate_denoised(sigma_in, output, x_in, terms)
        return denoised if n == 1 else denoised.reshape((n, b) + tuple(denoised.shape[1:]))

    def _call_options(self, batch: _Batch, scaled: Tensor, t: Tensor, sigma: Tensor, n: int, extra_patches) -> dict:
        """apply_model's keyword arguments for one batch: its conditioning kwargs, the control
        residuals, GLIGEN's transformer patch, and the "info" the model patches see."""
        kwargs = batch.kwargs
        control, gligen = batch.control, batch.gligen
        if control is None and gligen is None and extra_patches is None and (
                self.patches is None or not self.patches.touches_unet):
            return kwargs
        kwargs = dict(kwargs)
        if control is not None:
            residuals = control.residuals(scaled, t, sigma, batch.context, kwargs.get("y"), n, self.schedule)
            if residuals is not None:
                kwargs["control"] = residuals
        if gligen is not None:
            from nodeflow.models.model_patches import ModelPatches

            patch = gligen[1].transformer_patch(gligen[0], gligen[2], tuple(scaled.shape), scaled.device)
            gligen_patches = ModelPatches(transformer_middle=[patch])
            extra_patches = gligen_patches if extra_patches is None else extra_patches.merged(gligen_patches)
        if extra_patches is not None:
            kwargs["extra_patches"] = extra_patches
        kwargs["info"] = {"cond_or_uncond": [int(e.uncond) for e in batch.entries], "sigmas": sigma}
        return kwargs

    def _accumulate(self, batches: list[_Batch], x: Tensor, sigma: Tensor, sides: int,
                    extra_patches=None) -> list[Tensor | None]:
        """Σ w·D / Σ w per side (0: positive, 1: negative) over ``batches``; None for a side
        no batch covered when ``sides`` is 1."""
        b, _, h, w = x.shape
        sums: list[Tensor | None] = [None, None]            # Σ weight · D per side
        counts: list = [1e-37, 1e-37]                       # Σ weight per side (a float while uniform)
        for batch in batches:
            denoised = self._forward(batch, x, sigma, extra_patches)
            n = len(batch.entries)
            for k, e in enumerate(batch.entries):
                side = int(e.uncond) if sides == 2 else 0
                d = denoised if n == 1 else denoised[k]
                if e.mult is None:                                        # whole latent, one weight
                    d = d if e.weight == 1.0 else d * e.weight
                    sums[side] = d if sums[side] is None else sums[side] + d
                    counts[side] = counts[side] + e.weight
                    continue
                # weighted by cell: accumulate in place, into tensors of our own
                sums[side] = torch.zeros_like(x) if sums[side] is None else sums[side].clone()
                if not isinstance(counts[side], Tensor):
                    counts[side] = torch.full_like(x, counts[side])
                ah, aw, ay, ax = e.area if e.area is not None else (h, w, 0, 0)
                sums[side][:, :, ay:ay + ah, ax:ax + aw] += d * e.mult
                counts[side][:, :, ay:ay + ah, ax:ax + aw] += e.mult
        results = []
        for side in range(sides):
            total, count = sums[side], counts[side]
            if total is None:
                results.append(torch.zeros_like(x))
            elif isinstance(count, float) and count == 1.0:
                results.append(total)
            else:
                results.append(total / count)
        return results

    def _predict(self, x: Tensor, sigma: Tensor, with_uncond: bool) -> tuple[Tensor, Tensor | None]:
        """(D_c, D_u or None) as area/strength-weighted averages over the active entries."""
        results = self._accumulate(self._batches_for(sigma, with_uncond), x, sigma, 2)
        return results[0], (results[1] if with_uncond else None)

    # -- the API model patches use -------------------------------------------------------------

    def predict(self, entries: list[Entry] | None, x: Tensor, sigma: Tensor, patches=None) -> Tensor:
        """The weighted D of ``entries`` (a side's entries, as post-CFG functions receive them in
        "cond" / "uncond"), with ``patches`` (a ModelPatches) joining the model's for these
        forward passes — ComfyUI's ``calc_cond_batch(model, [entries], x, sigma, options)``."""
        if not entries:
            return torch.zeros_like(x)
        value = float(sigma.reshape(-1)[0])
        active = [e for e in entries if e.active(value)]
        return self._accumulate(_make_batches(active, self.max_batch_entries), x, sigma, 1, patches)[0]

    def prepare(self, conditioning, negative: bool = True) -> list[Entry]:
        """Entries for another CONDITIONING (e.g. PerpNeg's empty prompt), prepared as the run's
        own, once per conditioning."""
        key = (id(conditioning), negative)
        found = self._prepared.get(key)
        if found is None or found[0] is not conditioning:
            args = ([], conditioning) if negative else (conditioning, [])
            entries = prepare_conditioning(self.model, self.schedule, *args, self.shape, self.device,
                                           latent_image=self._latent_image, denoise_mask=self._denoise_mask,
                                           seed=self.seed)
            found = self._prepared[key] = (conditioning, entries)
        return found[1]

    # -- D(x, σ) -------------------------------------------------------------------------------

    def _guide(self, x: Tensor, sigma: Tensor, cond: Tensor, uncond: Tensor | None) -> Tensor:
        """CFG, or the model's CFG function, then its post-CFG functions (ComfyUI's cfg_function)."""
        patches = self.patches
        if patches is None or (patches.cfg_function is None and not patches.post_cfg_functions):
            if uncond is None:
                return cond
            return uncond + (cond - uncond) * self.cfg
        uncond_pred = torch.zeros_like(cond) if uncond is None else uncond
        sigma_rows = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        negative = self.negative if uncond is not None else None
        if patches.cfg_function is not None:
            args = {"cond": x - cond, "uncond": x - uncond_pred, "cond_scale": self.cfg, "timestep": sigma_rows,
                    "input": x, "sigma": sigma_rows, "cond_denoised": cond, "uncond_denoised": uncond_pred,
                    "model": self.model, "denoiser": self, "input_cond": self.positive, "input_uncond": negative}
            result = x - patches.cfg_function(args)
        else:
            result = uncond_pred + (cond - uncond_pred) * self.cfg
        for fn in patches.post_cfg_functions:
            args = {"denoised": result, "cond": self.positive, "uncond": negative, "cond_scale": self.cfg,
                    "model": self.model, "uncond_denoised": uncond_pred, "cond_denoised": cond, "sigma": sigma_rows,
                    "input": x, "denoiser": self}
            result = fn(args)
        return result

    def _needs_uncond(self) -> bool:
        return not math.isclose(self.cfg, 1.0) or (self.patches is not None and self.patches.disable_cfg1_optimization)

    def denoise_with_uncond(self, x: Tensor, sigma: Tensor, **_) -> tuple[Tensor, Tensor]:
        """(guided D, unconditional D), always running the negative entries (CFG++)."""
        cond, uncond = self._predict(x, sigma, with_uncond=True)
        return self._guide(x, sigma, cond, uncond), uncond

    def __call__(self, x: Tensor, sigma: Tensor, **_) -> Tensor:
        with_uncond = self._needs_uncond()
        cond, uncond = self._predict(x, sigma, with_uncond=with_uncond)
        return self._guide(x, sigma, cond, uncond)
