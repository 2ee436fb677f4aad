"""Upscaling in pixel space with ESRGAN-family models (RRDBNet: ESRGAN, Real-ESRGAN; SRVGGNetCompact),
as ComfyUI's UpscaleModelLoader + ImageUpscaleWithModel do it."""

from __future__ import annotations

import os

from nodeflow import Combo, Node, Output, Socket
from nodeflow.folders import folders

KIND = "upscale_models"


class LoadUpscaleModel(Node):
    """Loads an ESRGAN-family upscale model (.pth or .safetensors) from models/upscale_models: RRDBNet
    in the Real-ESRGAN or the original ESRGAN key layout (×1, ×2, ×4, ×8, with or without pixel-unshuffle)
    or Real-ESRGAN's compact SRVGGNetCompact. The architecture and the scale are read from the weights."""

    category = "loaders"
    display_name = "LoadUpscaleModel"
    aliases = ("UpscaleModelLoader",)
    alias_display_names = {"UpscaleModelLoader": "Load Upscale Model"}
    model_inputs = {"model_name": KIND}
    inputs = {"model_name": Combo(choices=lambda: folders().list_models(KIND),
                                  tooltip="a file in models/upscale_models")}
    outputs = [Output("UPSCALE_MODEL")]

    @classmethod
    def fingerprint(cls, model_name, **_):
        """The file's size and mtime, so that replacing it reloads it."""
        try:
            st = os.stat(folders().model_path(KIND, model_name))
        except (OSError, ValueError):
            return None                    # the run reports the missing file with the list of what exists
        return (st.st_size, st.st_mtime_ns)

    def run(self, model_name):
        from nodeflow.models.esrgan import load_upscale_model

        return (load_upscale_model(folders().model_path(KIND, model_name)),)


class UpscaleImageWithModel(Node):
    """Upscales images with an upscale model, by the model's own factor. Works in 512-pixel tiles
    overlapping by 32 and cross-faded (tiles are halved, down to 128, when the GPU runs out of memory),
    each image of the batch on its own; reports progress per tile."""

    category = "image/upscaling"
    display_name = "UpscaleImageWithModel"
    aliases = ("ImageUpscaleWithModel",)
    alias_display_names = {"ImageUpscaleWithModel": "Upscale Image (using Model)"}
    inputs = {"upscale_model": Socket("UPSCALE_MODEL"), "image": Socket("IMAGE")}
    outputs = [Output("IMAGE")]

    def run(self, upscale_model, image):
        self.context.check_interrupted()
        return (upscale_model.upscale(image, progress=self.context.progress),)
