"""The discrete-time noise schedule of ε- and v-prediction models, seen in σ-space.

Stable Diffusion is trained on T = 1000 discrete timesteps with a variance-preserving
forward process  x_t = √ᾱ_t · x₀ + √(1 − ᾱ_t) · ε.  Dividing by √ᾱ_t gives the
variance-exploding ("Karras") form every sampler here works in:

    x = x₀ + σ · ε,        σ_t = √((1 − ᾱ_t) / ᾱ_t)

so a sampler only needs σ, and the network sees  x / √(σ² + 1)  (= x_t) and the timestep t
whose σ_t is nearest to σ.  This module holds that mapping and the output parameterisations
(Karras et al. 2022, "Elucidating the design space…", Table 1, with σ_data = 1):

    D(x, σ) = c_skip(σ) · x + c_out(σ) · F(c_in(σ) · x, t(σ))

    ε-prediction:  c_skip = 1,            c_out = −σ,             c_in = 1/√(σ²+1)
    v-prediction:  c_skip = 1/(σ²+1),     c_out = −σ/√(σ²+1),     c_in = 1/√(σ²+1)

ComfyUI compatibility facts kept here: sigmas are float32 computed from a float64 schedule;
``timestep(σ)`` is the *nearest* training timestep (ComfyUI quantises; k-diffusion's
``CompVisDenoiser`` interpolates by default — pass ``quantize=False`` for that);
``sigma(t)`` interpolates log σ linearly between integer timesteps.
"""

from __future__ import annotations

import bisect
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from nodeflow.sampling import handle

__all__ = ["DiscreteSchedule", "SigmaTerms", "scaled_linear_alphas_cumprod"]


class SigmaTerms(NamedTuple):
    """The σ-dependent factors of one model call, shaped to broadcast over x ([B, 1, …]):
    σ, σ² + 1 and √(σ² + 1). Computed once per call (or per σ) and shared by
    ``calculate_input`` and ``calculate_denoised``."""
    sigma: Tensor
    s2p1: Tensor
    root: Tensor


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 timesteps: int = 1000) -> Tensor:
    """ᾱ_t of the "scaled linear" schedule of Stable Diffusion 1.x/2.x/XL, in float64:
    β_t = (linspace(√β_start, √β_end, T))²,  ᾱ_t = Π_{s≤t} (1 − β_s)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


_SD_ALPHAS_CUMPROD = scaled_linear_alphas_cumprod()


class DiscreteSchedule:
    """σ_t for t = 0 … T−1 of a discrete ε- or v-prediction model, and the maps around it.

    ``sigmas`` is ascending (t = 0 is the least noisy), as in ComfyUI's ModelSamplingDiscrete.
    """

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "eps", *, quantize: bool = True):
        if prediction_type not in ("eps", "v"):
            raise ValueError(f"prediction_type must be 'eps' or 'v', got {prediction_type!r}")
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        # A float32 copy of SD's schedule loses ~1e-4 of σ_min; recover the exact values.
        if ac.shape == _SD_ALPHAS_CUMPROD.shape and torch.allclose(ac, _SD_ALPHAS_CUMPROD, rtol=1e-5, atol=0):
            ac = _SD_ALPHAS_CUMPROD
        sigmas64 = ((1.0 - ac) / ac) ** 0.5
        self.prediction_type = prediction_type
        self.quantize = quantize
        self.num_timesteps = int(ac.shape[0])
        self.sigmas = sigmas64.float()               # (T,) ascending
        self.log_sigmas = sigmas64.log().float()     # (T,)
        self._log_sigma_table = None                 # (log_sigmas, as floats, as numpy) for timestep_value
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    # -- construction -------------------------------------------------------------------
    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, timesteps: int = 1000,
                      prediction_type: str = "eps") -> DiscreteSchedule:
        return cls(scaled_linear_alphas_cumprod(beta_start, beta_end, timesteps), prediction_type)

    @classmethod
    def from_model(cls, model) -> DiscreteSchedule:
        """The schedule of a model handle (``alphas_cumprod`` + ``prediction_type``); a
        DiscreteSchedule is returned as is."""
        if isinstance(model, DiscreteSchedule):
            return model
        cached = handle.schedule_override(model)
        if isinstance(cached, DiscreteSchedule):
            return cached
        return cls(model.alphas_cumprod, handle.prediction_type(model))

    # -- σ ↔ t --------------------------------------------------------------------------
    def timestep(self, sigma: Tensor) -> Tensor:
        """The model's timestep for σ: the nearest training timestep (float), or the
        log-σ interpolated one when ``quantize=False``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.log()
        dists = log_sigma.reshape(1, -1) - log_sigmas.reshape(-1, 1)       # (T, N)
        if self.quantize:
            return dists.abs().argmin(dim=0).reshape(sigma.shape).float()
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.num_timesteps - 2)
        high = low + 1
        w = ((log_sigmas[low] - log_sigma.reshape(-1)) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
        return ((1 - w) * low + w * high).reshape(sigma.shape)

    def timestep_value(self, sigma: float) -> float:
        """``timestep`` of one σ given as a float (a float32 value): the same float32
        arithmetic — log σ, its distance to each training log σ, the first nearest — without
        a tensor of T distances. Only the two training steps around log σ can be nearest, as
        the float32 distances fall and then rise along the ascending log σ_t."""
        if (not self.quantize or not math.isfinite(sigma) or sigma <= 0
                or type(self).timestep is not DiscreteSchedule.timestep):     # a subclass maps σ its own way
            return float(self.timestep(torch.tensor([sigma], dtype=torch.float32))[0])
        table = self._log_sigma_table
        if table is None or table[0] is not self.log_sigmas:
            table = self._log_sigma_table = (self.log_sigmas, self.log_sigmas.tolist(), self.log_sigmas.numpy().copy())
        _, values, array = table
        log_sigma = np.float32(torch.tensor([sigma], dtype=torch.float32).log().item())
        i = bisect.bisect_left(values, float(log_sigma))
        best, best_distance = None, None
        for j in (i - 1, i):
            if 0 <= j < len(values):
                distance = abs(log_sigma - array[j])                    # float32, as in timestep()
                if best is None or distance < best_distance:            # the first of equals, as argmin
                    best, best_distance = j, distance
        return float(best)

    def sigma(self, timestep) -> Tensor:
        """σ at a (fractional) timestep: log σ interpolated linearly between integers."""
        t = torch.as_tensor(timestep, dtype=torch.float32).clamp(0, self.num_timesteps - 1)
        log_sigmas = self.log_sigmas.to(t.device)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """σ at ``percent`` of the way through sampling (0 → beyond σ_max, 1 → 0), as used
        by conditioning start/end percentages."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * (self.num_timesteps - 1))))

    # -- parameterisation ---------------------------------------------------------------
    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for σ (any shape)."""
        c_in = 1.0 / (sigma ** 2 + 1.0) ** 0.5
        if self.prediction_type == "eps":
            return torch.ones_like(sigma), -sigma, c_in
        return 1.0 / (sigma ** 2 + 1.0), -sigma * c_in, c_in

    def terms(self, sigma: Tensor, like: Tensor) -> SigmaTerms:
        """σ, σ² + 1 and √(σ² + 1) for a per-sample σ, in ``like``'s dtype and device,
        shaped to broadcast over it."""
        s = per_sample(sigma, like)
        s2p1 = s ** 2 + 1.0
        return SigmaTerms(s, s2p1, s2p1 ** 0.5)

    def terms_value(self, sigma: float, like: Tensor) -> SigmaTerms:
        """``terms`` for one σ shared by every row of ``like``: the same torch arithmetic on a
        single value (x ** 0.5 is not always the correctly rounded square root, so it is not
        done on the host), shaped [1, 1, …] to broadcast over ``like``."""
        s = torch.tensor([sigma], dtype=like.dtype, device=like.device).reshape((1,) * like.ndim)
        s2p1 = s ** 2 + 1.0
        return SigmaTerms(s, s2p1, s2p1 ** 0.5)

    def calculate_input(self, sigma: Tensor, x: Tensor, terms: SigmaTerms | None = None) -> Tensor:
        """The network input x / √(σ²+1) (σ is a per-sample vector; ``terms`` its precomputed
        factors, if at hand)."""
        return x / (self.terms(sigma, x) if terms is None else terms).root

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor,
                           terms: SigmaTerms | None = None) -> Tensor:
        """D = c_skip·x + c_out·F for the network output F (ε or v)."""
        terms = self.terms(sigma, x) if terms is None else terms
        if self.prediction_type == "eps":
            return x - model_output * terms.sigma
        return x / terms.s2p1 - model_output * terms.sigma / terms.root

    def noise_scaling(self, sigma, noise: Tensor, latent_image: Tensor | None, max_denoise: bool = False) -> Tensor:
        """The starting point of sampling: latent + σ·noise, or √(1+σ²)·noise when starting
        from pure noise at σ_max (the variance of x_T under the VP forward process)."""
        s = per_sample(torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device).reshape(-1), noise)
        scaled = noise * (1.0 + s ** 2) ** 0.5 if max_denoise else noise * s
        return scaled if latent_image is None else scaled + latent_image

    def is_max_denoise(self, sigma0: float) -> bool:
        """Whether sampling starts at (or above) σ_max, i.e. from pure noise."""
        sigma0 = float(sigma0)
        return math.isclose(self.sigma_max, sigma0, rel_tol=1e-5) or sigma0 > self.sigma_max


def per_sample(sigma: Tensor, x: Tensor) -> Tensor:
    """Reshape a σ vector (B,) or scalar to broadcast over x (B, …)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))


# --- other parameterisations (ModelSamplingDiscrete): x0-prediction, LCM, zero terminal SNR -------
# A patched MODEL handle carries one of these as ``_nodeflow_schedule``; ``DiscreteSchedule.from_model``
# (and so every sampler, scheduler and the CFG denoiser) then uses it instead of building one from the
# handle's ``alphas_cumprod`` and ``prediction_type``.

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
