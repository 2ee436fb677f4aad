"""ControlNets and T2I-Adapters: loading them from models/controlnet (and models/t2i_adapter)
and applying them, with a hint image, to conditionings; the Canny preprocessor."""

from __future__ import annotations

from nodeflow import Combo, Float, Node, Output, Socket
from nodes.loaders import choices_of, model_path_of, stamp_of

CONTROLNET_KINDS = ("controlnet", "t2i_adapter")


def _load(name: str, model=None):
    from nodeflow.models.controlnet import load_control_model

    return load_control_model(model_path_of(CONTROLNET_KINDS, name), model)


class LoadControlNet(Node):
    """Loads a ControlNet (original single-file, diffusers or diff layout) or a T2I-Adapter
    (full, light, SDXL) from models/controlnet or models/t2i_adapter."""

    category = "loaders"
    display_name = "LoadControlNet"  # its ComfyUI twin keeps ComfyUI's title
    aliases = ("ControlNetLoader",)
    alias_display_names = {"ControlNetLoader": "Load ControlNet Model"}
    model_inputs = {"control_net_name": "controlnet"}
    inputs = {"control_net_name": Combo(choices=choices_of(*CONTROLNET_KINDS))}
    outputs = [Output("CONTROL_NET")]

    @classmethod
    def fingerprint(cls, control_net_name, **_):
        return stamp_of(CONTROLNET_KINDS, control_net_name)

    def run(self, control_net_name):
        return (_load(control_net_name),)


class LoadDiffControlNet(LoadControlNet):
    """Loads a "diff" ControlNet, stored as differences from the weights of ``model``'s UNet
    (which are added at load); an ordinary ControlNet file loads as with LoadControlNet."""

    display_name = "LoadDiffControlNet"  # its ComfyUI twin keeps ComfyUI's title
    aliases = ("DiffControlNetLoader",)
    alias_display_names = {"DiffControlNetLoader": "Load ControlNet Model (diff)"}
    inputs = {"model": Socket("MODEL"), "control_net_name": LoadControlNet.inputs["control_net_name"]}

    def run(self, model, control_net_name):
        return (_load(control_net_name, model),)


def _hint(image):
    """IMAGE (B, H, W, C) -> the hint (B, C, H, W) ComfyUI keeps."""
    return image.movedim(-1, 1)


class ControlNetApply(Node):
    """Applies a ControlNet to one conditioning over the whole schedule (ComfyUI's older node;
    the control also reaches the negative side's plain entries, as there)."""

    category = "conditioning/controlnet"
    display_name = "Apply ControlNet (OLD)"
    deprecated = True
    inputs = {
        "conditioning": Socket("CONDITIONING"),
        "control_net": Socket("CONTROL_NET"),
        "image": Socket("IMAGE"),
        "strength": Float(default=1.0, min=0.0, max=10.0, step=0.01),
    }
    outputs = [Output("CONDITIONING")]

    def run(self, conditioning, control_net, image, strength):
        from nodeflow.models.controlnet import ControlHint

        if strength == 0:
            return (conditioning,)
        hint = _hint(image)
        out = []
        for cond, meta in conditioning:
            control = ControlHint(control_net, hint, strength, previous=meta.get("control"))
            out.append([cond, {**meta, "control": control, "control_apply_to_uncond": True}])
        return (out,)


class ApplyControlNet(Node):
    """Applies a ControlNet or T2I-Adapter, with a hint image, to the positive and negative
    conditioning, between two fractions of the schedule. Several chain: their residuals add up.
    The hint is centre-cropped to the latent's aspect ratio and resized (nearest) to 8× its size."""

    category = "conditioning/controlnet"
    display_name = "ApplyControlNet"  # its ComfyUI twin keeps ComfyUI's title
    aliases = ("ControlNetApplyAdvanced",)
    alias_display_names = {"ControlNetApplyAdvanced": "Apply ControlNet"}
    inputs = {
        "positive": Socket("CONDITIONING"),
        "negative": Socket("CONDITIONING"),
        "control_net": Socket("CONTROL_NET"),
        "image": Socket("IMAGE"),
        "strength": Float(default=1.0, min=0.0, max=10.0, step=0.01),
        "start_percent": Float(default=0.0, min=0.0, max=1.0, step=0.001),
        "end_percent": Float(default=1.0, min=0.0, max=1.0, step=0.001),
    }
    optional = {"vae": Socket("VAE", tooltip="only ControlNets working on latents need it (none of SD 1.x/2.x/XL)")}
    outputs = [Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative")]

    def run(self, positive, negative, control_net, image, strength, start_percent, end_percent, vae=None):
        from nodeflow.models.controlnet import ControlHint

        if strength == 0:
            return positive, negative
        hint = _hint(image)
        made: dict[int, ControlHint] = {}        # one ControlHint per previous control, shared by both sides
        out = []
        for conditioning in (positive, negative):
            side = []
            for cond, meta in conditioning:
                previous = meta.get("control")
                key = id(previous)
                if key not in made:
                    made[key] = ControlHint(control_net, hint, strength, start_percent, end_percent, previous)
                side.append([cond, {**meta, "control": made[key], "control_apply_to_uncond": False}])
            out.append(side)
        return out[0], out[1]


class Canny(Node):
    """Canny edge detection, as ComfyUI's preprocessor (kornia's algorithm: 5×5 Gaussian blur,
    Sobel gradients, non-maximum suppression, hysteresis between the two thresholds)."""

    category = "image/preprocessors"
    inputs = {
        "image": Socket("IMAGE"),
        "low_threshold": Float(default=0.4, min=0.01, max=0.99, step=0.01),
        "high_threshold": Float(default=0.8, min=0.01, max=0.99, step=0.01),
    }
    outputs = [Output("IMAGE")]

    @classmethod
    def validate_inputs(cls, low_threshold=None, high_threshold=None):
        if low_threshold is not None and high_threshold is not None and low_threshold > high_threshold:
            return [f"low_threshold {low_threshold} is above high_threshold {high_threshold}"]
        return None

    def run(self, image, low_threshold, high_threshold):
        from nodeflow.models.canny import canny

        edges = canny(image.movedim(-1, 1)[:, :3], low_threshold, high_threshold)       # (B, 1, H, W)
        return (edges.repeat(1, 3, 1, 1).movedim(1, -1).float(),)
