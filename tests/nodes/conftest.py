"""Shared fixtures for the node tests: a temporary base folder (input/, output/, temp/)
configured as the process-wide folders for the test, restored afterwards."""

from __future__ import annotations

import pytest

import nodeflow.folders as folders_mod
from nodeflow import context as run_context


@pytest.fixture
def base(tmp_path, monkeypatch):
    for var in ("NODEFLOW_HOME", "NODEFLOW_INPUT_DIR", "NODEFLOW_OUTPUT_DIR", "NODEFLOW_TEMP_DIR",
                "NODEFLOW_DISABLE_METADATA"):
        monkeypatch.delenv(var, raising=False)
    saved = run_context.default()._folders
    configured = folders_mod.configure(tmp_path)
    for name in ("input", "output", "temp"):
        (tmp_path / name).mkdir()
    yield configured
    run_context.default()._folders = saved


class StubModel:
    """A stand-in MODEL handle for sampling tests: SD's schedule and ε-prediction, and as the
    "network" a small smooth function of (x, t, context) — deterministic, cheap, and different
    for different conditionings, so guidance and samplers have something to work on."""

    def __init__(self):
        import torch

        from nodeflow.models.diffusion import sd_alphas_cumprod

        self.alphas_cumprod = sd_alphas_cumprod()
        self.prediction_type = "eps"
        self.family = "sd1"
        self.in_channels = self.latent_channels = 4
        self.device = torch.device("cpu")
        self.patches = {}
        self.calls = 0

    def clone(self):
        import copy

        other = copy.copy(self)
        other.patches = dict(self.patches)
        return other

    def process_latent_in(self, x):
        return x * 0.18215

    def process_latent_out(self, x):
        return x / 0.18215

    def apply_model(self, x, t, context, **kwargs):
        import torch

        self.calls += 1
        c = context.float().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return torch.tanh(x * (1.0 + c)) * 0.8 + 0.0005 * t.reshape(-1, 1, 1, 1) * c


@pytest.fixture
def stub_model():
    """A fresh ``StubModel`` (see its docstring)."""
    return StubModel()


def conditioning(value: float, tokens: int = 77, dim: int = 8):
    """A one-entry CONDITIONING whose tensor is filled with ``value``."""
    import torch

    return [[torch.full((1, tokens, dim), float(value)), {}]]


@pytest.fixture
def make_cond():
    """``make_cond(value)``: a one-entry CONDITIONING filled with ``value``."""
    return conditioning
