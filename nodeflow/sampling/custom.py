"""The values that travel between the SamplerCustom nodes, and the sampling run they feed.

    SAMPLER  ``SamplerChoice``: a sampler name of ``nodeflow.sampling`` plus its options
             (eta, s_noise, r, solver_type, cpu_noise)
    SIGMAS   a float32 CPU tensor σ₀ > … > σ_N (usually ending in 0)
    NOISE    ``RandomNoise`` / ``NoNoise``: the initial noise for a LATENT, and the seed of
             the per-step noise of ancestral and SDE samplers
    GUIDER   ``Guider``: a model and its conditionings, which build the denoiser D(x, σ)

``sample_custom`` runs one of them the way ``nodeflow.sampling.sample`` runs the KSampler
(same noise scaling, same inpainting by noise mask, same processed latent space), so that
SamplerCustom with KSamplerSelect + BasicScheduler gives the KSampler's picture. This module
imports torch; node modules import it inside ``run`` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nodeflow.sampling import CFGDenoiser, DiscreteSchedule, get_sampler, handle, prepare_mask, prepare_noise
from nodeflow.sampling.ksampler import MaskedDenoiser, fix_empty_latent_channels

# -- SAMPLER, NOISE ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerChoice:
    """A SAMPLER: which sampler function, with which options."""
    name: str
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        get_sampler(self.name)        # an unknown name fails here, where the node made it


class RandomNoise:
    """Seeded initial noise, identical to the KSampler's for the same seed and batch index."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def generate(self, latent: dict) -> Tensor:
        return prepare_noise(latent["samples"], self.seed, latent.get("batch_index"))


class NoNoise:
    """No initial noise (the latent is sampled as it is: a latent with leftover noise)."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def generate(self, latent: dict) -> Tensor:
        return torch.zeros_like(latent["samples"], dtype=torch.float32)


# -- GUIDER ------------------------------------------------------------------------------------------

class _WithoutUncond:
    """A denoiser that has no negative side: CFG++ samplers then take D itself as the
    unconditional prediction (``steps.denoise_with_uncond``'s fallback)."""

    def __init__(self, inner: CFGDenoiser):
        self.inner = inner

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        return self.inner(x, sigma, **kwargs)


class _DualCFGDenoiser:
    """D = D_neg + cfg2·(D_2 − D_neg) + cfg1·(D_1 − D_2): CFG between the negative and the
    second conditioning, plus CFG from the second towards the first. With cfg2 = 1 the
    negative is not evaluated, with cfg1 = cfg2 = 1 neither is the second."""

    def __init__(self, cond1: CFGDenoiser, cond2: CFGDenoiser, negative: CFGDenoiser, cfg1: float, cfg2: float):
        self.cond1, self.cond2, self.negative, self.cfg1, self.cfg2 = cond1, cond2, negative, cfg1, cfg2

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        d1 = self.cond1(x, sigma)
        if math.isclose(self.cfg2, 1.0) and math.isclose(self.cfg1, 1.0):
            return d1
        d2 = self.cond2(x, sigma)
        if math.isclose(self.cfg2, 1.0):
            base = d2
        else:
            dn = self.negative(x, sigma)
            base = dn + (d2 - dn) * self.cfg2
        return base + (d1 - d2) * self.cfg1


class Guider:
    """A GUIDER: the model to sample and how its conditionings combine.

    ``kind`` "cfg": ``conds`` = (positive, negative), classifier-free guidance with ``cfg``;
    "basic": ``conds`` = (conditioning,), no guidance; "dual": ``conds`` = (cond1, cond2,
    negative) with ``cfg`` = (cfg_conds, cfg_cond2_negative)."""

    def __init__(self, model, kind: str, conds: tuple, cfg=1.0):
        self.model, self.kind, self.conds, self.cfg = model, kind, conds, cfg

    def denoiser(self, schedule: DiscreteSchedule, shape, device, latent_image: Tensor, mask: Tensor | None,
                 seed: int = 0):
        def single(cond, negative=(), cfg=1.0):
            return CFGDenoiser(self.model, schedule, cond, list(negative), cfg, shape, device,
                               latent_image=latent_image, denoise_mask=mask, seed=seed)

        if self.kind == "cfg":
            positive, negative = self.conds
            return single(positive, negative, self.cfg)
        if self.kind == "basic":
            return _WithoutUncond(single(self.conds[0]))
        if self.kind == "dual":
            cond1, cond2, negative = self.conds
            cfg1, cfg2 = self.cfg
            return _DualCFGDenoiser(single(cond1), single(cond2), single(negative), float(cfg1), float(cfg2))
        raise ValueError(f"unknown guider kind {self.kind!r}")


# -- the run -----------------------------------------------------------------------------------------

@torch.no_grad()
def sample_custom(guider: Guider, sampler: SamplerChoice, sigmas: Tensor, latent: dict, noise,
                  callback: Callable[[int, int, Tensor, Tensor], None] | None = None) -> tuple[dict, dict]:
    """Sample ``latent`` (a LATENT dict) along ``sigmas`` with ``guider`` and ``sampler``,
    starting from ``noise`` (a NOISE). Returns (output, denoised_output) LATENT dicts: the
    sampled latent, and the model's last prediction of the clean latent (the output itself
    when no step ran). ``callback(step, total, x, denoised)`` as in ``nodeflow.sampling.sample``."""
    model = guider.model
    spec = get_sampler(sampler.name)
    schedule = DiscreteSchedule.from_model(model)
    device = handle.device(model)
    latent_image = fix_empty_latent_channels(model, torch.as_tensor(latent["samples"]).detach().cpu().float())
    source = dict(latent)
    source["samples"] = latent_image
    initial = torch.as_tensor(noise.generate(source)).detach().to("cpu", torch.float32)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).detach().clone().cpu()

    out, denoised_out = dict(latent), dict(latent)
    if len(sigmas) == 0:
        out["samples"] = denoised_out["samples"] = latent_image.clone()
        return out, denoised_out

    x0 = model.process_latent_in(latent_image.to(device))
    noise_d = initial.to(device)
    noise_mask = latent.get("noise_mask")
    mask = prepare_mask(noise_mask, x0.shape, device) if noise_mask is not None else None
    denoiser = guider.denoiser(schedule, x0.shape, device, x0, mask, seed=noise.seed)
    inpaint_noise = noise_d
    if spec.inpaint_random_noise:      # "ddim": the masked area is re-noised with fresh noise
        generator = torch.Generator("cpu").manual_seed((noise.seed + 1) & 0xFFFF_FFFF_FFFF_FFFF)
        inpaint_noise = torch.randn(initial.shape, generator=generator).to(device)
    model_k = MaskedDenoiser(denoiser, x0, inpaint_noise, mask)

    x = schedule.noise_scaling(sigmas[0], noise_d, x0, schedule.is_max_denoise(sigmas[0]))
    total = len(sigmas) - 1
    last = {}

    def on_step(info: dict) -> None:
        last["denoised"] = info["denoised"]
        if callback is not None:
            callback(int(info.get("step", info["i"] + 1)), total, info["x"], info["denoised"])

    options = dict(sampler.options)
    if spec.needs_schedule:
        options["schedule"] = schedule
    samples = spec.function(model_k, x, sigmas.to(device), extra_args={"seed": noise.seed}, callback=on_step,
                            **options)
    result = model.process_latent_out(samples.float()).float().cpu()
    if mask is not None and float(sigmas[-1]) == 0.0:
        result = torch.where(mask.cpu() == 0, latent_image, result)    # the unmasked area, exactly
    out["samples"] = result
    if "denoised" in last:
        denoised_out["samples"] = model.process_latent_out(last["denoised"].float()).float().cpu()
    else:
        denoised_out["samples"] = result
    return out, denoised_out
