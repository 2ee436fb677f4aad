"""CLIP image encoders and unCLIP: encoding images for unCLIP models and SDXL's "revision"."""

from __future__ import annotations

from nodeflow import Combo, Float, Node, Output, Socket
from nodes.loaders import _load, checkpoint_choices, checkpoint_path, choices_of, model_path_of, stamp_of

CLIP_VISION_KINDS = ("clip_vision",)


class LoadClipVision(Node):
    """Loads a CLIP image encoder (ViT-L/14, ViT-H/14, ViT-bigG/14; transformers or OpenCLIP keys)
    from models/clip_vision."""

    category = "loaders"
    display_name = "LoadClipVision"  # its ComfyUI twin keeps ComfyUI's title
    aliases = ("CLIPVisionLoader",)
    alias_display_names = {"CLIPVisionLoader": "Load CLIP Vision"}
    model_inputs = {"clip_name": "clip_vision"}
    inputs = {"clip_name": Combo(choices=choices_of(*CLIP_VISION_KINDS))}
    outputs = [Output("CLIP_VISION")]

    @classmethod
    def fingerprint(cls, clip_name, **_):
        return stamp_of(CLIP_VISION_KINDS, clip_name)

    def run(self, clip_name):
        from nodeflow.models.clip_vision import load_clip_vision

        return (load_clip_vision(model_path_of(CLIP_VISION_KINDS, clip_name)),)


class CLIPVisionEncode(Node):
    """Encodes an image with a CLIP image encoder: ``center`` scales the short side to 224 and cuts
    out the centre, ``none`` squashes the image to 224×224."""

    category = "conditioning"
    display_name = "CLIP Vision Encode"
    inputs = {"clip_vision": Socket("CLIP_VISION"), "image": Socket("IMAGE"), "crop": Combo(choices=["center", "none"])}
    outputs = [Output("CLIP_VISION_OUTPUT")]

    def run(self, clip_vision, image, crop):
        return (clip_vision.encode(image, crop=crop == "center"),)


class unCLIPConditioning(Node):
    """Adds a CLIP image embedding to a conditioning, for unCLIP models (SD 2.1 unCLIP) and SDXL's
    revision (it replaces the pooled text), noised by ``noise_augmentation`` (0..1) and scaled by
    ``strength``; several add up."""

    category = "conditioning"
    inputs = {
        "conditioning": Socket("CONDITIONING"),
        "clip_vision_output": Socket("CLIP_VISION_OUTPUT"),
        "strength": Float(default=1.0, min=-10.0, max=10.0, step=0.01),
        "noise_augmentation": Float(default=0.0, min=0.0, max=1.0, step=0.01),
    }
    outputs = [Output("CONDITIONING")]

    def run(self, conditioning, clip_vision_output, strength, noise_augmentation):
        if strength == 0:
            return (conditioning,)
        item = {"clip_vision_output": clip_vision_output, "strength": strength,
                "noise_augmentation": noise_augmentation}
        return ([[cond, {**meta, "unclip_conditioning": [*meta.get("unclip_conditioning", []), item]}]
                 for cond, meta in conditioning],)


class unCLIPCheckpointLoader(Node):
    """Loads an SD 2.1 unCLIP checkpoint: the model, its text encoder, VAE and CLIP image encoder."""

    category = "loaders"
    display_name = "unCLIP Checkpoint Loader"
    model_inputs = {"ckpt_name": "checkpoints"}
    inputs = {"ckpt_name": Combo(choices=checkpoint_choices)}
    outputs = [Output("MODEL"), Output("CLIP"), Output("VAE"), Output("CLIP_VISION")]

    @classmethod
    def fingerprint(cls, ckpt_name, **_):
        from nodes.loaders import _checkpoint_stamp

        return _checkpoint_stamp(ckpt_name)

    def run(self, ckpt_name):
        from nodeflow.models.clip_vision import load_clip_vision

        path = checkpoint_path(ckpt_name)
        model, clip, vae = _load(path)
        return model, clip, vae, load_clip_vision(path)
