"""Model loaders: checkpoints, standalone VAEs and LoRAs from the models/ folders."""

from __future__ import annotations

import os

from nodeflow import Combo, Float, Node, Output, Socket
from nodeflow.folders import folders


def _file_stamp(kind: str, name: str):
    """A loader's cache fingerprint: the file's size and mtime (so replacing it reloads)."""
    try:
        st = os.stat(folders().model_path(kind, name))
    except (OSError, ValueError):
        return None  # the run reports the missing file with the list of what exists
    return (st.st_size, st.st_mtime_ns)


def _choices(kind: str):
    return lambda: folders().list_models(kind)


class LoadModel(Node):
    """Loads a Stable Diffusion checkpoint (SD 1.x, SD 2.x, SDXL; .safetensors or .ckpt)
    from models/checkpoints, detecting its family from the weights."""

    category = "loaders"
    display_name = "Load Checkpoint"
    aliases = ("CheckpointLoaderSimple",)
    inputs = {"ckpt_name": Combo(choices=_choices("checkpoints"), tooltip="a file in models/checkpoints")}
    outputs = [Output("MODEL", "MODEL"), Output("CLIP", "CLIP"), Output("VAE", "VAE")]

    @classmethod
    def fingerprint(cls, ckpt_name, **_):
        return _file_stamp("checkpoints", ckpt_name)

    def run(self, ckpt_name):
        from nodeflow.models import load_checkpoint

        ckpt = load_checkpoint(folders().model_path("checkpoints", ckpt_name))
        return ckpt.model, ckpt.clip, ckpt.vae


class LoadModelWithConfig(LoadModel):
    """ComfyUI's older CheckpointLoader: the config file is not needed (the architecture is
    read from the weights) and is ignored."""

    display_name = "Load Checkpoint With Config (deprecated)"
    aliases = ("CheckpointLoader",)
    deprecated = True
    inputs = {"config_name": Combo(choices=lambda: ["v1-inference.yaml", "v2-inference.yaml",
                                                    "v2-inference-v.yaml", "sd_xl_base.yaml"]),
              "ckpt_name": LoadModel.inputs["ckpt_name"]}

    def run(self, config_name, ckpt_name):
        return super().run(ckpt_name)


class LoadVAE(Node):
    """Loads a standalone VAE from models/vae."""

    category = "loaders"
    display_name = "Load VAE"
    aliases = ("VAELoader",)
    inputs = {"vae_name": Combo(choices=_choices("vae"))}
    outputs = [Output("VAE")]

    @classmethod
    def fingerprint(cls, vae_name, **_):
        return _file_stamp("vae", vae_name)

    def run(self, vae_name):
        from nodeflow.models import load_vae

        return (load_vae(folders().model_path("vae", vae_name)),)


class LoadLora(Node):
    """Applies a LoRA (kohya or diffusers key layout) to a model and its text encoder,
    each with its own strength. The loaded handles are not changed: patched copies are returned."""

    category = "loaders"
    display_name = "Load LoRA"
    aliases = ("LoraLoader",)
    inputs = {
        "model": Socket("MODEL"),
        "clip": Socket("CLIP"),
        "lora_name": Combo(choices=_choices("loras")),
        "strength_model": Float(default=1.0, min=-100.0, max=100.0, step=0.01),
        "strength_clip": Float(default=1.0, min=-100.0, max=100.0, step=0.01),
    }
    outputs = [Output("MODEL"), Output("CLIP")]

    @classmethod
    def fingerprint(cls, lora_name, **_):
        return _file_stamp("loras", lora_name)

    def run(self, model, clip, lora_name, strength_model, strength_clip):
        from nodeflow.models.lora import apply_lora, load_lora_file

        if strength_model == 0 and strength_clip == 0:
            return model, clip
        lora = load_lora_file(folders().model_path("loras", lora_name))
        return apply_lora(lora, model, clip, strength_model, strength_clip)


class LoadLoraModelOnly(Node):
    """Applies a LoRA to the diffusion model only."""

    category = "loaders"
    display_name = "Load LoRA (model only)"
    aliases = ("LoraLoaderModelOnly",)
    inputs = {
        "model": Socket("MODEL"),
        "lora_name": Combo(choices=_choices("loras")),
        "strength_model": Float(default=1.0, min=-100.0, max=100.0, step=0.01),
    }
    outputs = [Output("MODEL")]

    @classmethod
    def fingerprint(cls, lora_name, **_):
        return _file_stamp("loras", lora_name)

    def run(self, model, lora_name, strength_model):
        from nodeflow.models.lora import apply_lora, load_lora_file

        if strength_model == 0:
            return (model,)
        lora = load_lora_file(folders().model_path("loras", lora_name))
        patched, _ = apply_lora(lora, model, None, strength_model, 0.0)
        return (patched,)
