"""Inpainting keeps what lies outside the mask: measured with the trained demo model, whose
VAE is a real (small) autoencoder, through LoadImage → VAEEncode → SetLatentNoiseMask →
Sample → VAEDecode."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

import nodeflow.folders as folders_mod
from nodeflow import Executor, Workflow, default_registry
from nodeflow import context as run_context
from nodeflow.train import assets
from nodeflow.train.shapes import draw


@pytest.fixture
def base(tmp_path):
    assert assets.SHIPPED.is_file(), "the demo checkpoint should ship with the package"
    saved = run_context.default()._folders
    folders_mod.configure(tmp_path)
    assets.install_shipped(tmp_path / "models" / "checkpoints" / assets.DEMO_CHECKPOINT)
    (tmp_path / "input").mkdir()
    yield tmp_path
    run_context.default()._folders = saved


def test_pixels_outside_the_mask_stay_within_vae_error(base):
    rgb = draw("red", "circle", "white", 64, random.Random(3))
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, 40:] = 0  # repaint the right part
    Image.fromarray(np.dstack([rgb, alpha])).save(base / "input" / "scene.png")

    wf = Workflow()
    ckpt = wf.add("LoadModel", ckpt_name=assets.DEMO_CHECKPOINT)
    img = wf.add("LoadImage", image="scene.png")
    enc = wf.add("VAEEncode", pixels=img[0], vae=ckpt[2])
    masked = wf.add("SetLatentNoiseMask", samples=enc[0], mask=img[1])
    pos = wf.add("EncodeText", text="a blue triangle on a white background", clip=ckpt[1])
    neg = wf.add("EncodeText", text="", clip=ckpt[1])
    sample = wf.add("Sample", model=ckpt[0], seed=5, steps=12, cfg=5.0, sampler_name="euler", scheduler="normal",
                    positive=pos[0], negative=neg[0], latent_image=masked[0], denoise=1.0)
    out = wf.add("VAEDecode", samples=sample[0], vae=ckpt[2])
    roundtrip = wf.add("VAEDecode", samples=enc[0], vae=ckpt[2])
    wf.add("PreviewImage", images=out[0])
    wf.add("PreviewImage", images=roundtrip[0])
    result = Executor(default_registry()).run(wf.to_api())
    assert result.ok, result.error

    source = rgb.astype(np.float32) / 255
    inpainted = result.output(out.id)[0].numpy()
    reconstructed = result.output(roundtrip.id)[0].numpy()
    keep = np.zeros((64, 64), bool)
    keep[:, :32] = True  # at least 8 px (one latent cell) away from the repainted area
    vae_error = np.abs(reconstructed - source)[keep].mean()
    kept_error = np.abs(inpainted - source)[keep].mean()
    changed = np.abs(inpainted - source)[:, 40:].mean()
    # Outside the mask the sampled latent is the input's, exactly (latent columns 0-4 cover
    # pixels 0-39); the pixels there differ from the input only as much as the VAE's round trip
    # does (its decoder sees the whole latent, new part included). Inside, the picture changed.
    latent_in, latent_out = result.output(enc.id)["samples"], result.output(sample.id)["samples"]
    assert torch.equal(latent_out[..., :5], latent_in[..., :5])
    assert (latent_out - latent_in)[..., 5:].abs().mean() > 1.0
    assert kept_error <= vae_error + 0.02, (kept_error, vae_error)
    assert changed > kept_error + 0.1, (changed, kept_error)
