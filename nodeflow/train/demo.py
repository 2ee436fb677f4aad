"""Training nodeflow's demo model: a tiny latent diffusion model of the SD 1.x family.

It is the real architecture at a small width — an AutoencoderKL (64×64 pixels → 4×8×8
latents), a UNet with cross-attention, a CLIP text encoder that reads prompts through the
real CLIP tokenizer — trained on the CPU on drawn shapes (``nodeflow.train.shapes``) in two
stages:

1. the autoencoder, on reconstruction with a light KL term, then rescaled so that its
   latents have the spread SD 1.x's fixed latent scale (0.18215) expects;
2. the text encoder alone, briefly, on reading captions: a linear probe on its end-of-text
   and padding states must name the colour, shape and background the caption describes.
   SD's text encoder comes pretrained (CLIP); ours must learn first that the shape word
   matters, else the UNet learns colour (a large loss term) long before shape (a small one);
3. the UNet and the text encoder together, on SD's ε-prediction loss with its
   scaled-linear noise schedule, the caption dropped 10 % of the time (so classifier-free
   guidance has an unconditional model to push against).

The result is saved as one ``.safetensors`` file in the original SD 1.x key layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``),
so ``LoadModel`` loads it like any other checkpoint.

    python -m nodeflow.train.demo --out models/checkpoints/nodeflow-demo.safetensors
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nodeflow.models.clip import ClipTextModel
from nodeflow.models.diffusion import sd_alphas_cumprod
from nodeflow.models.tokenizer import EOS, ClipTokenizer
from nodeflow.models.unet import UNet, UNetConfig
from nodeflow.models.vae import AutoencoderKL, VAEConfig
from nodeflow.train.assets import DEMO_CHECKPOINT
from nodeflow.train.shapes import attribute_labels, dataset

LATENT_SCALE = 0.18215  # SD 1.x's: the VAE is rescaled to it, not the other way round


@dataclass
class DemoConfig:
    image_size: int = 64                    # pixels; latents are image_size / 8
    images: int = 6000                      # drawn training images
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(
        model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(1, 1),
        transformer_depth_middle=1, transformer_depth_output=(1, 1, 1, 1), context_dim=64, num_heads=8))
    vae_crop: int = 32                      # the VAE is convolutional: train it on random crops (4x cheaper)
    text_width: int = 64                    # CLIP hidden size (heads are 64 wide: one head)
    text_layers: int = 2
    #: The 49,408-row token table stays at its random initialisation: the few words the demo
    #: uses get distinct random vectors anyway, and updating the whole table costs more than the UNet.
    train_token_embedding: bool = False
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    vae_init_logvar: float = -10.0          # posterior σ ≈ 0.007 at the start (see train_vae)
    text_steps: int = 300
    text_batch: int = 64
    text_lr: float = 1e-3
    unet_steps: int = 2000
    unet_batch: int = 32
    min_snr_gamma: float = 5.0              # loss weight min(SNR, γ)/SNR (Hang et al. 2023): faster convergence
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    seed: int = 0


def text_model(cfg: DemoConfig) -> ClipTextModel:
    """A CLIP-L-shaped text tower at ``text_width``, configured as the SD 1.x loader reads it."""
    from transformers import CLIPTextConfig

    from nodeflow.models.tokenizer import BOS

    config = CLIPTextConfig(vocab_size=49408, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                            num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_width // 64),
                            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            projection_dim=cfg.text_width, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
                            attn_implementation="sdpa")
    return ClipTextModel(config, projection=False)


def tokenize(tokenizer: ClipTokenizer, captions: list[str]) -> torch.Tensor:
    """(B, 77) token ids of the first 77-token chunk of each caption (all demo captions fit)."""
    return torch.tensor([[t for t, _ in tokenizer.tokenize_weighted(c)[0]] for c in captions])


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_vae(cfg: DemoConfig, images: torch.Tensor, log=_log) -> AutoencoderKL:
    """Stage 1: reconstruction + KL on images (N, 3, H, W) in -1..1."""
    g = torch.Generator().manual_seed(cfg.seed)
    vae = AutoencoderKL(cfg.vae)
    with torch.no_grad():  # start with a narrow posterior: noise σ = 1 would drown the mean at first
        vae.quant_conv.bias[cfg.vae.embed_dim:] = cfg.vae_init_logvar
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    t0 = time.monotonic()
    for step in range(cfg.vae_steps):
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=g)]
        if cfg.vae_crop < x.shape[-1]:
            top, left = torch.randint(0, x.shape[-1] - cfg.vae_crop + 1, (2,), generator=g).tolist()
            x = x[:, :, top:top + cfg.vae_crop, left:left + cfg.vae_crop]
        moments = vae.quant_conv(vae.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        recon = vae.decode(z)
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.vae_steps - 1:
            log(f"vae  {step:5d}/{cfg.vae_steps}  recon {rec.item():.4f}  kl {kl.item():.1f}  "
                f"{time.monotonic() - t0:.0f}s")
    return vae.eval()


@torch.no_grad()
def rescale_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Scale the latent space so that latents · 0.18215 have unit spread (an exact
    reparametrisation: the encoder's mean output is multiplied by k, the decoder's input
    divided by k). Returns the raw latents of ``images``."""
    latents = torch.cat([vae.encode(images[i:i + 256]) for i in range(0, len(images), 256)])
    k = (1.0 / LATENT_SCALE) / latents.std().item()
    e = vae.config.embed_dim
    vae.quant_conv.weight[:e] *= k
    vae.quant_conv.bias[:e] *= k
    vae.quant_conv.bias[e:] += 2 * math.log(k)          # the posterior's logvar scales with k²
    vae.post_quant_conv.weight /= k
    return latents * k


def pretrain_text(cfg: DemoConfig, text: ClipTextModel, ids: torch.Tensor, labels: torch.Tensor,
                  log=_log) -> ClipTextModel:
    """Stage 2: the text tower learns to carry each caption's attributes into its end-of-text
    and padding states (which every image position can attend to). ``labels`` (N, 3) holds
    colour, shape and background indices, -100 where the caption does not say."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    from nodeflow.train.shapes import BACKGROUNDS, COLOURS, SHAPES

    sizes = (len(COLOURS), len(SHAPES), len(BACKGROUNDS))
    head = torch.nn.Linear(cfg.text_width, sum(sizes))
    params = [p for p in (*text.parameters(), *head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.text_lr, weight_decay=0.01)
    t0 = time.monotonic()
    for step in range(cfg.text_steps):
        idx = torch.randint(len(ids), (cfg.text_batch,), generator=g)
        tok = ids[idx]
        hidden, _ = text(tok, -1, True)                   # (B, 77, width)
        tail = tok == EOS                                 # end-of-text and the padding after it
        logits = head(hidden[tail]).split(sizes, dim=-1)  # (tail tokens, classes) per attribute
        target = labels[idx].repeat_interleave(tail.sum(1), dim=0)
        loss = sum(F.cross_entropy(lg, target[:, k]) for k, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.text_steps - 1:
            log(f"text {step:5d}/{cfg.text_steps}  loss {loss.item():.4f}  {time.monotonic() - t0:.0f}s")
    return text


def train_diffusion(cfg: DemoConfig, text: ClipTextModel, latents: torch.Tensor, ids: torch.Tensor,
                    empty: torch.Tensor, log=_log) -> tuple[UNet, ClipTextModel]:
    """Stage 3: ε-prediction on the SD schedule, the UNet and the text tower together."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    unet = UNet(cfg.unet)
    alphas = sd_alphas_cumprod()
    params = [p for p in (*unet.parameters(), *text.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.unet_lr, total_steps=cfg.unet_steps, pct_start=0.05)
    x_all = latents * LATENT_SCALE
    t0 = time.monotonic()
    ema = None
    for step in range(cfg.unet_steps):
        idx = torch.randint(len(x_all), (cfg.unet_batch,), generator=g)
        x0 = x_all[idx]
        tok = ids[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout
        tok[drop] = empty
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        context, _ = text(tok, -1, True)
        snr = a / (1 - a)
        weight = snr.clamp(max=cfg.min_snr_gamma) / snr
        loss = (weight * (unet(xt, t.float(), context) - eps).pow(2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 250 == 0 or step == cfg.unet_steps - 1:
            log(f"unet {step:5d}/{cfg.unet_steps}  loss {ema:.4f}  {time.monotonic() - t0:.0f}s")
    return unet.eval(), text.eval()


def sd1_state_dict(unet: UNet, vae: AutoencoderKL, text: ClipTextModel) -> dict[str, torch.Tensor]:
    """The three networks under SD 1.x's original checkpoint keys."""
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    prefix = "cond_stage_model.transformer." + ("" if text.hf_prefix() else "text_model.")
    sd.update({prefix + k: v for k, v in text.transformer.state_dict().items() if not k.endswith("position_ids")})
    return sd


def train(out: Path, cfg: DemoConfig | None = None, dtype: torch.dtype = torch.float16, log=None) -> Path:
    """Train the demo model from scratch and save it to ``out``."""
    from safetensors.torch import save_file

    cfg = cfg or DemoConfig()
    log = log or _log
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    t0 = time.monotonic()
    data = dataset(cfg.images, seed=cfg.seed, size=cfg.image_size)
    images = torch.from_numpy(np.stack([s.image for s in data])).permute(0, 3, 1, 2).float() / 127.5 - 1
    tokenizer = ClipTokenizer(EOS)
    ids = tokenize(tokenizer, [s.caption for s in data])
    empty = tokenize(tokenizer, [""])[0]
    labels = torch.tensor([attribute_labels(s) for s in data])
    log(f"data: {len(data)} images, {time.monotonic() - t0:.0f}s")

    vae = train_vae(cfg, images, log)
    latents = rescale_latents(vae, images)
    text = text_model(cfg)
    if not cfg.train_token_embedding:
        text.transformer.get_input_embeddings().weight.requires_grad_(False)
    text = pretrain_text(cfg, text, ids, labels, log)
    unet, text = train_diffusion(cfg, text, latents, ids, empty, log)

    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in
          sd1_state_dict(unet, vae, text).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"nodeflow.demo": "1", "family": "sd1", "image_size": str(cfg.image_size)})
    tmp.replace(out)
    log(f"saved {out} ({out.stat().st_size / 2**20:.1f} MiB) after {time.monotonic() - t0:.0f}s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train nodeflow's demo model on the CPU.")
    ap.add_argument("--out", type=Path, default=Path("models/checkpoints") / DEMO_CHECKPOINT)
    ap.add_argument("--vae-steps", type=int, default=DemoConfig.vae_steps)
    ap.add_argument("--text-steps", type=int, default=DemoConfig.text_steps)
    ap.add_argument("--unet-steps", type=int, default=DemoConfig.unet_steps)
    ap.add_argument("--images", type=int, default=DemoConfig.images)
    ap.add_argument("--unet-channels", type=int, default=64, help="UNet width (a multiple of 32)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32", action="store_true", help="save float32 weights (default float16)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DemoConfig(vae_steps=args.vae_steps, text_steps=args.text_steps, unet_steps=args.unet_steps,
                     images=args.images, seed=args.seed)
    cfg.unet.model_channels = args.unet_channels
    train(args.out, cfg, torch.float32 if args.fp32 else torch.float16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
