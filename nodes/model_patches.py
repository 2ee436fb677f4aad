"""Patches on a MODEL handle that change how it is sampled (ComfyUI's "advanced/model"
nodes). Each returns a patched copy; the input handle is never changed.

A patch lives in attributes of the copy (``prediction_type``, ``alphas_cumprod``,
``_nodeflow_schedule``), so a later copy (a LoRA applied after it) keeps it only if the
handle's ``clone()`` copies those attributes too.
"""

from __future__ import annotations

import copy

from nodeflow import Bool, Combo, Node, Output, Socket

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
        from nodeflow.sampling.model_sampling import scaled_linear_alphas_cumprod
        from nodes._schedules import make_schedule, zero_terminal_snr

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
