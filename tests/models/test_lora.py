"""LoRA: the patched model equals one whose weights were changed by hand, in every key layout."""

import pytest
import torch

from nodeflow.models import load_checkpoint
from nodeflow.models.files import CheckpointError
from nodeflow.models.lora import apply_lora, load_lora_file, parse_lora
from nodeflow.models.testing import save, write_tiny_sd1

# One attention projection of the first down level (LDM name) and its diffusers name,
# and one text-encoder projection.
LDM = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
DIFFUSERS = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TE = "encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = write_tiny_sd1(tmp_path_factory.mktemp("lora") / "sd1.safetensors")
    return load_checkpoint(path)


def lowrank(weight, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = weight.shape[:2]
    return torch.randn(out_f, rank, generator=g) * 0.1, torch.randn(rank, in_f, generator=g) * 0.1


def run_unet(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, model.unet.config.context_dim, generator=g)
    return model.apply_model(x, torch.tensor([500.0]), ctx)


def test_kohya_and_peft_layouts_match_a_hand_patched_model(ckpt, tmp_path):
    unet_w = dict(ckpt.model.unet.named_parameters())[LDM + ".weight"]
    te_w = dict(ckpt.clip.towers[0].model.named_parameters())["transformer." + TE + ".weight"]
    up, down = lowrank(unet_w)
    te_up, te_down = lowrank(te_w, seed=1)
    alpha, strength = 1.0, 0.7
    kohya = {
        f"lora_unet_{DIFFUSERS.replace('.', '_')}.lora_down.weight": down,
        f"lora_unet_{DIFFUSERS.replace('.', '_')}.lora_up.weight": up,
        f"lora_unet_{DIFFUSERS.replace('.', '_')}.alpha": torch.tensor(alpha),
        f"lora_te_text_model_{TE.replace('.', '_')}.lora_down.weight": te_down,
        f"lora_te_text_model_{TE.replace('.', '_')}.lora_up.weight": te_up,
        f"lora_te_text_model_{TE.replace('.', '_')}.alpha": torch.tensor(alpha),
    }
    peft = {  # PEFT has no alpha here: scale 1 = alpha == rank, so scale up to match
        f"unet.{DIFFUSERS}.lora_A.weight": down,
        f"unet.{DIFFUSERS}.lora_B.weight": up * (alpha / 2),
        f"text_encoder.text_model.{TE}.lora_A.weight": te_down,
        f"text_encoder.text_model.{TE}.lora_B.weight": te_up * (alpha / 2),
    }
    base_out = run_unet(ckpt.model)
    base_cond, _ = ckpt.clip.encode("a red circle")

    # The expected result, computed independently: edit a copy of the weights by hand.
    expected_w = unet_w.detach().clone() + strength * (alpha / 2) * (up @ down)
    original = unet_w.detach().clone()
    with torch.no_grad():
        unet_w.copy_(expected_w)
    expected_out = run_unet(ckpt.model)
    with torch.no_grad():
        unet_w.copy_(original)

    outs = []
    for name, sd in (("kohya", kohya), ("peft", peft)):
        lora = load_lora_file(save(sd, tmp_path / f"{name}.safetensors"))
        model, clip = apply_lora(lora, ckpt.model, ckpt.clip, strength, strength)
        out = run_unet(model)
        assert torch.allclose(out, expected_out, atol=1e-5), name
        cond, _ = clip.encode("a red circle")
        assert not torch.allclose(cond, base_cond, atol=1e-4), name
        outs.append(cond)
        # The original handles are untouched: running them restores the original weights.
        assert torch.allclose(run_unet(ckpt.model), base_out, atol=1e-6)
        assert torch.allclose(ckpt.clip.encode("a red circle")[0], base_cond, atol=1e-6)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_strengths_stack_and_zero_is_identity(ckpt):
    w = dict(ckpt.model.unet.named_parameters())[LDM + ".weight"]
    up, down = lowrank(w)
    lora = parse_lora({f"diffusion_model.{LDM}.lora_up.weight": up, f"diffusion_model.{LDM}.lora_down.weight": down})
    once, _ = apply_lora(lora, ckpt.model, None, 1.0, 0.0)
    twice, _ = apply_lora(lora, once, None, 1.0, 0.0)
    double, _ = apply_lora(lora, ckpt.model, None, 2.0, 0.0)
    assert torch.allclose(run_unet(twice), run_unet(double), atol=1e-5)
    assert len(twice.patches[LDM + ".weight"]) == 2 and len(once.patches[LDM + ".weight"]) == 1


def test_lora_for_another_model_is_refused(ckpt):
    lora = parse_lora({"lora_unet_some_other_layer.lora_up.weight": torch.zeros(4, 2),
                       "lora_unet_some_other_layer.lora_down.weight": torch.zeros(2, 4)})
    with pytest.raises(CheckpointError, match="matches no weight"):
        apply_lora(lora, ckpt.model, ckpt.clip, 1.0, 1.0)


def test_file_without_lora_keys_is_refused():
    with pytest.raises(CheckpointError, match="holds no LoRA weights"):
        parse_lora({"model.diffusion_model.x.weight": torch.zeros(1)})
