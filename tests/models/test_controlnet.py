"""ControlNets and T2I-Adapters on tiny models in the real key layouts.

Parity with diffusers (same random weights, float32; tolerance as in test_parity: max |ours −
theirs| ≤ 1e-4 · max |theirs|): the ControlNet's residuals against ``ControlNetModel``, the UNet
consuming them against ``UNet2DConditionModel``'s ``down_block_additional_residuals``, a full
T2I-Adapter's features and their placement against ``T2IAdapter`` and
``down_intrablock_additional_residuals``. Then the layouts, sampling, and bad input."""

import pytest
import torch

from nodeflow.models import load_checkpoint, testing
from nodeflow.models.controlnet import ControlHint, fit_hint, ldm_to_diffusers, load_control_model
from nodeflow.models.diffusers_format import diffusers_unet_config, ldm_unet_to_diffusers
from nodeflow.models.files import CheckpointError
from nodeflow.sampling import ksampler

diffusers = pytest.importorskip("diffusers")


def close(ours, theirs):
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    assert err <= 1e-4 * scale, f"max abs diff {err:.3g} vs output scale {scale:.3g}"


def controlnet_config(cfg) -> dict:
    config = diffusers_unet_config(cfg)
    for key in ("_class_name", "sample_size", "out_channels", "up_block_types", "center_input_sample"):
        config.pop(key, None)
    return config


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = testing.write_tiny_sd1(tmp_path_factory.mktemp("cn") / "sd1.safetensors")
    return load_checkpoint(path, device="cpu")


def inputs(cfg, batch=2, h=16, w=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    hint = torch.rand(batch, 3, 8 * h, 8 * w, generator=g)
    context = torch.randn(batch, 77, cfg.context_dim, generator=g)
    return x, torch.tensor([5.0, 640.0][:batch]), context, hint


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_controlnet_matches_diffusers(tmp_path, family):
    control = load_control_model(testing.write_tiny_controlnet(tmp_path / "cn.safetensors", family), device="cpu")
    cfg = control.net.config
    sd = testing.tiny_controlnet_state_dict(family)
    theirs = diffusers.ControlNetModel(**controlnet_config(cfg)).eval()
    theirs.load_state_dict(ldm_to_diffusers(sd), strict=True)
    x, t, context, hint = inputs(cfg)
    ours_kw, their_kw = {}, {}
    if cfg.adm_in_channels:
        g = torch.Generator().manual_seed(3)
        pooled, time_ids = torch.randn(2, 128, generator=g), torch.tensor([[96.0, 128, 0, 8, 96, 128]] * 2)
        from nodeflow.models.unet import timestep_embedding

        ours_kw = {"y": torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(2, -1)], 1)}
        their_kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    with torch.no_grad():
        down, mid = theirs(x, t, context, hint, return_dict=False, **their_kw)
        ours = control.net(x, hint, t, context, **ours_kw)
    assert len(ours["output"]) == len(down)
    for a, b in zip(ours["output"], down):
        close(a, b)
    close(ours["middle"][0], mid)


def test_unet_adds_control_residuals_where_diffusers_does(sd1):
    model = sd1.model
    cfg = model.unet.config
    g = torch.Generator().manual_seed(4)
    x, t, context, _ = inputs(cfg)
    widths = [cfg.model_channels] + [cfg.model_channels * m for m in cfg.channel_mult for _ in range(3)][:-1]
    sizes = [(16, 12)] * 3 + [(8, 6)] * 3 + [(4, 3)] * 3
    down = [torch.randn(2, c, *s, generator=g) for c, s in zip(widths, sizes)]
    mid = torch.randn(2, widths[-1], 4, 3, generator=g)
    theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in diffusers_unet_config(cfg).items()
                                               if not k.startswith("_")}).eval()
    theirs.load_state_dict(ldm_unet_to_diffusers(model.unet.state_dict()), strict=True)
    with torch.no_grad():
        expected = theirs(x, t, context, down_block_additional_residuals=tuple(down),
                          mid_block_additional_residual=mid).sample
    close(model.apply_model(x, t, context, control={"output": down, "middle": [mid]}), expected)


def test_full_t2i_adapter_matches_diffusers(tmp_path, sd1):
    # diffusers' full adapter is TencentARC's with 1×1 kernels and average pooling
    sd = testing.tiny_adapter_state_dict("full")
    from nodeflow.models.t2i_adapter import Adapter

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Adapter(192, [32, 64, 64, 64], 2, 1, False, False).state_dict().items()}
    sd = testing.random_tensors(shapes, seed=21)
    path = testing.save(sd, tmp_path / "t2i.safetensors")
    adapter = load_control_model(path, device="cpu")
    theirs = diffusers.T2IAdapter(3, [32, 64, 64, 64], 2, 8, "full_adapter").eval()
    theirs_sd = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "body":
            level, j = divmod(int(parts[1]), 2)
            rest = ".".join(parts[2:])
            key = f"adapter.body.{level}.{rest}" if rest.startswith("in_conv") else \
                f"adapter.body.{level}.resnets.{j}.{rest}"
        else:
            key = "adapter." + key
        theirs_sd[key] = value
    theirs.load_state_dict(theirs_sd, strict=True)
    g = torch.Generator().manual_seed(5)
    hint = torch.rand(1, 3, 128, 128, generator=g)         # even sizes: diffusers pools with ceil_mode
    with torch.no_grad():
        features = theirs(hint)
        ours = adapter.net(hint)
    for a, b in zip(ours, features):
        close(a, b)
    # their placement: after the last layer of each down block
    model = sd1.model
    x, t, context, _ = inputs(model.unet.config, w=16)
    unet = diffusers.UNet2DConditionModel(**{k: v for k, v in diffusers_unet_config(model.unet.config).items()
                                             if not k.startswith("_")}).eval()
    unet.load_state_dict(ldm_unet_to_diffusers(model.unet.state_dict()), strict=True)
    with torch.no_grad():
        expected = unet(x, t, context, down_intrablock_additional_residuals=[f.clone() for f in features[:3]]).sample
    from nodeflow.models.t2i_adapter import residual_lists

    close(model.apply_model(x, t, context, control=residual_lists(list(ours), xl=False)), expected)


def test_every_layout_loads_the_same_network(tmp_path, sd1):
    x, t, context, hint = inputs(sd1.model.unet.config)
    outs = []
    for layout in ("ldm", "bare", "diffusers"):
        control = load_control_model(testing.write_tiny_controlnet(tmp_path / f"{layout}.safetensors", "sd1",
                                                                   layout=layout), device="cpu")
        with torch.no_grad():
            outs.append(control.net(x, hint, t, context))
    base = {k: v for k, v in sd1.model.unet.state_dict().items()}
    diff = testing.write_tiny_controlnet(tmp_path / "diff.safetensors", "sd1", layout="diff", diff_of=base)
    with pytest.raises(CheckpointError, match="diff ControlNet"):
        load_control_model(diff, device="cpu")
    control = load_control_model(diff, sd1.model, device="cpu")
    with torch.no_grad():
        outs.append(control.net(x, hint, t, context))
    for other in outs[1:]:
        for a, b in zip(other["output"] + other["middle"], outs[0]["output"] + outs[0]["middle"]):
            assert torch.allclose(a, b, atol=1e-5)


def test_adapter_layouts(tmp_path):
    for kind, dk in (("full", False), ("full", True), ("light", False), ("xl", False)):
        adapter = load_control_model(testing.write_tiny_adapter(tmp_path / f"{kind}{dk}.safetensors", kind,
                                                                diffusers_keys=dk), device="cpu")
        assert adapter.kind == "T2I-Adapter" and adapter.net.xl == (kind == "xl")
    a = load_control_model(tmp_path / "fullFalse.safetensors", device="cpu")
    b = load_control_model(tmp_path / "fullTrue.safetensors", device="cpu")
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(a.net(hint), b.net(hint)))


def test_unknown_layout_and_family_mismatch(tmp_path, sd1):
    bogus = testing.save({"foo.weight": torch.zeros(2, 2)}, tmp_path / "bogus.safetensors")
    with pytest.raises(CheckpointError, match="bogus.safetensors: not a ControlNet or T2I-Adapter"):
        load_control_model(bogus, device="cpu")
    xl = load_control_model(testing.write_tiny_controlnet(tmp_path / "xl.safetensors", "sdxl"), device="cpu")
    with pytest.raises(ValueError, match=r"'xl.safetensors' is for .* but the model is sd1"):
        xl.check(sd1.model)
    xl_adapter = load_control_model(testing.write_tiny_adapter(tmp_path / "xla.safetensors", "xl"), device="cpu")
    with pytest.raises(ValueError, match="T2I-Adapter 'xla.safetensors' is for SDXL, but the model is sd1"):
        xl_adapter.check(sd1.model)


def test_fit_hint_centre_crops_like_comfyui():
    image = torch.arange(6 * 8, dtype=torch.float32).reshape(1, 1, 6, 8)
    out = fit_hint(image, 6, 6)                                # 8 wide -> cut 1 column each side
    assert torch.equal(out, image[..., 1:7])
    assert fit_hint(image, 12, 16).shape[-2:] == (12, 16)


def sample(model, positive, negative, steps=3, start=0, end=10000):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return ksampler(model, latent, positive, negative, seed=1, steps=steps, cfg=4.0, sampler_name="euler",
                    scheduler="normal", start_at_step=start, end_at_step=end)["samples"]


def conds(clip):
    cond, pooled = clip.encode("a red circle")
    neg, npooled = clip.encode("")
    return [[cond, {"pooled_output": pooled}]], [[neg, {"pooled_output": npooled}]]


def with_control(conditioning, control):
    return [[c, {**m, "control": control}] for c, m in conditioning]


def test_controlnet_changes_the_sample_unless_off(tmp_path, sd1):
    control = load_control_model(testing.write_tiny_controlnet(tmp_path / "cn.safetensors", "sd1"), device="cpu")
    pos, neg = conds(sd1.clip)
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = sample(sd1.model, pos, neg)
    on = ControlHint(control, hint, 1.0)
    assert not torch.allclose(sample(sd1.model, with_control(pos, on), with_control(neg, on)), plain, atol=1e-4)
    off = ControlHint(control, hint, 1.0, 1.0, 1.0)                   # an empty range: only σ = 0
    assert torch.allclose(sample(sd1.model, with_control(pos, off), with_control(neg, off)), plain, atol=1e-6)
    zero = ControlHint(control, hint, 0.0)
    assert torch.allclose(sample(sd1.model, with_control(pos, zero), with_control(neg, zero)), plain, atol=1e-6)


def test_diff_controlnet_adds_the_models_lora_patched_weights(tmp_path, sd1):
    """ComfyUI loads the (LoRA-patched) model before reading its state dict for a diff ControlNet,
    so the ControlNet copies the patched UNet: diff + W + ΔW_LoRA, not diff + W."""
    from nodeflow.models import patching
    from nodeflow.models.lora import LoraWeights, apply_lora, unet_targets

    base = {k: v.clone() for k, v in sd1.model.unet.state_dict().items()}
    path = testing.write_tiny_controlnet(tmp_path / "diff.safetensors", "sd1", layout="diff", diff_of=base)
    name = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    lora_key = next(k for k, v in unet_targets(sd1.model).items() if v == name)
    out_f, in_f = base[name].shape
    g = torch.Generator().manual_seed(4)
    weights = LoraWeights(up=torch.randn(out_f, 2, generator=g), down=torch.randn(2, in_f, generator=g), alpha=1.0)
    patched, _ = apply_lora({lora_key: weights}, sd1.model, None, 0.7, 0.0)
    plain_net = load_control_model(path, sd1.model, device="cpu").net.state_dict()
    try:
        lora_net = load_control_model(path, patched, device="cpu").net.state_dict()
    finally:
        patching.sync(sd1.model.unet, sd1.model.patches)                    # the shared fixture's own weights
    delta = 0.7 * (weights.up @ weights.down) * (1.0 / 2)                    # strength · up·down · α/rank
    assert torch.allclose(lora_net[name], plain_net[name] + delta, atol=1e-5)
    other = "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    assert torch.equal(lora_net[other], plain_net[other])
    assert torch.allclose(plain_net[name], testing.tiny_controlnet_state_dict("sd1")[name], atol=1e-6)
