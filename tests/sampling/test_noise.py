"""Seeds mean the same noise as in ComfyUI (DESIGN §4)."""

import itertools
import math

import pytest
import torch

from nodeflow.sampling import prepare_noise
from nodeflow.sampling.noise import BrownianTreeNoiseSampler, default_noise_sampler


def test_seed_42_is_torch_randn_from_a_cpu_generator():
    latent = torch.zeros(1, 4, 64, 64)
    expected = torch.randn((1, 4, 64, 64), dtype=torch.float32, generator=torch.Generator().manual_seed(42))
    noise = prepare_noise(latent, 42)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise, expected)


def test_same_seed_same_noise_different_seed_different_noise():
    latent = torch.zeros(2, 4, 8, 8)
    assert torch.equal(prepare_noise(latent, 7), prepare_noise(latent, 7))
    assert not torch.equal(prepare_noise(latent, 7), prepare_noise(latent, 8))
    assert torch.equal(prepare_noise(latent, 2 ** 64 - 1), prepare_noise(latent, 2 ** 64 - 1))   # ComfyUI's max seed


def test_batch_index_picks_per_image_draws():
    """ComfyUI draws one [1, C, H, W] noise per index 0 … max(batch_index) in turn."""
    latent = torch.zeros(3, 4, 8, 8)
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn((1, 4, 8, 8), generator=g) for _ in range(4)]
    noise = prepare_noise(latent, 5, batch_index=[3, 0, 3])
    assert torch.equal(noise, torch.cat([draws[3], draws[0], draws[3]]))
    # image 2 of a batch gets the same noise when sampled alone (batch_index from LatentFromBatch)
    assert torch.equal(prepare_noise(torch.zeros(1, 4, 8, 8), 5, batch_index=[2]), draws[2])


def test_ancestral_noise_generator_on_cpu_is_seeded_with_seed_plus_one():
    x = torch.zeros(2, 4, 8, 8)
    sampler = default_noise_sampler(x, seed=42)
    g = torch.Generator().manual_seed(43)
    for _ in range(3):
        assert torch.equal(sampler(1.0, 0.5), torch.randn((2, 4, 8, 8), generator=g))


def _tree(seed=3, shape=(4, 16, 16, 16), lo=0.03, hi=14.6, sigmas=None):
    return BrownianTreeNoiseSampler(torch.zeros(shape), lo, hi, seed=seed, sigmas=sigmas, use_torchsde=False)


def test_brownian_tree_increments_are_standard_normal_and_deterministic():
    tree = _tree()
    z = tree(torch.tensor(5.0), torch.tensor(2.0))
    assert abs(float(z.mean())) < 0.03 and abs(float(z.var()) - 1) < 0.05
    assert torch.equal(z, _tree()(torch.tensor(5.0), torch.tensor(2.0)))
    assert not torch.equal(z, _tree(seed=4)(torch.tensor(5.0), torch.tensor(2.0)))


def test_brownian_tree_is_one_path():
    """W(a) − W(c) = (W(a) − W(b)) + (W(b) − W(c)), whatever order the queries come in, and
    overlapping increments are correlated as Brownian increments are."""
    a, b, c = 9.0, 3.0, 0.5
    tree = _tree(sigmas=torch.tensor([a, b, c]))
    w_ab = tree(a, b) * math.sqrt(a - b)
    w_bc = tree(b, c) * math.sqrt(b - c)
    other = _tree(sigmas=torch.tensor([a, b, c]))
    w_ac = other(a, c) * math.sqrt(a - c)             # queried first, in a fresh tree
    assert torch.allclose(w_ab + w_bc, w_ac, atol=1e-4)
    n_ab, n_ac = tree(a, b), tree(a, c)
    corr = float((n_ab * n_ac).mean())
    assert corr == pytest.approx(math.sqrt((a - b) / (a - c)), abs=0.03)
    assert abs(float((tree(a, b) * tree(b, c)).mean())) < 0.03            # disjoint: independent


def test_brownian_tree_uses_torchsde_like_comfyui_when_available():
    torchsde = pytest.importorskip("torchsde")
    x = torch.zeros(1, 4, 8, 8)
    ours = BrownianTreeNoiseSampler(x, torch.tensor(0.0292), torch.tensor(14.6146), seed=11)
    ref = torchsde.BrownianTree(torch.tensor(0.0292), torch.zeros_like(x), torch.tensor(14.6146), entropy=11)
    s, s_next = torch.tensor(3.5), torch.tensor(2.25)
    expected = ref(s_next, s) * -1 / (s_next - s).abs().sqrt()
    assert torch.equal(ours(s, s_next), expected)


def test_comfyui_tree_is_torchsdes_bit_for_bit_in_any_query_order():
    """The default tree computes torchsde's BrownianTree itself (faster); the numbers must be
    the same tensors for queries anywhere, in any order, including tiny intervals, the end
    points and queries that straddle many tree levels."""
    pytest.importorskip("torchsde")
    x = torch.zeros(2, 3, 5)
    ours = BrownianTreeNoiseSampler(x, 0.0292, 14.6146, seed=2 ** 64 - 5)
    ref = BrownianTreeNoiseSampler(x, 0.0292, 14.6146, seed=2 ** 64 - 5, use_torchsde=True)
    g = torch.Generator().manual_seed(0)
    for k in range(150):
        a, b = (torch.rand(2, generator=g) * 14.6 + 0.0292).tolist()
        if k % 7 == 0:
            b = 14.6146
        if k % 11 == 0:
            a = 0.0292
        if k % 13 == 0:
            b = a + 2e-6
        assert torch.equal(ours(a, b), ref(a, b)), (k, a, b)
    # an interval below the tree's resolution (1e-6): torchsde recurses until Python gives up;
    # here it is no increment at all
    assert torch.equal(ours(1.0000001, 1.0000003), torch.zeros_like(x))


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde_gpu", "dpmpp_2m_sde_heun"])
def test_sde_samplers_get_torchsdes_noise(name, mixture):
    """Whole runs: the default noise and torchsde's own tree give identical samples."""
    pytest.importorskip("torchsde")
    from nodeflow.sampling import SAMPLERS, DiscreteSchedule, ksampler_sigmas
    sigmas = ksampler_sigmas(DiscreteSchedule.scaled_linear(), "karras", 9)
    x = mixture.sample_noisy(6, float(sigmas[0]), torch.Generator().manual_seed(0))
    positive = sigmas[sigmas > 0]
    outs = []
    for use_torchsde in (None, True):
        noise = BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=77, use_torchsde=use_torchsde,
                                         cpu=not name.endswith("_gpu"))
        outs.append(SAMPLERS[name].function(mixture.denoiser, x, sigmas, extra_args={"seed": 77}, noise_sampler=noise))
    assert torch.equal(outs[0], outs[1])
    # and the samplers' own noise source is that tree
    assert torch.equal(SAMPLERS[name].function(mixture.denoiser, x, sigmas, extra_args={"seed": 77}), outs[0])


def test_brownian_tree_increments_along_a_schedule_are_independent_standard_normals():
    """The schedule's points are knots of the tree: the noise of consecutive steps (and of the
    two half-steps of the two-stage solvers) must still be independent N(0, 1)."""
    sigmas = torch.tensor([14.6, 8.0, 4.1, 2.0, 0.9, 0.4, 0.1, 0.03])
    tree = _tree(shape=(64, 16, 16), sigmas=sigmas)
    s = [float(v) for v in sigmas]
    mids = [math.sqrt(a * b) for a, b in itertools.pairwise(s)]
    steps = [tree(a, b) for a, b in itertools.pairwise(s)]
    halves = [tree(a, m) for a, m in zip(s, mids)] + [tree(m, b) for m, b in zip(mids, s[1:])]
    off_knot = tree(3.0, 2.5)                                # between knots: bisection below them
    for z in steps + halves + [off_knot]:
        assert abs(float(z.mean())) < 0.02 and abs(float(z.var()) - 1) < 0.03
    for i, j in [(0, 1), (2, 3), (5, 6)]:
        assert abs(float((steps[i] * steps[j]).mean())) < 0.03
    # a whole step is the sum of its halves, scaled back to W's increments
    a, m, b = s[2], mids[2], s[3]
    assert torch.allclose(tree(a, m) * math.sqrt(a - m) + tree(m, b) * math.sqrt(m - b),
                          steps[2] * math.sqrt(a - b), atol=1e-4)
    # the off-knot point lies in [4.1, 2.0]: correlated with that step as Brownian increments are
    corr = float((off_knot * tree(4.1, 2.0)).mean())
    assert corr == pytest.approx(math.sqrt(0.5 / 2.1), abs=0.03)
