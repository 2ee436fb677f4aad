"""Text encoding and conditioning: prompts become CONDITIONING, a list of
``[tensor [1, tokens, dim], {"pooled_output": ..., area/strength/mask ...}]`` entries."""

from __future__ import annotations

from nodeflow import Combo, Float, Int, Node, Output, Socket, String

MAX_RESOLUTION = 16384


def _with(conditioning: list, **meta) -> list:
    """A copy of ``conditioning`` with ``meta`` set on every entry (inputs stay unchanged)."""
    return [[cond, {**old, **meta}] for cond, old in conditioning]


class EncodeText(Node):
    """Encodes a prompt with the CLIP text encoder. Supports ``(word:1.2)`` weighting,
    ``(word)`` / ``[word]`` emphasis, ``embedding:name`` and prompts of any length."""

    category = "conditioning"
    display_name = "Encode Text (CLIP)"
    aliases = ("CLIPTextEncode",)
    alias_display_names = {"CLIPTextEncode": "CLIP Text Encode (Prompt)"}
    inputs = {"text": String(multiline=True, tooltip="the prompt"), "clip": Socket("CLIP")}
    outputs = [Output("CONDITIONING")]

    def run(self, text, clip):
        cond, pooled = clip.encode(text)
        return ([[cond, {"pooled_output": pooled}]],)


class EncodeTextSDXL(Node):
    """SDXL's text encoding with its size and crop conditioning; ``text_g`` goes to the
    OpenCLIP bigG encoder and ``text_l`` to the CLIP-L encoder."""

    category = "conditioning"
    display_name = "Encode Text (SDXL)"
    aliases = ("CLIPTextEncodeSDXL",)
    # Current ComfyUI's order (clip first); the widgets' order is the same as in older files.
    inputs = {
        "clip": Socket("CLIP"),
        "width": Int(default=1024, min=0, max=MAX_RESOLUTION),
        "height": Int(default=1024, min=0, max=MAX_RESOLUTION),
        "crop_w": Int(default=0, min=0, max=MAX_RESOLUTION),
        "crop_h": Int(default=0, min=0, max=MAX_RESOLUTION),
        "target_width": Int(default=1024, min=0, max=MAX_RESOLUTION),
        "target_height": Int(default=1024, min=0, max=MAX_RESOLUTION),
        "text_g": String(multiline=True),
        "text_l": String(multiline=True),
    }
    outputs = [Output("CONDITIONING")]

    def run(self, clip, width, height, crop_w, crop_h, target_width, target_height, text_g, text_l):
        tokens = clip.tokenize(text_g)
        if set(tokens) != {"l", "g"}:
            raise ValueError(f"this CLIP ({getattr(clip, 'family', '?')}) is not SDXL's pair of text encoders; "
                             "use EncodeText (CLIPTextEncode)")
        tokens["l"] = clip.tokenize(text_l)["l"]
        # Both towers must see the same number of 77-token chunks: pad the shorter with empty ones.
        empty = clip.tokenize("")
        for short, long in (("l", "g"), ("g", "l")):
            while len(tokens[short]) < len(tokens[long]):
                tokens[short] = tokens[short] + empty[short]
        cond, pooled = clip.encode_tokens(tokens)
        meta = {"pooled_output": pooled, "width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h,
                "target_width": target_width, "target_height": target_height}
        return ([[cond, meta]],)


class EncodeTextSDXLRefiner(Node):
    """The SDXL refiner's text encoding with its aesthetic score."""

    category = "conditioning"
    display_name = "Encode Text (SDXL refiner)"
    aliases = ("CLIPTextEncodeSDXLRefiner",)
    inputs = {
        "ascore": Float(default=6.0, min=0.0, max=1000.0, step=0.01),
        "width": Int(default=1024, min=0, max=MAX_RESOLUTION),
        "height": Int(default=1024, min=0, max=MAX_RESOLUTION),
        "text": String(multiline=True),
        "clip": Socket("CLIP"),
    }
    outputs = [Output("CONDITIONING")]

    def run(self, ascore, width, height, text, clip):
        cond, pooled = clip.encode(text)
        return ([[cond, {"pooled_output": pooled, "aesthetic_score": ascore, "width": width, "height": height}]],)


class SetClipSkip(Node):
    """Uses the output of an earlier CLIP layer (-1 = last, -2 = penultimate, ...)."""

    category = "conditioning"
    display_name = "Set CLIP Skip"
    aliases = ("CLIPSetLastLayer",)
    alias_display_names = {"CLIPSetLastLayer": "CLIP Set Last Layer"}
    inputs = {"clip": Socket("CLIP"), "stop_at_clip_layer": Int(default=-1, min=-24, max=-1)}
    outputs = [Output("CLIP")]

    def run(self, clip, stop_at_clip_layer):
        return (clip.set_last_layer(stop_at_clip_layer),)


class CombineConditioning(Node):
    """Both conditionings guide the sample: their predictions are averaged by area and strength."""

    category = "conditioning"
    display_name = "Combine Conditioning"
    aliases = ("ConditioningCombine",)
    alias_display_names = {"ConditioningCombine": "Conditioning (Combine)"}
    inputs = {"conditioning_1": Socket("CONDITIONING"), "conditioning_2": Socket("CONDITIONING")}
    outputs = [Output("CONDITIONING")]

    def run(self, conditioning_1, conditioning_2):
        return (list(conditioning_1) + list(conditioning_2),)


class SetConditioningArea(Node):
    """Limits a conditioning to a rectangle of the image (pixels, multiples of 8)."""

    category = "conditioning"
    display_name = "Set Conditioning Area"
    aliases = ("ConditioningSetArea",)
    alias_display_names = {"ConditioningSetArea": "Conditioning (Set Area)"}
    inputs = {
        "conditioning": Socket("CONDITIONING"),
        "width": Int(default=64, min=64, max=MAX_RESOLUTION, step=8),
        "height": Int(default=64, min=64, max=MAX_RESOLUTION, step=8),
        "x": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "y": Int(default=0, min=0, max=MAX_RESOLUTION, step=8),
        "strength": Float(default=1.0, min=0.0, max=10.0, step=0.01),
    }
    outputs = [Output("CONDITIONING")]

    def run(self, conditioning, width, height, x, y, strength):
        return (_with(conditioning, area=(height // 8, width // 8, y // 8, x // 8), strength=strength,
                      set_area_to_bounds=False),)


class ConditioningSetAreaStrength(Node):
    """Sets the weight of a conditioning's entries (how much they count against the others
    they are combined with), leaving their areas as they are."""

    category = "conditioning"
    display_name = "Conditioning (Set Area Strength)"
    inputs = {
        "conditioning": Socket("CONDITIONING"),
        "strength": Float(default=1.0, min=0.0, max=10.0, step=0.01),
    }
    outputs = [Output("CONDITIONING")]

    def run(self, conditioning, strength):
        return (_with(conditioning, strength=strength),)


class SetConditioningAreaPercentage(Node):
    """Limits a conditioning to a rectangle given as fractions of the image."""

    category = "conditioning"
    aliases = ("ConditioningSetAreaPercentage",)
    alias_display_names = {"ConditioningSetAreaPercentage": "Conditioning (Set Area with Percentage)"}
    inputs = {
        "conditioning": Socket("CONDITIONING"),
        "width": Float(default=1.0, min=0.0, max=1.0, step=0.01),
        "height": Float(default=1.0, min=0.0, max=1.0, step=0.01),
        "x": Float(default=0.0, min=0.0, max=1.0, step=0.01),
        "y": Float(default=0.0, min=0.0, max=1.0, step=0.01),
        "strength": Float(default=1.0, min=0.0, max=10.0, step=0.01),
    }
    outputs = [Output("CONDITIONING")]

    def run(self, conditioning, width, height, x, y, strength):
        return (_with(conditioning, area=("percentage", height, width, y, x), strength=strength,
                      set_area_to_bounds=False),)


class SetConditioningMask(Node):
    """Limits a conditioning to a mask; ``mask bounds`` also crops to the mask's bounding box."""

    category = "conditioning"
    aliases = ("ConditioningSetMask",)
    alias_display_names = {"ConditioningSetMask": "Conditioning (Set Mask)"}
    inputs = {
        "conditioning": Socket("CONDITIONING"),
        "mask": Socket("MASK"),
        "strength": Float(default=1.0, min=0.0, max=10.0, step=0.01),
        "set_cond_area": Combo(choices=["default", "mask bounds"]),
    }
    outputs = [Output("CONDITIONING")]

    def run(self, conditioning, mask, strength, set_cond_area):
        if mask.ndim < 3:
            mask = mask.unsqueeze(0)
        return (_with(conditioning, mask=mask, mask_strength=strength,
                      set_area_to_bounds=set_cond_area != "default"),)


class SetConditioningTimestepRange(Node):
    """Applies a conditioning only between two fractions of the sampling run."""

    category = "conditioning"
    aliases = ("ConditioningSetTimestepRange",)
    inputs = {
        "conditioning": Socket("CONDITIONING"),
        "start": Float(default=0.0, min=0.0, max=1.0, step=0.001),
        "end": Float(default=1.0, min=0.0, max=1.0, step=0.001),
    }
    outputs = [Output("CONDITIONING")]

    def run(self, conditioning, start, end):
        return (_with(conditioning, start_percent=start, end_percent=end),)


class AverageConditioning(Node):
    """Blends ``conditioning_to`` towards ``conditioning_from``'s first entry."""

    category = "conditioning"
    aliases = ("ConditioningAverage",)
    alias_display_names = {"ConditioningAverage": "Conditioning (Average)"}
    inputs = {
        "conditioning_to": Socket("CONDITIONING"),
        "conditioning_from": Socket("CONDITIONING"),
        "conditioning_to_strength": Float(default=1.0, min=0.0, max=1.0, step=0.01),
    }
    outputs = [Output("CONDITIONING")]

    def run(self, conditioning_to, conditioning_from, conditioning_to_strength):

        src, src_meta = conditioning_from[0]
        w = conditioning_to_strength
        out = []
        for cond, meta in conditioning_to:
            other = _fit_tokens(src, cond.shape[1])
            mixed = cond * w + other * (1.0 - w)
            meta = dict(meta)
            pooled_src = src_meta.get("pooled_output")
            pooled = meta.get("pooled_output", pooled_src)       # an entry without one takes the source's
            if pooled is not None and pooled_src is not None:
                meta["pooled_output"] = pooled * w + pooled_src * (1.0 - w)
            elif pooled_src is not None:
                meta["pooled_output"] = pooled_src
            out.append([mixed, meta])
        return (out,)


class ConcatConditioning(Node):
    """Appends the tokens of ``conditioning_from`` to each entry of ``conditioning_to``."""

    category = "conditioning"
    aliases = ("ConditioningConcat",)
    alias_display_names = {"ConditioningConcat": "Conditioning (Concat)"}
    inputs = {"conditioning_to": Socket("CONDITIONING"), "conditioning_from": Socket("CONDITIONING")}
    outputs = [Output("CONDITIONING")]

    def run(self, conditioning_to, conditioning_from):
        import torch

        src = conditioning_from[0][0]
        return ([[torch.cat([cond, src], dim=1), dict(meta)] for cond, meta in conditioning_to],)


class ZeroConditioning(Node):
    """Conditioning of zeros (and zero pooled output): 'no prompt at all'."""

    category = "conditioning"
    aliases = ("ConditioningZeroOut",)
    alias_display_names = {"ConditioningZeroOut": "Conditioning Zero Out"}
    inputs = {"conditioning": Socket("CONDITIONING")}
    outputs = [Output("CONDITIONING")]

    def run(self, conditioning):
        import torch

        out = []
        for cond, meta in conditioning:
            meta = dict(meta)
            if meta.get("pooled_output") is not None:
                meta["pooled_output"] = torch.zeros_like(meta["pooled_output"])
            out.append([torch.zeros_like(cond), meta])
        return (out,)


def _fit_tokens(cond, tokens: int):
    """Cut ``cond`` [1, T, D] to ``tokens`` along T, or pad it with zeros."""
    import torch

    if cond.shape[1] >= tokens:
        return cond[:, :tokens]
    pad = torch.zeros(cond.shape[0], tokens - cond.shape[1], cond.shape[2], dtype=cond.dtype)
    return torch.cat([cond, pad], dim=1)
