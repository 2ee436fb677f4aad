"""``DiffusionModel``: the handle the sampler sees (a UNet plus its prediction type and schedule).

LATENT values between nodes are raw VAE latents; ``process_latent_in`` scales them into the
space the UNet was trained on (× 0.18215 for SD 1/2, × 0.13025 for SDXL) and
``process_latent_out`` scales back. ``apply_model`` runs one network evaluation: it moves the
UNet to the compute device through the model manager, casts the inputs, and returns the raw
output (ε or v, per ``prediction_type``) as float32 on the input's device. With
``compile_options`` (the CompileModel node) or ``--compile``/``--cuda-graphs`` it runs the UNet
through ``nodeflow.models.compiled``'s fast path.
"""

from __future__ import annotations

import copy

import torch

from nodeflow.models import compiled, devices, patching
from nodeflow.models.model_patches import ModelPatches
from nodeflow.models.unet import UNet, timestep_embedding

LATENT_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "sdxl_refiner": 0.13025}
SIZE_EMBED_DIM = 256            # SDXL embeds each size/crop number sinusoidally in 256 channels


def base_family(family: str) -> str:
    """"sd1_inpaint" -> "sd1", "sd2_v" -> "sd2", "sdxl_refiner" stays."""
    return family.replace("_inpaint", "").replace("_v", "")


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD's "scaled linear" schedule: β linear in sqrt from 0.00085 to 0.012; ᾱ_t = Π(1 - β), (1000,) float32."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class DiffusionModel:
    """A handle on a UNet. ``clone()`` shares the weights; each handle carries its own LoRA
    patches (``patches``) and model patches (``model_patches``: CFG functions, UNet block and
    attention patches; see ``nodeflow.models.model_patches``)."""

    def __init__(self, unet: UNet, *, family: str, prediction_type: str = "eps",
                 device: torch.device | None = None):
        if prediction_type not in ("eps", "v"):
            raise ValueError(f"prediction_type must be 'eps' or 'v', got {prediction_type!r}")
        self.unet = unet
        self.family = family                                    # e.g. "sd1", "sd1_inpaint", "sd2_v", "sdxl"
        self.prediction_type = prediction_type
        self.device = device or devices.get_device()
        self.alphas_cumprod = sd_alphas_cumprod()
        self.in_channels = unet.config.in_channels              # 4, or 9 for inpainting models
        self.latent_channels = unet.config.out_channels         # 4
        self.latent_scale_factor = LATENT_SCALE[base_family(family)]
        self.patches: patching.Patches = {}                     # weight patches (LoRA): {param: [(strength, patch)]}
        self.model_patches = ModelPatches()                     # sampling and forward patches (FreeU, PAG, ...)
        self.compile_options: compiled.CompileOptions | None = None   # the fast path (CompileModel)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def clone(self) -> DiffusionModel:
        """A handle on the same weights with its own copy of the patches and of every setting
        (prediction type, schedule, sampling patches), so patches applied in any order add up."""
        other = copy.copy(self)
        other.patches = {name: list(entries) for name, entries in self.patches.items()}
        other.model_patches = self.model_patches.copy()
        return other

    def process_latent_in(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.latent_scale_factor

    def process_latent_out(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.latent_scale_factor

    @torch.no_grad()
    def apply_model(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                    c_concat: torch.Tensor | None = None, control: dict | None = None,
                    extra_patches: ModelPatches | None = None, info: dict | None = None) -> torch.Tensor:
        """x (B, 4, h, w) scaled noisy latent; t (B,) timesteps 0..999; context (B, T, D); y (B, adm) for
        SDXL; c_concat (B, 5, h, w) (mask + masked latent) for inpainting models -> ε or v, float32.
        ``control``: ControlNet residuals; ``extra_patches`` join the handle's own for this call; ``info``
        starts the dict the patches see (e.g. "cond_or_uncond")."""
        out_device = x.device
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x.device, x.dtype)], dim=1)
        if x.shape[1] != self.in_channels:
            hint = " (an inpainting model needs c_concat: mask + masked-image latent)" if self.in_channels == 9 else ""
            raise ValueError(f"the {self.family} UNet takes {self.in_channels} input channels, got {x.shape[1]}{hint}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        devices.model_manager().load(self.unet, self.device)
        patching.sync(self.unet, self.patches)
        dev, dtype = self.device, self.dtype
        patches = self.model_patches.merged(extra_patches)
        options = {}
        # The samplers keep σ (so t) on the CPU: on CUDA a blocking copy would make the host wait for
        # the GPU at every step, and it could not queue the next step while this one runs (on MPS
        # non-blocking copies from the CPU are not safe)
        nb = dev.type == "cuda"
        if control is not None:
            options["control"] = {k: [None if r is None else r.to(dev, dtype, non_blocking=nb) for r in v]
                                  for k, v in control.items()}
        if patches.touches_unet:
            options["patches"], options["info"] = patches, dict(info or {})
        if patches.step_cache is not None:
            deep = patches.step_cache.plan(x, t, info, patches.touches_attention)
            if deep is not None:
                options["deep"] = deep
        forward = compiled.unet_forward(self)
        out = forward(x.to(dev, dtype, non_blocking=nb), t.to(dev, torch.float32, non_blocking=nb),
                      context.to(dev, dtype, non_blocking=nb),
                      None if y is None else y.to(dev, dtype, non_blocking=nb), **options)
        return out.to(out_device, torch.float32)

    def condition_kwargs(self, meta: dict, batch: int, width: int, height: int) -> dict:
        """Extra ``apply_model`` kwargs for one conditioning entry. SD 1/2: ``{}``; SD 2.1 unCLIP: ``y`` from
        the entry's ``unclip_conditioning`` (``nodeflow.models.unclip``; zeros without). SDXL: ``{"y": (batch, adm)}``
        = pooled text ⊕ embeddings of (height, width, crop_h, crop_w, target_height, target_width), the refiner
        (height, width, crop_h, crop_w, aesthetic_score); sizes default to the image's, crops to 0."""
        adm = self.unet.config.adm_in_channels
        if not adm:
            return {}
        unclip = meta.get("unclip_conditioning")
        if base_family(self.family) == "sd2":          # SD 2.1 unCLIP: y is the noised image embedding
            from nodeflow.models.unclip import unclip_vector

            y = unclip_vector(unclip, meta.get("seed", 0), 0.05, self.device) if unclip else torch.zeros(1, adm)
            if y.shape[1] != adm:
                raise ValueError(f"the unCLIP model takes image embeddings of width {adm // 2}, got "
                                 f"{y.shape[1] // 2}: use the CLIP vision model it was made for")
            return {"y": y.expand(batch, -1) if y.shape[0] == 1 else y}
        w, h = meta.get("width", width), meta.get("height", height)
        crop_w, crop_h = meta.get("crop_w", 0), meta.get("crop_h", 0)
        if base_family(self.family) == "sdxl_refiner":
            numbers = [h, w, crop_h, crop_w, meta.get("aesthetic_score", 6.0)]
        else:
            numbers = [h, w, crop_h, crop_w, meta.get("target_height", h), meta.get("target_width", w)]
        sizes = timestep_embedding(torch.tensor(numbers, dtype=torch.float32), SIZE_EMBED_DIM).reshape(1, -1)
        width_pooled = adm - sizes.shape[1]
        pooled = meta.get("pooled_output")
        if unclip:                                      # SDXL "revision": image embeddings as the pooled text
            from nodeflow.models.unclip import unclip_vector

            pooled = unclip_vector(unclip, meta.get("seed", 0), device=self.device)[:, :width_pooled]
        if pooled is None:
            pooled = torch.zeros(1, width_pooled)
        pooled = pooled.float().cpu().reshape(-1, pooled.shape[-1])
        if pooled.shape[-1] != width_pooled:
            raise ValueError(f"the {self.family} UNet expects a pooled text output of width {width_pooled}, "
                             f"got {pooled.shape[-1]}")
        pooled = pooled.expand(batch, -1) if pooled.shape[0] == 1 else pooled
        return {"y": torch.cat([pooled, sizes.expand(batch, -1)], dim=1)}
