"""Model loaders: checkpoints (single files and diffusers folders), standalone VAEs and LoRAs
from the models/ folders."""

from __future__ import annotations

import os
import re
from pathlib import Path

from nodeflow import Combo, Float, Node, Output, Socket
from nodeflow.folders import MODEL_EXTENSIONS, folders, safe_relative

#: The LDM configs ComfyUI ships in models/configs; CheckpointLoader offers them even when
#: the folder does not hold them (the architecture is read from the weights anyway).
KNOWN_CONFIGS = ["anything_v3.yaml", "v1-inference.yaml", "v1-inference_clip_skip_2.yaml",
                 "v1-inference_clip_skip_2_fp16.yaml", "v1-inference_fp16.yaml", "v1-inpainting-inference.yaml",
                 "v2-inference-v.yaml", "v2-inference-v_fp32.yaml", "v2-inference.yaml", "v2-inference_fp32.yaml",
                 "v2-inpainting-inference.yaml", "sd_xl_base.yaml", "sd_xl_refiner.yaml"]
_V_CONFIG = re.compile(r"(^|[-_])v([-_.]|$)")            # "v2-inference-v.yaml", "v2-inference-v_fp32.yaml"
_PARAMETERIZATION = re.compile(r"^\s*parameterization\s*:\s*[\"']?(\w+)[\"']?\s*(#.*)?$", re.M)


def _stamp(path: Path):
    """A loader's cache fingerprint: the file's size and mtime (so replacing it reloads); for
    a diffusers folder, those of every file in it."""
    try:
        if path.is_dir():
            return tuple(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                for p in path.rglob("*") if p.is_file()))
        st = os.stat(path)
    except (OSError, ValueError):
        return None  # the run reports the missing file with the list of what exists
    return (st.st_size, st.st_mtime_ns)


def _file_stamp(kind: str, name: str):
    try:
        return _stamp(folders().model_path(kind, name))
    except (OSError, ValueError):
        return None


def _choices(kind: str):
    return lambda: folders().list_models(kind)


def _model_dirs(kind: str) -> list[Path]:
    """The folders of a model kind; kinds the folder settings do not know yet (``diffusers``,
    ``configs``) are models/<kind> under the base directory."""
    store = folders()
    try:
        return list(store.model_dirs(kind))
    except KeyError:
        return [store.base / "models" / kind]


# -- checkpoints and diffusers folders ------------------------------------------------------------


def _scan_checkpoints(root: Path) -> tuple[list[str], list[str]]:
    """(checkpoint files, diffusers folders) under ``root`` as relative POSIX names. A folder
    with a ``model_index.json`` is a diffusers pipeline: it is one choice, and the weight
    files inside it are not."""
    files, pipelines = [], []
    if not root.is_dir():
        return files, pipelines
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if "model_index.json" in filenames and here != root:
            pipelines.append(here.relative_to(root).as_posix())
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [(here / f).relative_to(root).as_posix() for f in filenames
                  if f.lower().endswith(MODEL_EXTENSIONS) and not f.startswith(".")]
    return files, pipelines


def diffusers_folders() -> list[str]:
    """The diffusers pipeline folders under models/diffusers (DiffusersLoader's choices)."""
    names: set[str] = set()
    for root in _model_dirs("diffusers"):
        names.update(_scan_checkpoints(root)[1])
    return sorted(names, key=str.lower)


def checkpoint_choices() -> list[str]:
    """LoadModel's choices: checkpoint files in models/checkpoints, and diffusers folders in
    models/checkpoints or models/diffusers (each listed once, never the files inside them)."""
    names: set[str] = set()
    for root in _model_dirs("checkpoints"):
        files, pipelines = _scan_checkpoints(root)
        names.update(files)
        names.update(pipelines)
    names.update(diffusers_folders())
    return sorted(names, key=str.lower)


def _pipeline_path(name: str, kinds=("checkpoints", "diffusers")) -> Path | None:
    rel = safe_relative(name)
    for kind in kinds:
        for root in _model_dirs(kind):
            candidate = root / rel
            if candidate.is_dir() and (candidate / "model_index.json").is_file():
                return candidate
    return None


def checkpoint_path(name: str) -> Path:
    """The checkpoint file or diffusers folder a LoadModel ``ckpt_name`` names (files first)."""
    try:
        return folders().model_path("checkpoints", name)
    except FileNotFoundError:
        pipeline = _pipeline_path(name)
        if pipeline is None:
            raise
        return pipeline


def _checkpoint_stamp(name: str):
    try:
        return _stamp(checkpoint_path(name))
    except (OSError, ValueError):
        return None


class LoadModel(Node):
    """Loads a Stable Diffusion checkpoint (SD 1.x, SD 2.x, SDXL; .safetensors or .ckpt, or a
    diffusers folder) from models/checkpoints (diffusers folders also from models/diffusers),
    detecting its family from the weights."""

    category = "loaders"
    display_name = "LoadModel"
    aliases = ("CheckpointLoaderSimple",)
    alias_display_names = {"CheckpointLoaderSimple": "Load Checkpoint"}
    model_inputs = {"ckpt_name": "checkpoints"}
    inputs = {"ckpt_name": Combo(choices=checkpoint_choices,
                                 tooltip="a file in models/checkpoints, or a diffusers folder")}
    outputs = [Output("MODEL", "MODEL"), Output("CLIP", "CLIP"), Output("VAE", "VAE")]

    @classmethod
    def fingerprint(cls, ckpt_name, **_):
        return _checkpoint_stamp(ckpt_name)

    def run(self, ckpt_name):
        return _load(checkpoint_path(ckpt_name))


def _load(path: Path, prediction_type: str | None = None):
    from nodeflow.models import load_checkpoint

    ckpt = load_checkpoint(path, prediction_type=prediction_type)
    return ckpt.model, ckpt.clip, ckpt.vae


def config_choices() -> list[str]:
    """The .yaml files in models/configs, then the known config names not among them."""
    found: set[str] = set()
    for root in _model_dirs("configs"):
        if root.is_dir():
            found.update(p.relative_to(root).as_posix() for p in root.rglob("*.yaml")
                         if not any(part.startswith(".") for part in p.relative_to(root).parts))
    return sorted(found, key=str.lower) + [c for c in KNOWN_CONFIGS if c not in found]


def config_prediction_type(config_name: str) -> str:
    """The prediction type an LDM config asks for: its ``parameterization`` key when the file
    is in models/configs ("v" means v-prediction; no key means ε, as in LDM), else what the
    name says ("…-v.yaml", "…-v_fp32.yaml": v-prediction)."""
    rel = safe_relative(config_name)
    for root in _model_dirs("configs"):
        path = root / rel
        if path.is_file():
            match = _PARAMETERIZATION.search(path.read_text(errors="replace"))
            return "v" if match and match[1] == "v" else "eps"
    return "v" if _V_CONFIG.search(Path(config_name).stem) else "eps"


class LoadModelWithConfig(LoadModel):
    """ComfyUI's older CheckpointLoader. The architecture is read from the weights; the
    config decides the prediction type (a v-prediction config such as v2-inference-v.yaml,
    or any config whose ``parameterization`` is "v", forces v-prediction; others force ε).
    ``config_name`` is a .yaml file in models/configs or one of ComfyUI's config names."""

    display_name = "LoadModelWithConfig (deprecated)"
    aliases = ("CheckpointLoader",)
    alias_display_names = {"CheckpointLoader": "Load Checkpoint With Config (DEPRECATED)"}
    deprecated = True
    inputs = {"config_name": Combo(choices=config_choices, tooltip="an LDM config (.yaml) in models/configs"),
              "ckpt_name": LoadModel.inputs["ckpt_name"]}

    @classmethod
    def fingerprint(cls, ckpt_name, config_name=None, **_):
        config = None
        if isinstance(config_name, str):
            try:
                config = config_prediction_type(config_name)
            except (OSError, ValueError):
                pass
        return _checkpoint_stamp(ckpt_name), config

    def run(self, config_name, ckpt_name):
        return _load(checkpoint_path(ckpt_name), config_prediction_type(config_name))


class DiffusersLoader(Node):
    """Loads a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
    ``text_encoder/``…) from models/diffusers. LoadModel lists these folders too."""

    category = "advanced/loaders/deprecated"
    display_name = "Load Diffusers Model (DEPRECATED)"
    model_inputs = {"model_path": "diffusers"}
    inputs = {"model_path": Combo(choices=diffusers_folders, tooltip="a diffusers folder in models/diffusers")}
    outputs = [Output("MODEL"), Output("CLIP"), Output("VAE")]

    @classmethod
    def fingerprint(cls, model_path, **_):
        try:
            path = _pipeline_path(model_path, ("diffusers",))
        except ValueError:
            return None
        return _stamp(path) if path is not None else None

    def run(self, model_path):
        path = _pipeline_path(model_path, ("diffusers",))
        if path is None:
            raise FileNotFoundError(f"diffusers folder {model_path!r} not found in "
                                    f"{', '.join(str(d) for d in _model_dirs('diffusers'))}; "
                                    f"available: {', '.join(diffusers_folders()) or 'none'}")
        return _load(path)


class LoadVAE(Node):
    """Loads a standalone VAE from models/vae."""

    category = "loaders"
    display_name = "LoadVAE"
    aliases = ("VAELoader",)
    alias_display_names = {"VAELoader": "Load VAE"}
    model_inputs = {"vae_name": "vae"}
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
    display_name = "LoadLora"
    aliases = ("LoraLoader",)
    alias_display_names = {"LoraLoader": "Load LoRA (Model and CLIP)"}
    model_inputs = {"lora_name": "loras"}
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
    display_name = "LoadLoraModelOnly"
    aliases = ("LoraLoaderModelOnly",)
    alias_display_names = {"LoraLoaderModelOnly": "Load LoRA"}
    model_inputs = {"lora_name": "loras"}
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


# -- helpers for model kinds ComfyUI spreads over several folders ---------------------------------


def choices_of(*kinds: str):
    """The model files of several kinds (ComfyUI's text_encoders + clip, …), each name once."""
    def choices() -> list[str]:
        names: set[str] = set()
        for kind in kinds:
            names.update(folders().list_models(kind))
        return sorted(names, key=str.lower)
    return choices


def model_path_of(kinds: tuple[str, ...], name: str) -> Path:
    """The file ``name`` in the first of ``kinds``' folders that has it."""
    store = folders()
    for kind in kinds:
        try:
            return store.model_path(kind, name)
        except FileNotFoundError:
            continue
    available = choices_of(*kinds)()
    shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "") if available else "none"
    dirs = ", ".join(str(d) for kind in kinds for d in store.model_dirs(kind))
    raise FileNotFoundError(f"model file {name!r} not found in {dirs}; available: {shown}")


def stamp_of(kinds: tuple[str, ...], name: str):
    try:
        return _stamp(model_path_of(kinds, name))
    except (OSError, ValueError):
        return None


# -- separate model files (ComfyUI's split-file workflows) -----------------------------------------

DIFFUSION_KINDS = ("diffusion_models", "unet")
TEXT_ENCODER_KINDS = ("text_encoders", "clip")
WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
#: ComfyUI's CLIPLoader and DualCLIPLoader types, in its order (the widget contract: an editor file
#: stores the chosen name); nodeflow runs the SD 1.x/2.x/XL ones and refuses the others by name.
CLIP_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image", "flux2", "ovis",
              "longcat_image", "cogvideox", "lens", "pixeldit", "ideogram4", "boogu", "krea2", "joyimage", "mage",
              "minimax"]
DUAL_CLIP_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image", "hunyuan_video_15",
                   "kandinsky5", "kandinsky5_image", "ltxv", "newbie", "ace"]


class LoadDiffusionModel(Node):
    """Loads a diffusion model (UNet) alone from models/diffusion_models or models/unet: LDM keys
    (with or without ``model.diffusion_model.``) or diffusers keys. fp8 weight types round the
    weights to fp8 as ComfyUI stores them, keeping them in the compute precision."""

    category = "advanced/loaders"
    display_name = "LoadDiffusionModel"  # its ComfyUI twin keeps ComfyUI's title
    aliases = ("UNETLoader",)
    alias_display_names = {"UNETLoader": "Load Diffusion Model"}
    model_inputs = {"unet_name": "diffusion_models"}
    inputs = {"unet_name": Combo(choices=choices_of(*DIFFUSION_KINDS)), "weight_dtype": Combo(choices=WEIGHT_DTYPES)}
    outputs = [Output("MODEL")]

    @classmethod
    def fingerprint(cls, unet_name, **_):
        return stamp_of(DIFFUSION_KINDS, unet_name)

    def run(self, unet_name, weight_dtype):
        from nodeflow.models.components import load_diffusion_model

        return (load_diffusion_model(model_path_of(DIFFUSION_KINDS, unet_name), weight_dtype=weight_dtype),)


def _text_encoder(names: list[str], device: str):
    import torch

    from nodeflow.models.components import load_text_encoders

    paths = [model_path_of(TEXT_ENCODER_KINDS, n) for n in names]
    if device == "cpu":
        return load_text_encoders(paths, device=torch.device("cpu"), dtype=torch.float32)
    return load_text_encoders(paths)


class LoadTextEncoder(Node):
    """Loads a CLIP text encoder alone from models/text_encoders or models/clip: CLIP-L (SD 1.x),
    OpenCLIP ViT-H (SD 2.x) or bigG (SDXL refiner), told apart by the weights. ``type`` is ComfyUI's;
    nodeflow runs "stable_diffusion"."""

    category = "advanced/loaders"
    display_name = "LoadTextEncoder"  # its ComfyUI twin keeps ComfyUI's title
    aliases = ("CLIPLoader",)
    alias_display_names = {"CLIPLoader": "Load CLIP"}
    model_inputs = {"clip_name": "text_encoders"}
    inputs = {"clip_name": Combo(choices=choices_of(*TEXT_ENCODER_KINDS)), "type": Combo(choices=CLIP_TYPES)}
    optional = {"device": Combo(choices=["default", "cpu"])}
    outputs = [Output("CLIP")]

    @classmethod
    def fingerprint(cls, clip_name, **_):
        return stamp_of(TEXT_ENCODER_KINDS, clip_name)

    def run(self, clip_name, type, device="default"):
        if type != "stable_diffusion":
            raise ValueError(f"CLIPLoader: type {type!r} is for a model family nodeflow does not run yet; "
                             "expected 'stable_diffusion' (SD 1.x CLIP-L, SD 2.x ViT-H, SDXL refiner bigG)")
        return (_text_encoder([clip_name], device),)


class LoadDualTextEncoder(Node):
    """Loads SDXL's two text encoders (CLIP-L and OpenCLIP bigG, in either order) from
    models/text_encoders or models/clip. ``type`` is ComfyUI's; nodeflow runs "sdxl"."""

    category = "advanced/loaders"
    display_name = "LoadDualTextEncoder"  # its ComfyUI twin keeps ComfyUI's title
    aliases = ("DualCLIPLoader",)
    model_inputs = {"clip_name1": "text_encoders", "clip_name2": "text_encoders"}
    inputs = {"clip_name1": Combo(choices=choices_of(*TEXT_ENCODER_KINDS)),
              "clip_name2": Combo(choices=choices_of(*TEXT_ENCODER_KINDS)),
              "type": Combo(choices=DUAL_CLIP_TYPES)}
    optional = {"device": Combo(choices=["default", "cpu"])}
    outputs = [Output("CLIP")]

    @classmethod
    def fingerprint(cls, clip_name1, clip_name2, **_):
        return stamp_of(TEXT_ENCODER_KINDS, clip_name1), stamp_of(TEXT_ENCODER_KINDS, clip_name2)

    def run(self, clip_name1, clip_name2, type, device="default"):
        if type != "sdxl":
            raise ValueError(f"DualCLIPLoader: type {type!r} is for a model family nodeflow does not run yet; "
                             "expected 'sdxl' (CLIP-L + OpenCLIP bigG)")
        clip = _text_encoder([clip_name1, clip_name2], device)
        if clip.family != "sdxl":
            raise ValueError(f"{clip_name1} and {clip_name2} are not SDXL's CLIP-L and bigG text encoders")
        return (clip,)
