"""nodeflow.sampling: samplers, noise schedules, classifier-free guidance, noise and masks.

Works with the model stack through a small interface, ``handle.ModelHandle``: a model handle
with ``alphas_cumprod`` [1000], ``process_latent_in/out`` and ``apply_model(x, t, context,
y=None, c_concat=None)`` (x already scaled by 1/√(σ²+1), t the float timestep, the raw ε or v
output), and optionally ``prediction_type`` ("eps" | "v"), ``in_channels``,
``latent_channels``, ``condition_kwargs(meta, batch, width, height)``, ``device`` and
``model_patches`` (all read in ``handle``).

Modules, one job each:
    handle          the MODEL handle's protocol; its optional members, read in one place
    model_sampling  σ ↔ t, ε/v/x0/LCM parameterisations, noise scaling, zero terminal SNR
    schedules       the schedulers and the KSampler's denoise tail (calculate_sigmas)
    noise           ComfyUI-identical seeded noise, Brownian trees (prepare_noise)
    steps           helpers shared by the samplers
    samplers        Euler/Heun/DPM-2/LMS/iPNDM/DEIS/DDIM/DDPM/LCM in σ
    dpmpp           DPM-Solver++ family, RES, SEEDS, ER-SDE, SA-Solver
    cfg_pp          CFG++ variants
    dpm_solver      dpm_fast, dpm_adaptive
    unipc           UniPC (bh1, bh2)
    registry        name → sampler function
    guidance        conditioning entries, areas, masks, batched CFG
    ksampler        sample() and ksampler(): the KSampler nodes' semantics
    custom          the SamplerCustom sockets (SAMPLER, NOISE, GUIDER) and sample_custom()
    preview         latent → RGB preview
"""

from nodeflow.sampling.guidance import CFGDenoiser
from nodeflow.sampling.ksampler import ksampler, prepare_mask, sample
from nodeflow.sampling.model_sampling import DiscreteSchedule
from nodeflow.sampling.noise import prepare_noise
from nodeflow.sampling.preview import latent_to_rgb_preview
from nodeflow.sampling.registry import SAMPLER_NAMES, SAMPLERS, get_sampler
from nodeflow.sampling.schedules import SCHEDULER_NAMES, calculate_sigmas, ksampler_sigmas

__all__ = [
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SCHEDULER_NAMES",
    "CFGDenoiser",
    "DiscreteSchedule",
    "calculate_sigmas",
    "get_sampler",
    "ksampler",
    "ksampler_sigmas",
    "latent_to_rgb_preview",
    "prepare_mask",
    "prepare_noise",
    "sample",
]
