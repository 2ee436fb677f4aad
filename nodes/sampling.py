"""Latents and samplers: EmptyLatent, Sample (KSampler) and SampleAdvanced (KSamplerAdvanced)."""

from __future__ import annotations

from nodeflow import Combo, Float, Int, Node, Output, Socket
from nodeflow.spec import MAX_SEED

MAX_RESOLUTION = 16384


def _sampler_names():
    from nodeflow.sampling import SAMPLER_NAMES

    return SAMPLER_NAMES


def _scheduler_names():
    from nodeflow.sampling import SCHEDULER_NAMES

    return SCHEDULER_NAMES


class EmptyLatent(Node):
    """A batch of empty latents to sample into (``width`` × ``height`` pixels). Sizes that
    are not multiples of 8 are accepted, as in ComfyUI, and rounded down (width // 8 latent
    columns)."""

    category = "latent"
    display_name = "EmptyLatent"
    aliases = ("EmptyLatentImage",)
    alias_display_names = {"EmptyLatentImage": "Empty Latent Image"}
    inputs = {
        "width": Int(default=512, min=16, max=MAX_RESOLUTION, step=8),
        "height": Int(default=512, min=16, max=MAX_RESOLUTION, step=8),
        "batch_size": Int(default=1, min=1, max=4096),
    }
    outputs = [Output("LATENT")]

    def run(self, width, height, batch_size):
        import torch

        return ({"samples": torch.zeros(batch_size, 4, height // 8, width // 8)},)


class _Sampling:
    """What both sampler nodes share: running ``nodeflow.sampling.ksampler`` with progress
    and live previews reported to the engine."""

    context = None

    def _callback(self, model):
        from nodeflow.sampling import latent_to_rgb_preview

        family = getattr(model, "family", "sd1")
        family = "sdxl" if family.startswith("sdxl") else "sd2" if family.startswith("sd2") else "sd1"

        def callback(step, total, x, denoised):
            try:
                preview = latent_to_rgb_preview(denoised[:1], family=family)[0]
            except (ValueError, RuntimeError):  # a preview is a nicety: never fail the run for it
                preview = None
            self.context.progress(step, total, preview)

        return callback


class Sample(_Sampling, Node):
    """Denoises a latent with a model and a positive and negative conditioning
    (classifier-free guidance). ``denoise`` < 1 keeps part of the input (img2img)."""

    category = "sampling"
    display_name = "Sample"
    aliases = ("KSampler",)
    alias_display_names = {"KSampler": "KSampler"}
    inputs = {
        "model": Socket("MODEL"),
        "seed": Int(default=0, min=0, max=MAX_SEED, control_after_generate=True,
                    tooltip="the noise seed: the same seed gives the same image"),
        "steps": Int(default=20, min=1, max=10000),
        "cfg": Float(default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        "sampler_name": Combo(choices=_sampler_names),
        "scheduler": Combo(choices=_scheduler_names),
        "positive": Socket("CONDITIONING"),
        "negative": Socket("CONDITIONING"),
        "latent_image": Socket("LATENT"),
        "denoise": Float(default=1.0, min=0.0, max=1.0, step=0.01),
    }
    outputs = [Output("LATENT")]

    def run(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise):
        from nodeflow.sampling import ksampler

        out = ksampler(model, latent_image, positive, negative, seed=seed, steps=steps, cfg=cfg,
                       sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
                       callback=self._callback(model))
        return (out,)


class SampleAdvanced(_Sampling, Node):
    """KSampler with control over noise and the step range: run steps ``start_at_step`` to
    ``end_at_step`` of a ``steps``-step schedule, optionally returning the leftover noise
    (for two-stage workflows such as SDXL base + refiner)."""

    category = "sampling"
    display_name = "SampleAdvanced"
    aliases = ("KSamplerAdvanced",)
    alias_display_names = {"KSamplerAdvanced": "KSampler (Advanced)"}
    inputs = {
        "model": Socket("MODEL"),
        "add_noise": Combo(choices=["enable", "disable"]),
        "noise_seed": Int(default=0, min=0, max=MAX_SEED, control_after_generate=True),
        "steps": Int(default=20, min=1, max=10000),
        "cfg": Float(default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        "sampler_name": Combo(choices=_sampler_names),
        "scheduler": Combo(choices=_scheduler_names),
        "positive": Socket("CONDITIONING"),
        "negative": Socket("CONDITIONING"),
        "latent_image": Socket("LATENT"),
        "start_at_step": Int(default=0, min=0, max=10000),
        "end_at_step": Int(default=10000, min=0, max=10000),
        "return_with_leftover_noise": Combo(choices=["disable", "enable"]),
    }
    outputs = [Output("LATENT")]

    def run(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
            latent_image, start_at_step, end_at_step, return_with_leftover_noise):
        from nodeflow.sampling import ksampler

        out = ksampler(model, latent_image, positive, negative, seed=noise_seed, steps=steps, cfg=cfg,
                       sampler_name=sampler_name, scheduler=scheduler, denoise=1.0,
                       add_noise=add_noise == "enable", start_at_step=start_at_step, end_at_step=end_at_step,
                       return_with_leftover_noise=return_with_leftover_noise == "enable",
                       callback=self._callback(model))
        return (out,)
