"""The sampler driving the real (tiny, random) model stack through the shared contract."""

import pytest
import torch

models = pytest.importorskip("nodeflow.models.testing")
checkpoint = pytest.importorskip("nodeflow.models.checkpoint")

from nodeflow.sampling import handle, ksampler  # noqa: E402


def _load(tmp_path, family, **kw):
    writer = {"sd1": models.write_tiny_sd1, "sd2": models.write_tiny_sd2, "sdxl": models.write_tiny_sdxl}[family]
    path = writer(tmp_path / f"{family}.safetensors", **kw)
    return checkpoint.load_checkpoint(path, device="cpu", dtype=torch.float32, components=("model",)).model


def _conds(model, value, tokens=77, pooled=None):
    dim = model.unet.config.context_dim
    meta = {} if pooled is None else {"pooled_output": pooled}
    return [[torch.full((1, tokens, dim), value), meta]]


@pytest.mark.parametrize("family, kw, sampler", [
    ("sd1", {}, "dpmpp_2m"),
    ("sd1", {"inpaint": True}, "euler_ancestral"),
    ("sd2", {"v_prediction": True}, "uni_pc"),
])
def test_tiny_models_sample(tmp_path, family, kw, sampler):
    model = _load(tmp_path, family, **kw)
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    if kw.get("inpaint"):
        lat = {"samples": torch.randn(1, 4, 8, 8), "noise_mask": torch.zeros(1, 64, 64)}
        lat["noise_mask"][:, 32:, :] = 1.0
    out = ksampler(model, lat, _conds(model, 0.1), _conds(model, -0.1, tokens=154), seed=3, steps=3, cfg=4.0,
                   sampler_name=sampler, scheduler="karras")
    assert out["samples"].shape == (1, 4, 8, 8) and torch.isfinite(out["samples"]).all()
    if kw.get("inpaint"):
        assert torch.equal(out["samples"][:, :, :4], lat["samples"][:, :, :4])


def test_tiny_sdxl_with_pooled_output(tmp_path):
    model = _load(tmp_path, "sdxl")
    adm = model.unet.config.adm_in_channels
    pooled_width = adm - 6 * 256
    positive = _conds(model, 0.1, pooled=torch.full((1, pooled_width), 0.2))
    negative = _conds(model, 0.0, pooled=torch.zeros(1, pooled_width))
    out = ksampler(model, {"samples": torch.zeros(2, 4, 8, 8)}, positive, negative, seed=1, steps=2, cfg=5.0,
                   sampler_name="euler", scheduler="normal")
    assert out["samples"].shape == (2, 4, 8, 8) and torch.isfinite(out["samples"]).all()


def test_the_model_stacks_handle_is_a_model_handle_and_its_optional_members_are_read(tmp_path):
    model = _load(tmp_path, "sd1", inpaint=True)
    assert isinstance(model, handle.ModelHandle)
    assert handle.concat_channels(model) == 5 and handle.latent_channels(model, 16) == 4
    assert handle.device(model) == torch.device("cpu") and handle.device(model, "meta") == torch.device("meta")

    class Minimal:      # only the required members: every optional one takes its default
        alphas_cumprod = model.alphas_cumprod

        def apply_model(self, x, t, context, y=None, c_concat=None):
            return torch.zeros_like(x)

        def process_latent_in(self, latent):
            return latent

        def process_latent_out(self, latent):
            return latent

    minimal = Minimal()
    assert isinstance(minimal, handle.ModelHandle)
    assert (handle.prediction_type(minimal), handle.concat_channels(minimal), handle.latent_channels(minimal, 16)) \
        == ("eps", 0, 16)
    assert handle.model_patches(minimal) is None and handle.schedule_override(minimal) is None
    out = ksampler(minimal, {"samples": torch.zeros(1, 4, 8, 8)}, [[torch.zeros(1, 77, 8), {}]],
                   [[torch.zeros(1, 77, 8), {}]], seed=1, steps=2, cfg=3.0, sampler_name="euler", scheduler="normal")
    # ε = 0 everywhere: Euler removes no noise, so the output is the initial noise σ_max·n scaled back
    assert torch.isfinite(out["samples"]).all() and out["samples"].std() > 1
