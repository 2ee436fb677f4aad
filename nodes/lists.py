"""Nodes that make and take lists (see ``nodeflow.listexec``): a list from separate inputs, an
item of a list, and image or latent batches cut into a list of batches of a given size.

Names and inputs are ComfyUI's (``comfy_extras/nodes_toolkit.py``, ``nodes_rebatch.py``).
"""

from __future__ import annotations

from nodeflow import Hidden, Int, Node, Output, Socket
from nodeflow.spec import ANY

#: How many inputs CreateList offers (its autogrow group ``inputs.input0`` ...).
MAX_LIST_INPUTS = 10


class CreateList(Node):
    """Makes one list of everything its inputs carry, in input order (an input fed a list
    adds each of its values). The nodes it feeds run once per item."""

    category = "utilities"
    display_name = "Create List"
    optional = {f"inputs.input{i}": Socket(ANY) for i in range(MAX_LIST_INPUTS)}
    outputs = [Output(ANY, "list", is_list=True)]
    input_is_list = True

    def run(self, **inputs):
        items = []
        for i in range(MAX_LIST_INPUTS):
            items.extend(inputs.get(f"inputs.input{i}") or [])
        return (items,)


class GetItemFromList(Node):
    """The item at ``index`` of a list (negative counts from the end). Fed a single value that
    is itself a list (not a list output), it takes the item from that value."""

    category = "utilities"
    display_name = "Get Item From List"
    inputs = {"list": Socket(ANY), "index": Int(default=0)}
    hidden = {"dynprompt": Hidden("DYNPROMPT"), "unique_id": Hidden("UNIQUE_ID")}
    outputs = [Output(ANY)]
    input_is_list = True

    def run(self, list, index, dynprompt=None, unique_id=None):
        items = list
        if len(items) == 1 and isinstance(items[0], (tuple, type(items))):
            items = items[0]
        position = index[0]
        if not -len(items) <= position < len(items):
            raise ValueError(f"Get Item From List: index {position} is out of range for a list of {len(items)} "
                             f"item(s) (valid: {-len(items)} to {len(items) - 1})" if items else
                             f"Get Item From List: index {position}, but the list is empty")
        return (items[position],)


class RebatchImages(Node):
    """Cuts the images it is given (a list of batches, or one batch) into batches of
    ``batch_size`` images, in order; a change of image size starts a new batch."""

    category = "image/batch"
    display_name = "Rebatch Images"
    inputs = {"images": Socket("IMAGE"), "batch_size": Int(default=1, min=1, max=4096)}
    outputs = [Output("IMAGE", is_list=True)]
    input_is_list = True

    def run(self, images, batch_size):
        import torch

        size = batch_size[0]
        frames = [img[i:i + 1] for img in images for i in range(img.shape[0])]
        batches, current = [], []
        for frame in frames:
            if current and (len(current) == size or frame.shape[1:] != current[0].shape[1:]):
                batches.append(torch.cat(current))
                current = []
            current.append(frame)
        if current:
            batches.append(torch.cat(current))
        return (batches,)


class RebatchLatents(Node):
    """Cuts the latents it is given (a list of batches, or one batch) into batches of
    ``batch_size``, in order; a change of latent size starts a new batch. Each keeps its
    ``batch_index`` (counted on from 0 where a latent has none, so each image keeps its own
    noise) and its noise mask (a mask that is all ones is left out, as ComfyUI does)."""

    category = "latent/batch"
    display_name = "Rebatch Latents"
    inputs = {"latents": Socket("LATENT"), "batch_size": Int(default=1, min=1, max=4096)}
    outputs = [Output("LATENT", is_list=True)]
    input_is_list = True

    def run(self, latents, batch_size):
        import torch

        size = batch_size[0]
        rows: list[tuple] = []  # (samples [1, ...], mask [1, 1, H, W], batch index)
        counted = 0
        for latent in latents:
            samples = latent["samples"]
            count = samples.shape[0]
            masks = _full_masks(latent.get("noise_mask"), samples)
            indices = list(latent.get("batch_index") or range(counted, counted + count))
            counted += count
            rows.extend((samples[i:i + 1], masks[i:i + 1], indices[i]) for i in range(count))
        out, current = [], []
        for row in rows:
            if current and (len(current) == size or row[0].shape[2:] != current[0][0].shape[2:]):
                out.append(_latent_batch(current, torch))
                current = []
            current.append(row)
        if current:
            out.append(_latent_batch(current, torch))
        return (out,)


def _full_masks(mask, samples):
    """A noise mask per latent image, ``[B, 1, H, W]`` at the latent's pixel size (ones when none)."""
    import torch
    import torch.nn.functional as F

    b, height, width = samples.shape[0], samples.shape[-2] * 8, samples.shape[-1] * 8
    if mask is None:
        return torch.ones((b, 1, height, width))
    mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    if mask.shape[-2:] != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
    if mask.shape[0] < b:
        mask = mask.repeat((b - 1) // mask.shape[0] + 1, 1, 1, 1)
    return mask[:b]


def _latent_batch(rows, torch) -> dict:
    latent = {"samples": torch.cat([r[0] for r in rows]), "batch_index": [r[2] for r in rows]}
    mask = torch.cat([r[1] for r in rows])
    if not bool((mask == 1.0).all()):
        latent["noise_mask"] = mask
    return latent
