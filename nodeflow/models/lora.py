"""LoRA: low-rank weight deltas, ΔW = (α / r) · up · down, read from the usual key layouts.

Layouts recognised, for the UNet and the text encoder(s):

- kohya: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, where
  the path is the diffusers name (SD 1.x/2.x) or the LDM name (SDXL); text encoders
  ``lora_te_…`` (one encoder), ``lora_te1_…`` / ``lora_te2_…`` (SDXL's CLIP-L / bigG);
- PEFT / diffusers: ``unet.<diffusers path>.lora_A.weight`` / ``.lora_B.weight``,
  ``text_encoder.…`` / ``text_encoder_2.…``; older ``….lora.down.weight`` / ``….lora.up.weight``
  and attention-processor names (``attn1.processor.to_q_lora.down.weight``);
- LDM: ``diffusion_model.<LDM path>.lora_down.weight`` …

Keys that match no weight of the model are counted and reported, never silently ignored:
a LoRA that matches nothing at all is an error (it is for another model family).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from nodeflow.models.files import CheckpointError, read_all
from nodeflow.models.patching import combine

log = logging.getLogger(__name__)

_PAIRS = (  # (down suffix, up suffix)
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
)


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One low-rank pair: up (out, r[, 1, 1]), down (r, in[, kh, kw]), and α."""

    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        up = self.up.to(device, torch.float32).flatten(1)        # (out, r)
        down = self.down.to(device, torch.float32).flatten(1)    # (r, in·kh·kw)
        scale = (self.alpha / self.rank) if self.alpha is not None else 1.0
        delta = (up @ down) * scale
        if delta.numel() != torch.Size(shape).numel():
            raise CheckpointError(f"LoRA weights of shape {tuple(self.up.shape)} x {tuple(self.down.shape)} do not fit "
                                  f"a parameter of shape {tuple(shape)}")
        return delta.reshape(shape).to(dtype)


def load_lora_file(path) -> dict[str, LoraWeights]:
    """A LoRA file as ``{base name: LoraWeights}`` (base name = the key without its suffix)."""
    sd = read_all(path)
    return parse_lora(sd, where=str(path))


def parse_lora(sd: dict[str, torch.Tensor], where: str = "LoRA") -> dict[str, LoraWeights]:
    out: dict[str, LoraWeights] = {}
    for key in sd:
        for down_suffix, up_suffix in _PAIRS:
            if key.endswith(down_suffix):
                base = key[: -len(down_suffix)]
                up = sd.get(base + up_suffix)
                if up is None:
                    raise CheckpointError(f"{where}: {key} has no matching {base + up_suffix}")
                alpha = sd.get(base + ".alpha")
                out[_normalise(base)] = LoraWeights(up, sd[key], float(alpha) if alpha is not None else None)
                break
    if not out:
        raise CheckpointError(f"{where} holds no LoRA weights (expected keys ending in "
                              ".lora_down.weight/.lora_up.weight or .lora_A.weight/.lora_B.weight)")
    return out


def _normalise(base: str) -> str:
    # diffusers' attention-processor names: "attn1.processor.to_q" -> "attn1.to_q"; "to_out_0" -> "to_out.0"
    base = base.replace(".processor.", ".")
    return re.sub(r"\.to_out$", ".to_out.0", base)


# -- which LoRA name patches which parameter ----------------------------------------------------------


def unet_targets(model) -> dict[str, str]:
    """LoRA base names -> the UNet parameter (LDM name) they patch, in every layout."""
    from nodeflow.models.diffusers_format import ldm_unet_to_diffusers

    params = dict(model.unet.named_parameters())
    by_ptr = {t.data_ptr(): name for name, t in params.items() if name.endswith(".weight")}
    names: dict[str, str] = {}
    try:
        renamed = ldm_unet_to_diffusers({k: v for k, v in params.items() if k.endswith(".weight")})
    except Exception:  # noqa: BLE001 - without the diffusers names only LDM-named LoRAs match
        renamed = {}
    for diff_name, tensor in renamed.items():
        ldm = by_ptr.get(tensor.data_ptr())
        if ldm is not None:
            stem = diff_name[: -len(".weight")]
            names["lora_unet_" + stem.replace(".", "_")] = ldm
            names["unet." + stem] = ldm
    for ldm in by_ptr.values():
        stem = ldm[: -len(".weight")]
        names["lora_unet_" + stem.replace(".", "_")] = ldm
        names["diffusion_model." + stem] = ldm
    return names


def clip_targets(clip) -> dict[str, tuple[str, str]]:
    """LoRA base names -> (tower name, parameter name) for each text tower."""
    towers = clip.towers
    single = len(towers) == 1
    prefixes = {  # tower -> (kohya prefix, diffusers prefix)
        "l": ("lora_te_", "text_encoder.") if single else ("lora_te1_", "text_encoder."),
        "h": ("lora_te_", "text_encoder."),
        "g": ("lora_te_", "text_encoder.") if single else ("lora_te2_", "text_encoder_2."),
    }
    names: dict[str, tuple[str, str]] = {}
    for tower in towers:
        kohya, diffusers = prefixes[tower.name]
        for pname, _ in tower.model.named_parameters():
            if not pname.endswith(".weight"):
                continue
            stem = pname[: -len(".weight")]
            canonical = re.sub(r"^transformer\.(text_model\.)?", "", stem)    # encoder.layers.0.self_attn.q_proj
            if canonical == stem:  # the projection, outside transformers' model
                continue
            names[kohya + "text_model_" + canonical.replace(".", "_")] = (tower.name, pname)
            names[diffusers + "text_model." + canonical] = (tower.name, pname)
    return names


def apply_lora(lora: dict[str, LoraWeights], model, clip, strength_model: float, strength_clip: float):
    """Patched clones ``(model, clip)`` of the given handles (either may be None)."""
    matched: set[str] = set()
    new_model = model
    if model is not None and strength_model != 0:
        targets = unet_targets(model)
        patches = {}
        for base, weights in lora.items():
            if base in targets:
                patches.setdefault(targets[base], []).append((strength_model, weights))
                matched.add(base)
        new_model = model.clone()
        new_model.patches = combine(model.patches, patches)
    new_clip = clip
    if clip is not None and strength_clip != 0:
        targets = clip_targets(clip)
        per_tower: dict[str, dict] = {}
        for base, weights in lora.items():
            if base in targets:
                tower, pname = targets[base]
                per_tower.setdefault(tower, {}).setdefault(pname, []).append((strength_clip, weights))
                matched.add(base)
        new_clip = clip.clone()
        new_clip.patches = {t: combine(clip.patches.get(t, {}), per_tower.get(t, {}))
                            for t in {*clip.patches, *per_tower}}
    if not matched and (strength_model or strength_clip):
        sample = ", ".join(sorted(lora)[:3])
        raise CheckpointError(f"the LoRA matches no weight of this {getattr(model or clip, 'family', '')} model "
                              f"(its keys look like {sample}): is it for another model family?")
    unmatched = len(lora) - len(matched)
    if unmatched:
        log.warning("LoRA: %d of %d weight pairs matched nothing in this model", unmatched, len(lora))
    return new_model, new_clip
