"""DeepCache: which steps run in full, that a reuse step computes exactly the shallow part on the
kept deep features, and that only those blocks run."""

from __future__ import annotations

import pytest
import torch

from nodeflow.models.diffusion import DiffusionModel
from nodeflow.models.step_cache import DeepCache, DeepStep
from nodeflow.models.testing import micro_unet, tiny_unet_config
from nodeflow.models.unet import UNet


def plan_steps(cache: DeepCache, timesteps, x=None, info=None) -> list[str]:
    x = torch.zeros(2, 4, 8, 8) if x is None else x
    out = []
    for t in timesteps:
        step = cache.plan(x, torch.tensor([float(t)] * 2), info, False)
        if step is None:
            out.append("off")
            continue
        out.append("reuse" if step.reuse else "full")
        if not step.reuse:
            step.features = torch.zeros(1)                # what the UNet keeps on a full step
    return out


def test_every_interval_th_call_runs_in_full_within_the_window():
    assert plan_steps(DeepCache(3, 2), [999, 900, 800, 700, 600, 500, 400]) == \
        ["full", "reuse", "reuse", "full", "reuse", "reuse", "full"]
    assert plan_steps(DeepCache(1, 2), [999, 900, 800]) == ["full"] * 3          # interval 1: no caching
    # the window in timesteps: 1000 - end_step <= t <= 1000 - start_step
    assert plan_steps(DeepCache(2, 2, start_step=100, end_step=700), [999, 900, 800, 700, 600, 500, 200]) == \
        ["off", "full", "reuse", "full", "reuse", "full", "off"]


def test_a_noisier_call_starts_a_new_run_and_layouts_count_apart():
    cache = DeepCache(3, 2)
    assert plan_steps(cache, [999, 800]) == ["full", "reuse"]
    assert plan_steps(cache, [999, 800, 600]) == ["full", "reuse", "reuse"]       # t went up: counted from 0
    # another batch layout (PAG's extra call on the positive half) has its own count and features
    assert plan_steps(cache, [500], x=torch.zeros(1, 4, 8, 8), info={"cond_or_uncond": [0]}) == ["full"]
    assert plan_steps(cache, [400]) == ["full"]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(tiny_unet_config("sd1")).eval().requires_grad_(False)


@torch.no_grad()
@pytest.mark.parametrize("depth", [0, 2, 8, 20])
def test_a_reuse_step_on_its_own_features_is_the_full_forward(unet, depth):
    """The deep features of a full step, reused for the same input, give exactly the full
    output: the shallow part spliced onto them is the rest of the same network."""
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32, generator=g)
    full = unet(x, t, ctx)
    step = DeepStep(depth)
    assert torch.equal(unet(x, t, ctx, deep=step), full) and step.features is not None
    step.reuse = True
    assert torch.allclose(unet(x, t, ctx, deep=step), full, atol=1e-6)


@torch.no_grad()
def test_reuse_steps_run_only_the_shallow_blocks():
    unet = micro_unet()
    ran = []
    for name, module in [("middle", unet.middle_block), *((f"in{i}", b) for i, b in enumerate(unet.input_blocks)),
                         *((f"out{i}", b) for i, b in enumerate(unet.output_blocks))]:
        module.register_forward_hook(lambda m, a, o, name=name: ran.append(name))
    model = DiffusionModel(unet, family="sd1", device=torch.device("cpu"))
    model.model_patches.step_cache = DeepCache(2, 1)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    info = {"cond_or_uncond": [0, 1]}
    model.apply_model(x, torch.tensor([900.0, 900.0]), ctx, info=info)
    assert len(ran) == 9                                   # in0-3, middle, out0-3
    ran.clear()
    model.apply_model(x, torch.tensor([800.0, 800.0]), ctx, info=info)
    assert ran == ["in0", "in1", "out2", "out3"]           # input blocks 0 … 1, the last 2 output blocks


def test_controlnet_residuals_of_skipped_blocks_are_passed_over():
    """On a reuse step the residuals of the output blocks that do not run are consumed unused, so
    the shallow blocks get their own."""
    unet = micro_unet()
    n = len(unet.output_blocks)
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        # the residual k joins the skip of input block k (the lists are consumed from the end)
        control = {"output": [torch.randn(s.shape, generator=g) for s in _skips(unet, x, t, ctx)]}
        full = unet(x, t, ctx, control=control)
        step = DeepStep(1)
        unet(x, t, ctx, control=control, deep=step)
        step.reuse = True
        assert torch.allclose(unet(x, t, ctx, control=control, deep=step), full, atol=1e-6)
        assert not torch.allclose(full, unet(x, t, ctx), atol=1e-3)      # the residuals matter
    assert n == 4


def _skips(unet, x, t, ctx):
    emb = unet.embed(t, None, x.dtype)
    h, out = x, []
    for block in unet.input_blocks:
        h = block(h, emb, ctx)
        out.append(h)
    return out
