"""ComfyUI's custom sampling nodes: the KSampler taken apart into a SAMPLER (which solver,
with its options), SIGMAS (the noise schedule), NOISE (the initial noise) and a GUIDER (the
model and how its conditionings combine), put together again by SamplerCustom or
SamplerCustomAdvanced. SDXL-Turbo's workflow, for one, is SamplerCustom + SDTurboScheduler +
KSamplerSelect.

SIGMAS values are float32 CPU tensors σ₀ > … > σ_N, usually ending in 0. The value types of
the other sockets live in ``nodeflow.sampling.custom``.
"""

from __future__ import annotations

from nodeflow import Bool, Combo, Float, Int, Node, Output, Socket
from nodeflow.spec import MAX_SEED
from nodes.sampling import _sampler_names, _Sampling, _scheduler_names

SIGMA_MAX, SIGMA_MIN = 14.614642, 0.0291675        # SD's scaled-linear schedule, for the explicit schedulers


def _sigma_inputs(rho: float | None = None) -> dict:
    inputs = {
        "steps": Int(default=20, min=1, max=10000),
        "sigma_max": Float(default=SIGMA_MAX, min=0.0, max=5000.0, step=0.01),
        "sigma_min": Float(default=SIGMA_MIN, min=0.0, max=5000.0, step=0.01),
    }
    if rho is not None:
        inputs["rho"] = Float(default=rho, min=0.0, max=100.0, step=0.01)
    return inputs


def _check_positive_sigmas(sigma_max=None, sigma_min=None, **_):
    """Schedules uniform in log σ need both ends above 0."""
    bad = [f"{name} must be above 0 for a schedule in log σ, got {value}"
           for name, value in (("sigma_max", sigma_max), ("sigma_min", sigma_min))
           if isinstance(value, (int, float)) and value <= 0]
    return bad or None


# -- SIGMAS: schedulers ------------------------------------------------------------------------------

class BasicScheduler(Node):
    """The σ schedule of one of the KSampler's schedulers for a model. ``denoise`` < 1 gives
    the last ``steps`` steps of a ``steps / denoise``-step schedule (img2img)."""

    category = "sampling/custom_sampling/schedulers"
    inputs = {
        "model": Socket("MODEL"),
        "scheduler": Combo(choices=_scheduler_names),
        "steps": Int(default=20, min=1, max=10000),
        "denoise": Float(default=1.0, min=0.0, max=1.0, step=0.01),
    }
    outputs = [Output("SIGMAS")]

    def run(self, model, scheduler, steps, denoise):
        import torch

        from nodeflow.sampling import calculate_sigmas

        total = steps
        if denoise < 1.0:
            if denoise <= 0.0:
                return (torch.zeros(0),)
            total = int(steps / denoise)
        return (calculate_sigmas(model, scheduler, total).cpu()[-(steps + 1):],)


class KarrasScheduler(Node):
    """Karras et al. 2022 (eq. 5): σ uniform in σ^(1/ρ) from σ_max to σ_min, then 0."""

    category = "sampling/custom_sampling/schedulers"
    inputs = _sigma_inputs(rho=7.0)
    outputs = [Output("SIGMAS")]

    def run(self, steps, sigma_max, sigma_min, rho):
        from nodeflow.sampling.schedules import karras_sigmas

        return (karras_sigmas(steps, sigma_min, sigma_max, rho),)


class ExponentialScheduler(Node):
    """σ uniform in log σ from σ_max to σ_min, then 0."""

    category = "sampling/custom_sampling/schedulers"
    inputs = _sigma_inputs()
    outputs = [Output("SIGMAS")]

    @classmethod
    def validate_inputs(cls, **literals):
        return _check_positive_sigmas(**literals)

    def run(self, steps, sigma_max, sigma_min):
        from nodeflow.sampling.schedules import exponential_sigmas

        return (exponential_sigmas(steps, sigma_min, sigma_max),)


class PolyexponentialScheduler(Node):
    """log σ moves from log σ_max to log σ_min along a ramp raised to the power ρ:
    log σ_i = log σ_min + (1 − i/(n−1))^ρ · (log σ_max − log σ_min), then 0. ρ = 1 is the
    exponential schedule; a larger ρ spends more steps at low noise."""

    category = "sampling/custom_sampling/schedulers"
    inputs = _sigma_inputs(rho=1.0)
    outputs = [Output("SIGMAS")]

    @classmethod
    def validate_inputs(cls, **literals):
        return _check_positive_sigmas(**literals)

    def run(self, steps, sigma_max, sigma_min, rho):
        import math

        import torch

        ramp = torch.linspace(1, 0, steps) ** rho
        sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
        return (torch.cat([sigmas, sigmas.new_zeros(1)]),)


class SDTurboScheduler(Node):
    """SD-Turbo / SDXL-Turbo's schedule: the model's σ at timesteps 999, 899, …, 99 — the
    first ``steps`` of them, starting ``10 − int(10 · denoise)`` places in — then 0."""

    category = "sampling/custom_sampling/schedulers"
    inputs = {
        "model": Socket("MODEL"),
        "steps": Int(default=1, min=1, max=10),
        "denoise": Float(default=1.0, min=0.0, max=1.0, step=0.01),
    }
    outputs = [Output("SIGMAS")]

    def run(self, model, steps, denoise):
        import torch

        from nodeflow.sampling import DiscreteSchedule

        start = 10 - int(10 * denoise)
        timesteps = torch.arange(999, 0, -100, dtype=torch.float32)[start:start + steps]
        sigmas = DiscreteSchedule.from_model(model).sigma(timesteps).float()
        return (torch.cat([sigmas, sigmas.new_zeros(1)]),)


# -- SIGMAS: cutting and turning -----------------------------------------------------------------------

class SplitSigmas(Node):
    """Cuts a schedule at index ``step``: the first part runs σ₀ … σ_step, the second
    σ_step … σ_N (the cut value is in both, so the second continues where the first ends)."""

    category = "sampling/custom_sampling/sigmas"
    inputs = {"sigmas": Socket("SIGMAS"), "step": Int(default=0, min=0, max=10000)}
    outputs = [Output("SIGMAS", "high_sigmas"), Output("SIGMAS", "low_sigmas")]

    def run(self, sigmas, step):
        return sigmas[:step + 1], sigmas[step:]


class SplitSigmasDenoise(Node):
    """Cuts a schedule so that the second part holds the last ``round(steps · denoise)``
    steps (as ``denoise`` does for img2img) and the first part the ones before, sharing the
    cut value. Deliberate difference from ComfyUI: with ``denoise`` 0 the first part is the
    whole schedule (ComfyUI's slice ``[:-0]`` gives it empty)."""

    category = "sampling/custom_sampling/sigmas"
    inputs = {"sigmas": Socket("SIGMAS"), "denoise": Float(default=1.0, min=0.0, max=1.0, step=0.01)}
    outputs = [Output("SIGMAS", "high_sigmas"), Output("SIGMAS", "low_sigmas")]

    def run(self, sigmas, denoise):
        steps = max(sigmas.shape[-1] - 1, 0)
        tail = round(steps * denoise)
        return sigmas[:sigmas.shape[-1] - tail], sigmas[-(tail + 1):]


class FlipSigmas(Node):
    """Reverses a schedule (σ rising: for inverting a sampler, from image to noise); a first
    value of 0 becomes 0.0001, since samplers divide by σ."""

    category = "sampling/custom_sampling/sigmas"
    inputs = {"sigmas": Socket("SIGMAS")}
    outputs = [Output("SIGMAS")]

    def run(self, sigmas):
        if len(sigmas) == 0:
            return (sigmas,)
        flipped = sigmas.flip(0).clone()
        if flipped[0] == 0:
            flipped[0] = 0.0001
        return (flipped,)


# -- SAMPLER ----------------------------------------------------------------------------------------------

class KSamplerSelect(Node):
    """One of the KSampler's samplers, by name, with its default options."""

    category = "sampling/custom_sampling/samplers"
    inputs = {"sampler_name": Combo(choices=_sampler_names)}
    outputs = [Output("SAMPLER")]

    def run(self, sampler_name):
        from nodeflow.sampling.custom import SamplerChoice

        return (SamplerChoice(sampler_name),)


class SamplerEulerAncestral(Node):
    """Euler ancestral with its options: ``eta`` scales the fresh noise added each step
    (0 = plain Euler), ``s_noise`` multiplies that noise."""

    category = "sampling/custom_sampling/samplers"
    inputs = {"eta": Float(default=1.0, min=0.0, max=100.0, step=0.01),
              "s_noise": Float(default=1.0, min=0.0, max=100.0, step=0.01)}
    outputs = [Output("SAMPLER")]

    def run(self, eta, s_noise):
        from nodeflow.sampling.custom import SamplerChoice

        return (SamplerChoice("euler_ancestral", {"eta": eta, "s_noise": s_noise}),)


class SamplerDPMPP_2M_SDE(Node):
    """DPM-Solver++(2M) SDE with its options: ``solver_type`` (midpoint or heun correction),
    ``eta`` (0 = the deterministic 2M solver), ``s_noise``, and where its Brownian noise is
    drawn (``cpu`` or ``gpu``: the model's device)."""

    category = "sampling/custom_sampling/samplers"
    inputs = {"solver_type": Combo(choices=["midpoint", "heun"]),
              "eta": Float(default=1.0, min=0.0, max=100.0, step=0.01),
              "s_noise": Float(default=1.0, min=0.0, max=100.0, step=0.01),
              "noise_device": Combo(choices=["gpu", "cpu"])}
    outputs = [Output("SAMPLER")]

    def run(self, solver_type, eta, s_noise, noise_device):
        from nodeflow.sampling.custom import SamplerChoice

        name = "dpmpp_2m_sde" if noise_device == "cpu" else "dpmpp_2m_sde_gpu"
        return (SamplerChoice(name, {"eta": eta, "s_noise": s_noise, "solver_type": solver_type}),)


class SamplerDPMPP_SDE(Node):
    """DPM-Solver++ SDE with its options: ``eta``, ``s_noise``, ``r`` (where the midpoint
    step lands, as a fraction of the step in log σ) and the noise device."""

    category = "sampling/custom_sampling/samplers"
    inputs = {"eta": Float(default=1.0, min=0.0, max=100.0, step=0.01),
              "s_noise": Float(default=1.0, min=0.0, max=100.0, step=0.01),
              "r": Float(default=0.5, min=0.0, max=100.0, step=0.01),
              "noise_device": Combo(choices=["gpu", "cpu"])}
    outputs = [Output("SAMPLER")]

    def run(self, eta, s_noise, r, noise_device):
        from nodeflow.sampling.custom import SamplerChoice

        name = "dpmpp_sde" if noise_device == "cpu" else "dpmpp_sde_gpu"
        return (SamplerChoice(name, {"eta": eta, "s_noise": s_noise, "r": r}),)


# -- NOISE --------------------------------------------------------------------------------------------------

class RandomNoise(Node):
    """Initial noise from a seed: the KSampler's noise for the same seed. The seed also
    drives the per-step noise of ancestral and SDE samplers."""

    category = "sampling/custom_sampling/noise"
    inputs = {"noise_seed": Int(default=0, min=0, max=MAX_SEED, control_after_generate=True)}
    outputs = [Output("NOISE")]

    def run(self, noise_seed):
        from nodeflow.sampling.custom import RandomNoise as Noise

        return (Noise(noise_seed),)


class DisableNoise(Node):
    """No initial noise: the latent is sampled as it is (one that still holds noise, such as
    a first pass returned with its leftover noise)."""

    category = "sampling/custom_sampling/noise"
    outputs = [Output("NOISE")]

    def run(self):
        from nodeflow.sampling.custom import NoNoise

        return (NoNoise(),)


# -- GUIDER -------------------------------------------------------------------------------------------------

class CFGGuider(Node):
    """Classifier-free guidance between a positive and a negative conditioning, as the
    KSampler does it."""

    category = "sampling/custom_sampling/guiders"
    inputs = {
        "model": Socket("MODEL"),
        "positive": Socket("CONDITIONING"),
        "negative": Socket("CONDITIONING"),
        "cfg": Float(default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
    }
    outputs = [Output("GUIDER")]

    def run(self, model, positive, negative, cfg):
        from nodeflow.sampling.custom import Guider

        return (Guider(model, "cfg", (positive, negative), cfg),)


class PerpNegGuider(Node):
    """Perp-Neg guidance: the negative counts only through its part perpendicular to the
    positive, both measured from the empty conditioning's prediction (ComfyUI's PerpNegGuider)."""

    category = "_for_testing"
    inputs = {
        "model": Socket("MODEL"),
        "positive": Socket("CONDITIONING"),
        "negative": Socket("CONDITIONING"),
        "empty_conditioning": Socket("CONDITIONING"),
        "cfg": Float(default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        "neg_scale": Float(default=1.0, min=0.0, max=100.0, step=0.01),
    }
    outputs = [Output("GUIDER")]

    def run(self, model, positive, negative, empty_conditioning, cfg, neg_scale):
        from nodeflow.sampling.cfg_patches import perp_neg_cfg
        from nodeflow.sampling.custom import Guider
        from nodes.model_patches import copy_model

        patched = copy_model(model)
        patched.model_patches.set_cfg_function(perp_neg_cfg(empty_conditioning, neg_scale))
        return (Guider(patched, "cfg", (positive, negative), cfg),)


class BasicGuider(Node):
    """One conditioning, no guidance (for guidance-distilled models, or cfg 1)."""

    category = "sampling/custom_sampling/guiders"
    inputs = {"model": Socket("MODEL"), "conditioning": Socket("CONDITIONING")}
    outputs = [Output("GUIDER")]

    def run(self, model, conditioning):
        from nodeflow.sampling.custom import Guider

        return (Guider(model, "basic", (conditioning,)),)


class DualCFGGuider(Node):
    """Guidance with two positive conditionings: D = D_neg + cfg_cond2_negative·(D_cond2 −
    D_neg) + cfg_conds·(D_cond1 − D_cond2). ComfyUI's ``nested`` style is not implemented yet:
    it fails the node by name."""

    category = "sampling/custom_sampling/guiders"
    inputs = {
        "model": Socket("MODEL"),
        "cond1": Socket("CONDITIONING"),
        "cond2": Socket("CONDITIONING"),
        "negative": Socket("CONDITIONING"),
        "cfg_conds": Float(default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        "cfg_cond2_negative": Float(default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        "style": Combo(choices=["regular", "nested"]),
    }
    outputs = [Output("GUIDER")]

    def run(self, model, cond1, cond2, negative, cfg_conds, cfg_cond2_negative, style):
        from nodeflow.sampling.custom import Guider

        if style != "regular":
            raise ValueError(f"DualCFGGuider: style {style!r} is not supported by nodeflow yet; use 'regular'")

        return (Guider(model, "dual", (cond1, cond2, negative), (cfg_conds, cfg_cond2_negative)),)


# -- sampling -----------------------------------------------------------------------------------------------

class SamplerCustom(_Sampling, Node):
    """Samples a latent with a model, CFG between two conditionings, a SAMPLER and a SIGMAS
    schedule. ``add_noise`` off samples the latent as it is (the seed then drives only the
    per-step noise). Outputs the sampled latent and the model's last estimate of the clean
    latent (``denoised_output``)."""

    category = "sampling/custom_sampling"
    inputs = {
        "model": Socket("MODEL"),
        "add_noise": Bool(default=True),
        "noise_seed": Int(default=0, min=0, max=MAX_SEED, control_after_generate=True),
        "cfg": Float(default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        "positive": Socket("CONDITIONING"),
        "negative": Socket("CONDITIONING"),
        "sampler": Socket("SAMPLER"),
        "sigmas": Socket("SIGMAS"),
        "latent_image": Socket("LATENT"),
    }
    outputs = [Output("LATENT", "output"), Output("LATENT", "denoised_output")]

    def run(self, model, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas, latent_image):
        from nodeflow.sampling.custom import Guider, NoNoise, sample_custom
        from nodeflow.sampling.custom import RandomNoise as Noise

        noise = Noise(noise_seed) if add_noise else NoNoise(noise_seed)
        return sample_custom(Guider(model, "cfg", (positive, negative), cfg), sampler, sigmas, latent_image, noise,
                             callback=self._callback(model))


class SamplerCustomAdvanced(_Sampling, Node):
    """Samples a latent from a NOISE, a GUIDER (the model and its conditionings), a SAMPLER
    and a SIGMAS schedule. Outputs the sampled latent and the model's last estimate of the
    clean latent (``denoised_output``)."""

    category = "sampling/custom_sampling"
    inputs = {
        "noise": Socket("NOISE"),
        "guider": Socket("GUIDER"),
        "sampler": Socket("SAMPLER"),
        "sigmas": Socket("SIGMAS"),
        "latent_image": Socket("LATENT"),
    }
    outputs = [Output("LATENT", "output"), Output("LATENT", "denoised_output")]

    def run(self, noise, guider, sampler, sigmas, latent_image):
        from nodeflow.sampling.custom import sample_custom

        return sample_custom(guider, sampler, sigmas, latent_image, noise, callback=self._callback(guider.model))
