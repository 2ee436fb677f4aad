"""The Stable Diffusion model stack: checkpoints, UNet, VAE, CLIP text encoders, devices.

    from nodeflow.models import load_checkpoint
    ckpt = load_checkpoint("models/checkpoints/sd15.safetensors")   # or a diffusers folder; prediction_type="v"
    ckpt.family                                  # "sd1"
    cond, pooled = ckpt.clip.encode("a (red:1.2) cat")
    eps = ckpt.model.apply_model(x, t, cond)     # x already scaled: model.process_latent_in(latent)
    image = ckpt.vae.decode(latent)              # (B, H, W, 3) in 0..1

Families: "sd1", "sd2", "sd2_v", "sdxl", "sdxl_refiner", and "<base>_inpaint" for 9-channel
inpainting UNets ("sd1_inpaint", "sd2_inpaint", "sdxl_inpaint"); see ``checkpoint``.
"""

from nodeflow.models.checkpoint import Checkpoint, detect_family, load_checkpoint, load_diffusers, load_vae
from nodeflow.models.clip import TextEncoder
from nodeflow.models.devices import get_device, manager, set_device, set_precision
from nodeflow.models.diffusion import DiffusionModel, base_family
from nodeflow.models.files import CheckpointError
from nodeflow.models.vae import VAE

__all__ = [
    "VAE",
    "Checkpoint",
    "CheckpointError",
    "DiffusionModel",
    "TextEncoder",
    "base_family",
    "detect_family",
    "get_device",
    "load_checkpoint",
    "load_diffusers",
    "load_vae",
    "manager",
    "set_device",
    "set_precision",
]
