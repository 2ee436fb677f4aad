"""Model patches: what a MODEL handle changes about sampling and the UNet's forward, beyond
its weights (LoRA lives in ``patching``).

A ``ModelPatches`` travels on the handle (``DiffusionModel.model_patches``) and is copied by
``clone()``, so a node that patches a clone never changes the handle it was given (whose
cached value other branches of the graph may share), and patches applied one after the
other add up. The kinds, with the places ComfyUI's ``ModelPatcher`` calls them
(``set_model_sampler_cfg_function`` …), so that third-party patches port directly:

sampling (read by ``nodeflow.sampling.guidance.CFGDenoiser`` once per step)
    ``cfg_function(args) -> x − D``: replaces D = D_u + cfg·(D_c − D_u). ``args``: "cond",
    "uncond" (x − D_c, x − D_u), "cond_denoised", "uncond_denoised", "cond_scale", "sigma"
    (B,), "input" (x), "model", "denoiser".
    ``post_cfg_functions``: ``fn(args) -> D`` in order, after CFG. ``args``: "denoised",
    "cond_denoised", "uncond_denoised", "cond", "uncond" (the entries of each side, for
    ``args["denoiser"].predict(args["cond"], x, sigma, patches)``), "cond_scale", "sigma",
    "input", "model", "denoiser".
    ``disable_cfg1_optimization``: run the negative side even at cfg 1.

UNet (read by ``nodeflow.models.unet.UNet`` in each forward; ``info`` is a dict shared by
the patches of one forward: "block" (("input" | "middle" | "output"), index),
"block_index" (transformer block within its SpatialTransformer), "transformer_index"
(SpatialTransformer count so far), "cond_or_uncond" (0/1 per batch chunk), "sigmas",
"n_heads", "dim_head", "original_shape")
    ``input_block``: ``fn(h, info) -> h`` after each input block (and its ControlNet
    residual), before h is kept as a skip; ``input_block_after_skip``: the same after.
    ``middle_block``: ``fn(h, info) -> h`` after the middle block (nodeflow's own).
    ``output_block``: ``fn(h, skip, info) -> (h, skip)`` before each output block.
    ``attn1`` / ``attn2``: ``fn(n, context, value, info) -> (n, context, value)`` before
    self-/cross-attention; ``attn1_output`` / ``attn2_output``: ``fn(out, info) -> out``.
    ``attn1_replace`` / ``attn2_replace``: ``{(block, number[, transformer index]): fn(q, k,
    v, info) -> out}`` replaces the attention of the projected q, k, v (B, T, heads·dim).
    ``transformer_middle``: ``fn(x, info) -> x`` between self- and cross-attention (GLIGEN;
    ComfyUI's "middle_patch").
    ``step_cache``: a ``nodeflow.models.step_cache.DeepCache`` (the DeepCache node), which plans
    each forward: full, or only the shallow blocks with the deep features of an earlier step.

Under ``--compile`` (``nodeflow.models.compiled``) a UNet patch function is compiled into the
graph when it has a ``compile_key`` attribute: a hashable that names what it computes (the
function and every setting it closes over), so that two patches with equal keys may share a
graph; a patch without one makes that call run eagerly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BLOCK_PATCHES = ("input_block", "input_block_after_skip", "middle_block", "output_block")
ATTENTION_PATCHES = ("attn1", "attn2", "attn1_output", "attn2_output", "transformer_middle")
REPLACEABLE = ("attn1", "attn2")
UNET_PATCHES = (*BLOCK_PATCHES, *ATTENTION_PATCHES, "attn1_replace", "attn2_replace")


@dataclass
class ModelPatches:
    cfg_function: Callable | None = None
    post_cfg_functions: list[Callable] = field(default_factory=list)
    disable_cfg1_optimization: bool = False
    input_block: list[Callable] = field(default_factory=list)
    input_block_after_skip: list[Callable] = field(default_factory=list)
    middle_block: list[Callable] = field(default_factory=list)
    output_block: list[Callable] = field(default_factory=list)
    attn1: list[Callable] = field(default_factory=list)
    attn2: list[Callable] = field(default_factory=list)
    attn1_output: list[Callable] = field(default_factory=list)
    attn2_output: list[Callable] = field(default_factory=list)
    transformer_middle: list[Callable] = field(default_factory=list)
    attn1_replace: dict[tuple, Callable] = field(default_factory=dict)
    attn2_replace: dict[tuple, Callable] = field(default_factory=dict)
    step_cache: Any = None

    def copy(self) -> ModelPatches:
        """A copy whose lists and dicts are its own (the functions are shared)."""
        out = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, (list, dict)):
                setattr(out, name, copy.copy(value))
        return out

    def merged(self, other: ModelPatches | None) -> ModelPatches:
        """These patches followed by ``other``'s (a new object; for one forward's extras)."""
        if other is None:
            return self
        out = self.copy()
        for name, value in vars(other).items():
            if isinstance(value, list):
                getattr(out, name).extend(value)
            elif isinstance(value, dict):
                getattr(out, name).update(value)
        out.cfg_function = other.cfg_function or self.cfg_function
        out.step_cache = other.step_cache or self.step_cache
        out.disable_cfg1_optimization = self.disable_cfg1_optimization or other.disable_cfg1_optimization
        return out

    @property
    def touches_unet(self) -> bool:
        """Whether any patch acts inside the UNet's forward."""
        return self.step_cache is not None or any(getattr(self, n) for n in UNET_PATCHES)

    def unet_functions(self) -> list[tuple[str, Callable]]:
        """(where, fn) of every function called inside the UNet's forward: block, attention and
        replacing patches, in a fixed order."""
        found: list[tuple[str, Callable]] = []
        for name in UNET_PATCHES:
            value = getattr(self, name)
            if isinstance(value, dict):
                found.extend((f"{name}{key}", fn) for key, fn in value.items())
            else:
                found.extend((name, fn) for fn in value)
        return found

    @property
    def touches_attention(self) -> bool:
        return any(getattr(self, n) for n in (*ATTENTION_PATCHES, "attn1_replace", "attn2_replace"))

    # -- building (on a handle's own copy) ---------------------------------------------------

    def add_block_patch(self, where: str, fn: Callable) -> None:
        if where not in BLOCK_PATCHES:
            raise ValueError(f"unknown UNet block patch {where!r}; expected one of {', '.join(BLOCK_PATCHES)}")
        getattr(self, where).append(fn)

    def add_attention_patch(self, where: str, fn: Callable) -> None:
        if where not in ATTENTION_PATCHES:
            raise ValueError(f"unknown attention patch {where!r}; expected one of {', '.join(ATTENTION_PATCHES)}")
        getattr(self, where).append(fn)

    def set_attention_replace(self, which: str, fn: Callable, block: str, number: int,
                              transformer_index: int | None = None) -> None:
        """Replace ``which`` ("attn1" | "attn2") in block (``block``, ``number``), in every
        transformer block of it, or only in ``transformer_index``."""
        if which not in REPLACEABLE:
            raise ValueError(f"only attn1 and attn2 can be replaced, not {which!r}")
        if block not in ("input", "middle", "output"):
            raise ValueError(f"block must be 'input', 'middle' or 'output', not {block!r}")
        key = (block, number) if transformer_index is None else (block, number, transformer_index)
        getattr(self, which + "_replace")[key] = fn

    def add_post_cfg_function(self, fn: Callable, disable_cfg1_optimization: bool = False) -> None:
        self.post_cfg_functions.append(fn)
        self.disable_cfg1_optimization |= disable_cfg1_optimization

    def set_cfg_function(self, fn: Callable, disable_cfg1_optimization: bool = False) -> None:
        self.cfg_function = fn
        self.disable_cfg1_optimization |= disable_cfg1_optimization


def replacement(table: dict[tuple, Callable], info: dict) -> Callable | None:
    """The replacing attention for the transformer block ``info`` describes: one registered for
    (block, number, transformer index) first, else for (block, number), else None."""
    block = info.get("block")
    if block is None or not table:
        return None
    return table.get((block[0], block[1], info.get("block_index", 0))) or table.get(block)
