"""The demo model: its training writes a real SD 1.x checkpoint, and the shipped one follows prompts."""

import numpy as np
import torch

from nodeflow.models import load_checkpoint
from nodeflow.models.vae import AutoencoderKL
from nodeflow.train import assets
from nodeflow.train.demo import LATENT_SCALE, DemoConfig, rescale_latents, train
from nodeflow.train.evaluate import evaluate


def test_latent_rescale_is_an_exact_reparametrisation():
    torch.manual_seed(0)
    cfg = DemoConfig()
    vae = AutoencoderKL(cfg.vae).eval()
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(images))
    latents = rescale_latents(vae, images)
    with torch.no_grad():
        after = vae.decode(vae.encode(images))
        assert torch.allclose(vae.encode(images), latents, atol=1e-5)
    assert torch.allclose(before, after, atol=1e-4)
    assert abs(latents.std().item() * LATENT_SCALE - 1.0) < 1e-3


def test_training_writes_an_sd1_checkpoint_the_loader_reads(tmp_path):
    cfg = DemoConfig(images=64, vae_steps=2, unet_steps=2, vae_batch=4, unet_batch=4)
    path = train(tmp_path / "demo.safetensors", cfg, log=lambda m: None)
    ckpt = load_checkpoint(path)
    assert ckpt.family == "sd1"
    assert ckpt.model.unet.config.model_channels == cfg.unet.model_channels
    assert ckpt.model.unet.config.context_dim == cfg.text_width
    cond, _ = ckpt.clip.encode("a red circle on a blue background")
    assert cond.shape == (1, 77, cfg.text_width)
    image = ckpt.vae.decode(torch.zeros(1, 4, 8, 8))
    assert image.shape == (1, 64, 64, 3)


def test_shipped_demo_model_follows_prompts():
    assert assets.SHIPPED.is_file(), "the demo checkpoint should ship with the package"
    report = evaluate(assets.SHIPPED, per_class=3, steps=12, real_images=300)
    # 30 images: the prompt is followed far above chance (10 %) and above the unconditional model.
    assert report.adherence >= 0.7, report.per_class
    assert report.adherence > report.unconditional + 0.4
    assert np.isfinite(report.frechet)


def test_demo_command_installs_the_model_and_the_example_inputs(tmp_path, capsys):
    from nodeflow import cli

    rc = cli.main(["demo", "--base-dir", str(tmp_path), "--steps", "2", "--batch", "1", "--quiet"])
    assert rc == 0
    assert (tmp_path / "models" / "checkpoints" / assets.DEMO_CHECKPOINT).is_file()
    assert sorted(p.name for p in (tmp_path / "input").iterdir()) == ["example.png", "example_masked.png"]
    (saved,) = (tmp_path / "output").glob("demo_*.png")
    assert saved.stat().st_size > 0
    # an input the user replaced is left alone
    (tmp_path / "input" / "example.png").write_bytes(b"mine")
    assert cli.main(["demo", "--base-dir", str(tmp_path), "--steps", "2", "--batch", "1", "--quiet"]) == 0
    assert (tmp_path / "input" / "example.png").read_bytes() == b"mine"
