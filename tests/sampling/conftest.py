"""Fakes for the sampling tests: a model handle obeying the model-stack contract, whose
"network" is known in closed form, and the exact denoiser of a Gaussian mixture."""

from __future__ import annotations

import math

import pytest
import torch

SD_SCALE = 0.18215


def sd_alphas_cumprod(dtype=torch.float32) -> torch.Tensor:
    """SD's scaled-linear schedule, computed here independently of the package (float64)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(dtype)


class FakeModel:
    """A DiffusionModel handle (the contract of issue #4) whose network predicts, for a
    conditioning tensor c (B, T, D), the noise of a latent whose clean value is the constant
    c.mean() in every cell: with x_t = √ᾱ x₀ + √(1−ᾱ) ε  ⇒  ε̂ = (x_t − √ᾱ·m) / √(1−ᾱ).

    So D(x, σ) = m exactly whenever t hits σ's training step: a model that "knows" the answer
    is the conditioning's mean, which makes CFG, areas and combinations checkable by hand.
    Every apply_model call is recorded.
    """

    def __init__(self, prediction_type="eps", in_channels=4, device="cpu"):
        self.prediction_type = prediction_type
        self.alphas_cumprod = sd_alphas_cumprod()
        self.in_channels = in_channels
        self.latent_channels = 4
        self.device = device
        self.calls = []
        self._ac64 = sd_alphas_cumprod(torch.float64)

    def process_latent_in(self, x):
        return x * SD_SCALE

    def process_latent_out(self, x):
        return x / SD_SCALE

    def condition_kwargs(self, meta, batch, width, height):
        if "pooled_output" in meta:
            return {"y": meta["pooled_output"]}
        return {}

    def target(self, context):
        return context.mean(dim=(1, 2))        # (B,) the clean value this conditioning asks for

    def apply_model(self, x, t, context, y=None, c_concat=None):
        self.calls.append({"x": x.clone(), "t": t.clone(), "context": context.clone(),
                           "y": None if y is None else y.clone(),
                           "c_concat": None if c_concat is None else c_concat.clone()})
        assert x.shape[0] == t.shape[0] == context.shape[0]
        if c_concat is not None:
            assert c_concat.shape[0] == x.shape[0] and c_concat.shape[1] + x.shape[1] == self.in_channels
        ac = self._ac64[t.long()].to(torch.float32).reshape(-1, 1, 1, 1)
        m = self.target(context).reshape(-1, 1, 1, 1)
        eps = (x - ac.sqrt() * m) / (1 - ac).sqrt()
        if self.prediction_type == "eps":
            return eps
        return ac.sqrt() * eps - (1 - ac).sqrt() * m          # v = √ᾱ ε − √(1−ᾱ) x₀


@pytest.fixture
def fake_model():
    return FakeModel


def cond(value: float, tokens: int = 77, dim: int = 8, batch: int = 1):
    """A CONDITIONING entry tensor whose FakeModel target is ``value``."""
    return torch.full((batch, tokens, dim), float(value))


@pytest.fixture
def make_cond():
    return cond


class GaussianMixture:
    """Data x₀ ~ Σ_k π_k N(μ_k, s_k² I) in d dims; its exact denoiser
    D(x, σ) = E[x₀ | x₀ + σε = x] = Σ_k w_k(x) (μ_k + s_k²/(s_k²+σ²) (x − μ_k)),
    w_k ∝ π_k N(x; μ_k, (s_k²+σ²) I)."""

    def __init__(self, weights, means, stds):
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.means = torch.tensor(means, dtype=torch.float64)        # (K, d)
        self.stds = torch.tensor(stds, dtype=torch.float64)          # (K,)

    @property
    def mean(self):
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def variance(self):
        second = (self.weights[:, None] * (self.stds[:, None] ** 2 + self.means ** 2)).sum(0)
        return second - self.mean ** 2

    def sample_noisy(self, n, sigma, generator):
        """n points of the exact marginal at σ (data + σ·noise), as [n, d, 1, 1] float32."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        d = self.means.shape[1]
        var = self.stds[k, None] ** 2 + sigma ** 2
        x = self.means[k] + var.sqrt() * torch.randn(n, d, generator=generator, dtype=torch.float64)
        return x.float().reshape(n, d, 1, 1)

    def denoiser(self, x, sigma, **kwargs):
        xf = x.double().reshape(x.shape[0], -1)                       # (n, d)
        s2 = sigma.double().reshape(-1, 1) ** 2                         # (n, 1)
        var = self.stds[None, :] ** 2 + s2                              # (n, K)
        d = xf.shape[1]
        sq = ((xf[:, None, :] - self.means[None]) ** 2).sum(-1)         # (n, K)
        logw = self.weights.log()[None] - 0.5 * d * var.log() - 0.5 * sq / var
        logw = (logw - logw.max(dim=1, keepdim=True).values).clamp(min=-60)   # no subnormals: they are slow
        w = logw.exp()
        w = w / w.sum(dim=1, keepdim=True)                              # (n, K)
        post = self.means[None] + (self.stds[None, :, None] ** 2 / var[..., None]) * (xf[:, None, :] - self.means[None])
        return (w[..., None] * post).sum(1).to(x.dtype).reshape(x.shape)


@pytest.fixture
def mixture():
    return GaussianMixture([0.3, 0.7], [[-2.0, 1.0], [1.5, -0.5]], [0.4, 0.7])


def gaussian_pf_ode_solution(x, mu, s, sigma_from, sigma_to):
    """The exact probability-flow ODE map for data N(μ, s²): x − μ scales by
    √(s² + σ_to²) / √(s² + σ_from²)."""
    return mu + (x - mu) * math.sqrt(s ** 2 + sigma_to ** 2) / math.sqrt(s ** 2 + sigma_from ** 2)


@pytest.fixture
def pf_ode_solution():
    return gaussian_pf_ode_solution


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use tiny tensors: intra-op threads only add synchronisation (which costs
    milliseconds per op on a busy 2-core machine). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
