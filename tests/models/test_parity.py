"""Parity with independent implementations, same random weights, float32.

- UNet and VAE against diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL`` (weights renamed
  to diffusers' names by ``diffusers_format``; a wrong mapping fails ``strict`` loading or the
  comparison);
- OpenCLIP text towers (SD 2.x, SDXL's bigG) against a reference written here with
  ``nn.MultiheadAttention``, which takes OpenCLIP's fused ``in_proj`` weights as they are;
- CLIP-L against transformers' own ``CLIPTextModel`` + ``CLIPTokenizer`` on the diffusers folder.
Tolerance: max |ours - theirs| <= 1e-4 * max |theirs|.
"""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from nodeflow.models import load_checkpoint, testing
from nodeflow.models.diffusers_format import (
    diffusers_unet_config,
    diffusers_vae_config,
    ldm_unet_to_diffusers,
    ldm_vae_to_diffusers,
)
from nodeflow.models.unet import UNet, UNetConfig, timestep_embedding

diffusers = pytest.importorskip("diffusers")


def close(ours, theirs):
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    assert err <= 1e-4 * scale, f"max abs diff {err:.3g} vs output scale {scale:.3g}"


def part(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_unet_matches_diffusers(tmp_path, family):
    sd = testing.tiny_state_dict(family, seed=11)
    model = load_checkpoint(testing.save(sd, tmp_path / "m.safetensors"), components=("model",)).model
    config = diffusers_unet_config(model.unet.config)
    theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(ldm_unet_to_diffusers(part(sd, "model.diffusion_model.")), strict=True)

    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 12, generator=g), torch.tensor([3.0, 711.5])
    context = torch.randn(2, 77, config["cross_attention_dim"], generator=g)
    ours_kw, their_kw = {}, {}
    if family.startswith("sdxl"):
        refiner = family == "sdxl_refiner"
        pooled = torch.randn(1, 128, generator=g)
        meta = {"pooled_output": pooled, "crop_w": 16, "crop_h": 8, "aesthetic_score": 2.5}
        ours_kw = model.condition_kwargs(meta, 2, 96, 128)
        time_ids = [128, 96, 8, 16] + ([2.5] if refiner else [128, 96])
        their_kw = {"added_cond_kwargs": {"text_embeds": pooled.expand(2, -1),
                                          "time_ids": torch.tensor([time_ids] * 2, dtype=torch.float32)}}
    with torch.no_grad():
        expected = theirs(x, t, context, **their_kw).sample
    close(model.apply_model(x, t, context, **ours_kw), expected)


def test_unet_odd_latent_size_matches_diffusers(tmp_path):
    sd = testing.tiny_state_dict("sd1", seed=3)
    model = load_checkpoint(testing.save(sd, tmp_path / "m.safetensors"), components=("model",)).model
    config = diffusers_unet_config(model.unet.config)
    theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(ldm_unet_to_diffusers(part(sd, "model.diffusion_model.")), strict=True)
    x, context = torch.randn(1, 4, 9, 13), torch.randn(1, 77, 32)
    with torch.no_grad():
        close(model.apply_model(x, torch.tensor([500.0]), context), theirs(x, 500.0, context).sample)


@pytest.mark.parametrize("name, cfg", [
    ("sdxl-style, 32-wide heads: 2 and 4 heads", UNetConfig(
        model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(1, 2),
        transformer_depth_middle=2, transformer_depth_output=(2, 2, 1, 1), context_dim=48,
        use_linear_in_transformer=True, adm_in_channels=32 + 6 * 256, num_head_channels=32)),
    ("sd1-style, 8 heads at width 64 and 128", UNetConfig(
        model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(1, 1),
        transformer_depth_middle=1, transformer_depth_output=(1, 1, 1, 1), context_dim=48, num_heads=8)),
])
def test_multi_head_attention_matches_diffusers(name, cfg):
    """Heads split and merged in the same order as diffusers' (the tiny families have one head at 64 wide)."""
    assert cfg.heads(64)[0] >= 2 and cfg.heads(128)[0] >= 4
    with torch.device("meta"):
        ours = UNet(cfg)
    sd = testing.random_tensors({k: tuple(v.shape) for k, v in ours.state_dict().items()}, seed=5)
    ours.load_state_dict(sd, assign=True)
    config = diffusers_unet_config(cfg)
    theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(ldm_unet_to_diffusers(sd), strict=True)
    g = torch.Generator().manual_seed(6)
    x, t, context = torch.randn(1, 4, 8, 6, generator=g), torch.tensor([421.0]), torch.randn(1, 77, 48, generator=g)
    y, their_kw = None, {}
    if cfg.adm_in_channels:
        pooled, time_ids = torch.randn(1, 32, generator=g), torch.tensor([[48.0, 64.0, 0.0, 0.0, 48.0, 64.0]])
        y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(1, -1)], dim=1)
        their_kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    with torch.no_grad():
        close(ours.eval()(x, t, context, y), theirs(x, t, context, **their_kw).sample)


def test_vae_matches_diffusers(vae_path):
    from nodeflow.models import load_vae
    from nodeflow.models.files import read_all

    vae = load_vae(vae_path)
    theirs = diffusers.AutoencoderKL(**{k: v for k, v in diffusers_vae_config(testing.TINY_VAE).items()
                                        if not k.startswith("_")}).eval()
    theirs.load_state_dict(ldm_vae_to_diffusers(read_all(vae_path)), strict=True)
    g = torch.Generator().manual_seed(2)
    z, image = torch.randn(2, 4, 8, 6, generator=g), torch.rand(2, 64, 48, 3, generator=g)
    with torch.no_grad():
        decoded = theirs.decode(z).sample
        latent = theirs.encode(image.movedim(-1, 1) * 2 - 1).latent_dist.mean
    close(vae.decode(z), ((decoded + 1) / 2).clamp(0, 1).movedim(1, -1))
    close(vae.encode(image), latent)


def test_diffusers_loads_our_diffusers_folder(diffusers_sdxl, sdxl):
    """The folder writer produces what diffusers itself reads, with the same numbers."""
    theirs = diffusers.UNet2DConditionModel.from_pretrained(diffusers_sdxl / "unet").eval()
    g = torch.Generator().manual_seed(4)
    x, context, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 160, generator=g), torch.randn(1, 128)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        expected = theirs(x, 10.0, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    y = sdxl.model.condition_kwargs({"pooled_output": pooled}, 1, 64, 64)
    close(sdxl.model.apply_model(x, torch.tensor([10.0]), context, **y), expected)


def test_clip_l_matches_transformers_pipeline(diffusers_sd1, sd1):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(diffusers_sd1 / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(diffusers_sd1 / "text_encoder").eval()
    prompt = "a photo of an astronaut riding a horse on mars"
    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encoder(ids)
    cond, pooled = sd1.clip.encode(prompt)
    close(cond, expected.last_hidden_state)
    close(pooled, expected.pooler_output)


# --- an independent OpenCLIP text tower ----------------------------------------------------

class ResidualAttentionBlock(nn.Module):
    def __init__(self, d, heads, inner):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, inner), gelu=nn.GELU(), c_proj=nn.Linear(inner, d)))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPText(nn.Module):
    """OpenCLIP's text transformer; its state dict names are OpenCLIP's."""

    def __init__(self, d, layers, inner, proj, vocab=49408, ctx=77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d)
        self.positional_embedding = nn.Parameter(torch.zeros(ctx, d))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(d, max(1, d // 64), inner)
                                                   for _ in range(layers))
        self.ln_final = nn.LayerNorm(d)
        self.text_projection = nn.Parameter(torch.zeros(d, proj))
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
        hidden = [x]
        for block in self.transformer.resblocks:
            x = block(x, mask)
            hidden.append(x)
        final = self.ln_final(x)
        pooled = final[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ self.text_projection
        return hidden, pooled


def openclip_reference(sd, prefix, dims):
    ref = OpenCLIPText(dims["width"], dims["layers"], dims["intermediate"], dims["projection"]).eval()
    ref.load_state_dict(part(sd, prefix), strict=True)
    return ref


PROMPT = "a watercolor painting of a fox in the snow"


def openclip_ids(tokens):
    return torch.tensor([[t for t, _ in chunk] for chunk in tokens])


def test_sd2_openclip_conversion_matches_reference(sd2_path):
    from nodeflow.models.files import read_all

    sd = read_all(sd2_path)
    ref = openclip_reference(sd, "cond_stage_model.model.", testing.OPENCLIP_H)
    clip = load_checkpoint(sd2_path, components=("clip",)).clip
    ids = openclip_ids(clip.tokenize(PROMPT)["h"])
    assert ids[0, -1] == 0                                         # OpenCLIP pads with 0
    with torch.no_grad():
        hidden, pooled = ref(ids)
    cond, our_pooled = clip.encode(PROMPT)
    close(cond, ref.ln_final(hidden[-2]))                          # SD 2.x: penultimate layer, final norm
    close(our_pooled, pooled)
    last, _ = clip.set_last_layer(-1).encode(PROMPT)
    close(last, ref.ln_final(hidden[-1]))


def test_sdxl_text_encoders_match_reference(sdxl_path, diffusers_sdxl, sdxl):
    from transformers import CLIPTextModel, CLIPTokenizer

    from nodeflow.models.files import read_all

    sd = read_all(sdxl_path)
    ref_g = openclip_reference(sd, "conditioner.embedders.1.model.", testing.OPENCLIP_G)
    ref_l = CLIPTextModel.from_pretrained(diffusers_sdxl / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(diffusers_sdxl / "tokenizer")
    ids_l = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_g = openclip_ids(sdxl.clip.tokenize(PROMPT)["g"])
    with torch.no_grad():
        hidden_l = ref_l(ids_l, output_hidden_states=True).hidden_states
        hidden_g, pooled_g = ref_g(ids_g)
    cond, pooled = sdxl.clip.encode(PROMPT)
    assert cond.shape == (1, 77, 32 + 128) and pooled.shape == (1, 128)
    close(cond, torch.cat([hidden_l[-2], hidden_g[-2]], dim=-1))   # SDXL: penultimate, no final norm
    close(pooled, pooled_g)
