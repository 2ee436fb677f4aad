"""CLIP image encoders (against an OpenCLIP reference written here with nn.MultiheadAttention,
which takes OpenCLIP's fused weights as they are), ComfyUI's preprocessing, unCLIP's noise
augmentation (against the cosine schedule computed here), and GLIGEN's pieces."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nodeflow.models import testing
from nodeflow.models.clip_vision import MEAN, STD, build_clip_vision, preprocess
from nodeflow.models.files import CheckpointError
from nodeflow.models.gligen import fourier, load_gligen
from nodeflow.models.unclip import unclip_vector


def openclip_visual(sd: dict, pixels: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenCLIP's VisionTransformer forward: (last hidden state, penultimate, image embedding)."""
    w = {k[len("visual."):]: v for k, v in sd.items()}
    d = w["class_embedding"].shape[0]
    x = F.conv2d(pixels, w["conv1.weight"], stride=w["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([w["class_embedding"].expand(x.shape[0], 1, d), x], dim=1) + w["positional_embedding"]
    x = F.layer_norm(x, (d,), w["ln_pre.weight"], w["ln_pre.bias"])
    states = [x]
    layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("transformer.resblocks."))
    for n in range(layers):
        p = f"transformer.resblocks.{n}."
        mha = nn.MultiheadAttention(d, 16, batch_first=True)
        mha.load_state_dict({"in_proj_weight": w[p + "attn.in_proj_weight"],
                             "in_proj_bias": w[p + "attn.in_proj_bias"],
                             "out_proj.weight": w[p + "attn.out_proj.weight"],
                             "out_proj.bias": w[p + "attn.out_proj.bias"]})
        h = F.layer_norm(x, (d,), w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        x = x + mha(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (d,), w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        x = x + F.linear(act(F.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])), w[p + "mlp.c_proj.weight"],
                         w[p + "mlp.c_proj.bias"])
        states.append(x)
    pooled = F.layer_norm(x[:, 0], (d,), w["ln_post.weight"], w["ln_post.bias"]) @ w["proj"]
    return x, states[-2], pooled


@pytest.mark.parametrize("tower", ["l", "h", "g"])
def test_clip_vision_matches_openclip(tower):
    sd = testing.tiny_clip_vision(tower, openclip=True)
    for layout in (sd, testing.tiny_clip_vision(tower)):       # OpenCLIP keys and transformers keys
        encoder = build_clip_vision(dict(layout), "enc.safetensors", device="cpu")
        image = torch.rand(2, 224, 224, 3, generator=torch.Generator().manual_seed(1))
        out = encoder.encode(image)
        act = (lambda v: v * torch.sigmoid(1.702 * v)) if tower == "l" else F.gelu
        with torch.no_grad():
            last, penultimate, embeds = openclip_visual(sd, preprocess(image), act)
        for ours, theirs in ((out.last_hidden_state, last), (out.penultimate_hidden_states, penultimate),
                             (out.image_embeds, embeds)):
            assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
        assert out["image_embeds"] is out.image_embeds


def test_preprocess_like_comfyui():
    image = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(2))
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    expected = ((image.movedim(-1, 1) * 255).round() / 255 - mean) / std
    assert torch.allclose(preprocess(image), expected, atol=1e-6)
    wide = torch.zeros(1, 100, 300, 3)
    wide[:, :, 100:200] = 1.0                                   # the centre third is white
    cropped = preprocess(wide, crop=True)                       # short side to 224, centre 224² cut
    assert cropped.shape == (1, 3, 224, 224)
    assert torch.allclose(cropped[0, :, 112, 112], (1 - torch.tensor(MEAN)) / torch.tensor(STD), atol=1e-5)
    squashed = preprocess(wide, crop=False)
    assert torch.allclose(squashed[0, :, 112, 20], (0 - torch.tensor(MEAN)) / torch.tensor(STD), atol=1e-5)


def test_unknown_vision_layout_is_named():
    small = {k: v for k, v in testing.tiny_clip_vision("h").items()
             if not any(f"layers.{i}." in k for i in range(10, 32))}
    with pytest.raises(CheckpointError, match=r"small.safetensors: not a CLIP vision model .* found 10 encoder"):
        build_clip_vision(small, "small.safetensors", device="cpu")


class Embeds:
    def __init__(self, image_embeds):
        self.image_embeds = image_embeds


def squaredcos_alphas():
    alphas, prod = [], 1.0
    for i in range(1000):
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2   # noqa: E731
        prod *= 1 - min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999)
        alphas.append(prod)
    return alphas


def test_unclip_noise_augmentation():
    e = torch.randn(1, 16, generator=torch.Generator().manual_seed(3))
    alphas = squaredcos_alphas()
    for aug, strength in ((0.0, 1.0), (0.3, 0.7)):
        y = unclip_vector([{"clip_vision_output": Embeds(e), "strength": strength, "noise_augmentation": aug}],
                          seed=25)
        level = round(999 * aug)
        noise = torch.randn(1, 16, generator=torch.Generator().manual_seed(15))          # seed − 10
        z = math.sqrt(alphas[level]) * e + math.sqrt(1 - alphas[level]) * noise
        freqs = torch.exp(-math.log(10000) * torch.arange(8) / 8)
        emb = torch.cat([torch.cos(level * freqs), torch.sin(level * freqs)])
        assert torch.allclose(y, torch.cat([z, emb[None]], 1) * strength, atol=1e-5)


def test_unclip_merged_embeddings_renoised_as_comfyui():
    """Two embeddings are summed and noised again at level round(999 · 0.05). ComfyUI draws that
    noise unseeded from torch's global CPU generator, which its seeded draws (torch.manual_seed(seed
    − 10)) have just reset: the noise is the second draw of a generator seeded with seed − 10,
    whatever the global state was before."""
    g = torch.Generator().manual_seed(3)
    e1, e2 = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
    items = [{"clip_vision_output": Embeds(e1), "strength": 1.0, "noise_augmentation": 0.1},
             {"clip_vision_output": Embeds(e2), "strength": 0.5, "noise_augmentation": 0.3}]
    torch.manual_seed(999)                                     # the global state must not matter
    y = unclip_vector(items, seed=25, merge_level=0.05)
    alphas = squaredcos_alphas()
    seeded = torch.Generator().manual_seed(15)                 # seed − 10
    first = torch.randn(1, 16, generator=seeded)               # each embedding's own (re-seeded) noise
    second = torch.randn(1, 16, generator=seeded)              # the merge's
    total = sum(strength * (math.sqrt(alphas[round(999 * aug)]) * e + math.sqrt(1 - alphas[round(999 * aug)]) * first)
                for e, strength, aug in ((e1, 1.0, 0.1), (e2, 0.5, 0.3)))
    z = math.sqrt(alphas[50]) * total + math.sqrt(1 - alphas[50]) * second
    assert torch.allclose(y[:, :16], z, atol=1e-5)
    # the first values ComfyUI 0.8.0 gave when run on these inputs (comfy.model_base.unclip_adm with a
    # CLIPEmbeddingNoiseAugmentation(squaredcos_cap_v2, timestep_dim=16), merge 0.05, seed 15, on the CPU)
    comfy = torch.tensor([-0.2944447, 0.8989596, -1.4736042, -0.8764875, 0.6069056, -0.4075880])
    assert torch.allclose(y[0, :6], comfy, atol=1e-5)


def test_gligen_pieces(tmp_path):
    boxes = torch.tensor([[0.25, 0.5, 0.75, 1.0]])
    f = fourier(boxes)
    assert f.shape == (1, 64)
    assert torch.allclose(f[0, :4], torch.sin(boxes[0])) and torch.allclose(f[0, 4:8], torch.cos(boxes[0]))
    k = 100 ** (3 / 8)
    assert torch.allclose(f[0, 24:28], torch.sin(k * boxes[0]), atol=1e-6)
    path = testing.save(testing.tiny_gligen_state_dict(prefix="model.diffusion_model."), tmp_path / "g.safetensors")
    model = load_gligen(path, device="cpu")
    assert len(model.net.module_list) == 11                     # one per SpatialTransformer of the tiny UNet
    assert [m.linear.out_features for m in model.net.module_list] == [32, 32, 64, 64, 64, 64, 64, 64, 32, 32, 32]
    tokens = model.tokens([(torch.randn(1, 32), 2, 2, 0, 0)], (1, 4, 8, 8), "cpu")
    assert tokens.shape == (1, 30, 32)
    with pytest.raises(ValueError, match="'g.safetensors' takes text embeddings of width 32, got 768"):
        model.tokens([(torch.randn(1, 768), 2, 2, 0, 0)], (1, 4, 8, 8), "cpu")
    bogus = testing.save({"foo": torch.zeros(1)}, tmp_path / "bogus.safetensors")
    with pytest.raises(CheckpointError, match="bogus.safetensors: not a GLIGEN model"):
        load_gligen(bogus, device="cpu")
