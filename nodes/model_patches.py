"""Patches on a MODEL handle that change how it is sampled (ComfyUI's "advanced/model" and
"model_patches" nodes: ModelSamplingDiscrete, FreeU, RescaleCFG, PAG, SAG, Perp-Neg). Each
returns a patched copy; the input handle is never changed. The guidance patches live in the
handle's ``model_patches`` (``nodeflow.models.model_patches``).

A patch lives in attributes of the copy (``prediction_type``, ``alphas_cumprod``,
``_nodeflow_schedule``), so a later copy (a LoRA applied after it) keeps it only if the
handle's ``clone()`` copies those attributes too.
"""

from __future__ import annotations

import copy

from nodeflow import Bool, Combo, Float, Node, Output, Socket

SAMPLING_TYPES = ["eps", "v_prediction", "lcm", "x0", "img_to_img"]


def copy_model(model):
    """A handle that shares ``model``'s weights and carries its own settings and patches."""
    if hasattr(model, "clone"):
        return model.clone()
    other = copy.copy(model)
    if isinstance(getattr(other, "patches", None), dict):
        other.patches = dict(other.patches)
    return other


class ModelSamplingDiscrete(Node):
    """Sets how a model's output is read and which noise schedule it samples on — the way
    ComfyUI workflows force v-prediction on a model the loader took for ε. ``eps``: the model
    predicts the noise; ``v_prediction``: v = α·ε − σ·x₀ (SD 2.x 768, some fine-tunes);
    ``lcm``: Latent Consistency Model (with an LCM LoRA; pair it with the ``lcm`` sampler);
    ``x0``: the model predicts the clean latent. ``zsnr`` rescales SD's schedule to zero
    terminal SNR (for models trained that way; σ_max becomes about 4500). The schedule is
    rebuilt from SD's scaled-linear one, replacing any earlier sampling patch."""

    category = "advanced/model"
    inputs = {
        "model": Socket("MODEL"),
        "sampling": Combo(choices=SAMPLING_TYPES),
        "zsnr": Bool(default=False, tooltip="rescale the noise schedule to zero terminal SNR"),
    }
    outputs = [Output("MODEL")]

    def run(self, model, sampling, zsnr):
        from nodeflow.sampling.model_sampling import make_schedule, scaled_linear_alphas_cumprod, zero_terminal_snr

        if sampling == "img_to_img":  # offered for ComfyUI's widget contract; its model family is not loaded
            raise ValueError("ModelSamplingDiscrete: sampling 'img_to_img' is not supported by nodeflow yet; "
                             "use eps, v_prediction, lcm or x0")
        alphas_cumprod = scaled_linear_alphas_cumprod()
        if zsnr:
            alphas_cumprod = zero_terminal_snr(alphas_cumprod)
        patched = copy_model(model)
        patched.alphas_cumprod = alphas_cumprod.float()
        if sampling in ("eps", "v_prediction"):
            patched.prediction_type = "v" if sampling == "v_prediction" else "eps"
        # Every sampler, scheduler and the CFG denoiser read the schedule through
        # DiscreteSchedule.from_model, which takes this one when the handle carries it.
        patched._nodeflow_schedule = make_schedule(sampling, alphas_cumprod)
        return (patched,)


def _patched(model, build):
    """A clone of ``model`` whose model patches ``build(patches)`` extended."""
    if not hasattr(model, "model_patches"):
        raise ValueError(f"this MODEL ({type(model).__name__}) takes no model patches")
    clone = copy_model(model)
    build(clone.model_patches)
    return (clone,)


def _model_channels(model, node: str) -> int:
    from nodeflow.sampling import handle

    return handle.unet(model, node).config.model_channels


class FreeU(Node):
    """FreeU: amplifies the UNet's backbone features and damps the low frequencies of its skip
    connections in the two deepest output levels (b: backbone factors, s: skip factors)."""

    category = "model_patches/unet"
    inputs = {
        "model": Socket("MODEL"),
        "b1": Float(default=1.1, min=0.0, max=10.0, step=0.01),
        "b2": Float(default=1.2, min=0.0, max=10.0, step=0.01),
        "s1": Float(default=0.9, min=0.0, max=10.0, step=0.01),
        "s2": Float(default=0.2, min=0.0, max=10.0, step=0.01),
    }
    outputs = [Output("MODEL")]
    version = 1

    def run(self, model, b1, b2, s1, s2):
        from nodeflow.models.freeu import freeu_patch

        patch = freeu_patch(_model_channels(model, type(self).__name__), b1, b2, s1, s2, self.version)
        return _patched(model, lambda p: p.add_block_patch("output_block", patch))


class FreeU_V2(FreeU):
    """FreeU v2: the backbone factor is weighted by each image's normalised mean feature map."""

    inputs = {
        "model": Socket("MODEL"),
        "b1": Float(default=1.3, min=0.0, max=10.0, step=0.01),
        "b2": Float(default=1.4, min=0.0, max=10.0, step=0.01),
        "s1": Float(default=0.9, min=0.0, max=10.0, step=0.01),
        "s2": Float(default=0.2, min=0.0, max=10.0, step=0.01),
    }
    version = 2


class RescaleCFG(Node):
    """Rescales classifier-free guidance towards the positive prediction's spread (in v-space),
    against the over-exposure of high cfg with zero-terminal-SNR and v models."""

    category = "advanced/model"
    inputs = {"model": Socket("MODEL"), "multiplier": Float(default=0.7, min=0.0, max=1.0, step=0.01)}
    outputs = [Output("MODEL")]

    def run(self, model, multiplier):
        from nodeflow.sampling.cfg_patches import rescale_cfg

        return _patched(model, lambda p: p.set_cfg_function(rescale_cfg(multiplier)))


class PerturbedAttentionGuidance(Node):
    """Perturbed-Attention Guidance: pushes the result away from a prediction whose middle-block
    self-attention is replaced by the identity (one more model call per step)."""

    category = "model_patches/unet"
    inputs = {"model": Socket("MODEL"), "scale": Float(default=3.0, min=0.0, max=100.0, step=0.01, round=0.01)}
    outputs = [Output("MODEL")]

    def run(self, model, scale):
        from nodeflow.sampling.cfg_patches import perturbed_attention

        return _patched(model, lambda p: p.add_post_cfg_function(perturbed_attention(scale)))


class SelfAttentionGuidance(Node):
    """Self-Attention Guidance: blurs the negative prediction where the middle block attends,
    and guides away from the model's answer to that blurred input."""

    category = "_for_testing"
    display_name = "Self-Attention Guidance"
    inputs = {
        "model": Socket("MODEL"),
        "scale": Float(default=0.5, min=-2.0, max=5.0, step=0.01),
        "blur_sigma": Float(default=2.0, min=0.0, max=10.0, step=0.1),
    }
    outputs = [Output("MODEL")]

    def run(self, model, scale, blur_sigma):
        from nodeflow.sampling.cfg_patches import self_attention_guidance

        return _patched(model, lambda p: _merge_into(p, self_attention_guidance(scale, blur_sigma)))


class PerpNeg(Node):
    """Perp-Neg: the negative prompt acts only through its part perpendicular to the positive,
    both measured from an empty prompt's prediction (one more model call per step)."""

    category = "_for_testing"
    display_name = "Perp-Neg (DEPRECATED by PerpNegGuider)"
    deprecated = True
    inputs = {
        "model": Socket("MODEL"),
        "empty_conditioning": Socket("CONDITIONING"),
        "neg_scale": Float(default=1.0, min=0.0, max=100.0, step=0.01),
    }
    outputs = [Output("MODEL")]

    def run(self, model, empty_conditioning, neg_scale):
        from nodeflow.sampling.cfg_patches import perp_neg_cfg

        return _patched(model, lambda p: p.set_cfg_function(perp_neg_cfg(empty_conditioning, neg_scale)))


def _merge_into(patches, extra) -> None:
    merged = patches.merged(extra)
    for name, value in vars(merged).items():
        setattr(patches, name, value)
