"""Noise schedules and output parameterisations beyond ``nodeflow.sampling``'s ε and v, for
ModelSamplingDiscrete: x0-prediction, LCM's distilled schedule, and zero-terminal-SNR.

They are ``DiscreteSchedule`` subclasses: a patched MODEL handle carries one as
``_nodeflow_schedule``, which ``DiscreteSchedule.from_model`` (and so every sampler, every
scheduler and the CFG denoiser) uses instead of building one from the handle's
``alphas_cumprod`` and ``prediction_type``. This module imports torch; node modules import it
inside ``run`` only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nodeflow.sampling import DiscreteSchedule
from nodeflow.sampling.model_sampling import per_sample

#: ᾱ of the last timestep after the zero-terminal-SNR rescale: ComfyUI's small positive
#: stand-in for 0, which keeps σ_max finite (≈ 4518.8).
ZSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08


def zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Rescale a schedule to zero terminal SNR (Lin et al. 2024, "Common diffusion noise
    schedules and sample steps are flawed", Algorithm 1): √ᾱ is shifted so its last value is
    0 and scaled so its first is unchanged. The last ᾱ becomes ``ZSNR_LAST_ALPHA_CUMPROD``
    instead of 0, as in ComfyUI. float64, shape (T,)."""
    root = torch.as_tensor(alphas_cumprod, dtype=torch.float64).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    out = root ** 2
    out[-1] = ZSNR_LAST_ALPHA_CUMPROD
    return out


class X0Schedule(DiscreteSchedule):
    """A model that predicts the clean latent x₀ itself: D(x, σ) = F(c_in·x, t)."""

    def __init__(self, alphas_cumprod: Tensor):
        super().__init__(alphas_cumprod, "eps")
        self.prediction_type = "x0"

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.zeros_like(sigma), torch.ones_like(sigma), 1.0 / (sigma ** 2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor, terms=None) -> Tensor:
        return model_output


class LCMSchedule(DiscreteSchedule):
    """Latent Consistency Models (Luo et al. 2023): an ε-prediction network distilled on 50 of
    the 1000 training timesteps, t = 19, 39, …, 999, whose output passes through the
    consistency boundary condition

        D = c_skip(t)·x + c_out(t)·x̂₀,   x̂₀ = x − σ·ε̂,
        c_skip = σ_d² / ((10t)² + σ_d²),   c_out = 10t / √((10t)² + σ_d²),   σ_d = 0.5

    σ ↔ t maps to the nearest of the 50 timesteps; the schedulers see their 50 σ values."""

    original_timesteps = 50
    sigma_data = 0.5
    timestep_scaling = 10.0

    def __init__(self, alphas_cumprod: Tensor):
        super().__init__(alphas_cumprod, "eps")
        self.prediction_type = "lcm"
        self.skip = self.num_timesteps // self.original_timesteps                   # 20
        kept = torch.arange(self.skip - 1, self.num_timesteps, self.skip)[-self.original_timesteps:]  # 19 … 999
        self.sigmas = self.sigmas[kept]                                              # (50,) ascending
        self.log_sigmas = self.log_sigmas[kept]
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def timestep(self, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log().reshape(1, -1) - self.log_sigmas.to(sigma.device).reshape(-1, 1)   # (50, N)
        index = dists.abs().argmin(dim=0).reshape(sigma.shape)
        return (index * self.skip + (self.skip - 1)).float()

    def sigma(self, timestep) -> Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32)
        t = ((t - (self.skip - 1)) / self.skip).clamp(0, len(self.sigmas) - 1)
        log_sigmas = self.log_sigmas.to(t.device)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = self.timestep(sigma) * self.timestep_scaling
        c_skip = self.sigma_data ** 2 / (t ** 2 + self.sigma_data ** 2)
        c_out = t / (t ** 2 + self.sigma_data ** 2) ** 0.5
        # D = c_skip·x + c_out·(x − σ·ε) = (c_skip + c_out)·x − c_out·σ·ε
        return c_skip + c_out, -c_out * sigma, 1.0 / (sigma ** 2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor, terms=None) -> Tensor:
        """``terms``: σ's precomputed factors (``DiscreteSchedule.terms``), if at hand."""
        s = terms.sigma if terms is not None else per_sample(sigma, x)
        t = per_sample(self.timestep(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)), x)
        t = t.reshape(s.shape) * self.timestep_scaling
        x0 = x - model_output * s
        c_skip = self.sigma_data ** 2 / (t ** 2 + self.sigma_data ** 2)
        c_out = t / (t ** 2 + self.sigma_data ** 2) ** 0.5
        return c_out * x0 + c_skip * x


def make_schedule(sampling: str, alphas_cumprod: Tensor) -> DiscreteSchedule:
    """The schedule of ModelSamplingDiscrete's ``sampling`` choice."""
    if sampling == "eps":
        return DiscreteSchedule(alphas_cumprod, "eps")
    if sampling == "v_prediction":
        return DiscreteSchedule(alphas_cumprod, "v")
    if sampling == "x0":
        return X0Schedule(alphas_cumprod)
    if sampling == "lcm":
        return LCMSchedule(alphas_cumprod)
    raise ValueError(f"unknown sampling {sampling!r}; expected eps, v_prediction, lcm or x0")
