"""The VAE between pixels and latents: decode, encode, and encode for inpainting (also for
inpainting models: InpaintModelConditioning).

LATENT values are raw VAE latents (the model scales them while sampling), as in ComfyUI.
The VAE handle falls back to working in tiles by itself when the device runs out of memory;
the tiled nodes ask for tiles from the start.
"""

from __future__ import annotations

import math

from nodeflow import Bool, Int, Node, Output, Socket


def _crop_to_8(pixels):
    """Crop an IMAGE [B, H, W, C] to multiples of 8 (centred), dropping any alpha channel."""
    h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
    if h == 0 or w == 0:
        raise ValueError(f"image of {pixels.shape[2]}x{pixels.shape[1]} pixels is too small to encode (min 8x8)")
    top, left = (pixels.shape[1] - h) // 2, (pixels.shape[2] - w) // 2
    return pixels[:, top:top + h, left:left + w, :3]


class VAEDecode(Node):
    """Decodes latents into images."""

    category = "latent"
    display_name = "VAE Decode"
    inputs = {"samples": Socket("LATENT"), "vae": Socket("VAE")}
    outputs = [Output("IMAGE")]

    def run(self, samples, vae):
        return (vae.decode(samples["samples"]),)


#: ComfyUI's tiled nodes also take the frames per tile of video VAEs (ignored by image VAEs).
_TEMPORAL = {
    "temporal_size": Int(default=64, min=8, max=4096, step=4,
                         tooltip="Only used for video VAEs: amount of frames to decode at a time."),
    "temporal_overlap": Int(default=8, min=4, max=4096, step=4,
                            tooltip="Only used for video VAEs: amount of frames to overlap."),
}


class VAEDecodeTiled(Node):
    """Decodes latents tile by tile, for large images on small GPUs. ``tile_size`` is in
    pixels; tiles overlap by an eighth of their size and are blended (``overlap`` is accepted
    for ComfyUI workflows but the blend width follows the tile size; ``temporal_size`` and
    ``temporal_overlap`` concern video VAEs only, and are ignored)."""

    category = "latent"
    display_name = "VAE Decode (Tiled)"
    inputs = {"samples": Socket("LATENT"), "vae": Socket("VAE"),
              "tile_size": Int(default=512, min=64, max=4096, step=32),
              "overlap": Int(default=64, min=0, max=4096, step=32), **_TEMPORAL}
    outputs = [Output("IMAGE")]

    def run(self, samples, vae, tile_size, overlap, temporal_size=64, temporal_overlap=8):
        return (vae.decode(samples["samples"], tile_size=max(8, tile_size // 8)),)


class VAEEncode(Node):
    """Encodes images into latents (cropped to multiples of 8 pixels)."""

    category = "latent"
    display_name = "VAE Encode"
    inputs = {"pixels": Socket("IMAGE"), "vae": Socket("VAE")}
    outputs = [Output("LATENT")]

    def run(self, pixels, vae):
        return ({"samples": vae.encode(_crop_to_8(pixels))},)


class VAEEncodeTiled(Node):
    """Encodes images tile by tile (``tile_size`` in pixels; see VAEDecodeTiled for ``overlap``)."""

    category = "latent"
    display_name = "VAE Encode (Tiled)"
    inputs = {"pixels": Socket("IMAGE"), "vae": Socket("VAE"),
              "tile_size": Int(default=512, min=64, max=4096, step=64),
              "overlap": Int(default=64, min=0, max=4096, step=32), **_TEMPORAL}
    outputs = [Output("LATENT")]

    def run(self, pixels, vae, tile_size, overlap, temporal_size=64, temporal_overlap=8):
        return ({"samples": vae.encode(_crop_to_8(pixels), tile_size=max(8, tile_size // 8))},)


def _inpaint_inputs(pixels, mask):
    """ComfyUI's preparation of an image and its mask for inpainting: the mask is resized
    (bilinear) to the image's full size first, then both are cropped at the same centred
    offset ((H % 8) // 2, (W % 8) // 2) to multiples of 8, so the mask stays on the pixels it
    was drawn on. Returns (pixels [B, h, w, 3], mask [Bm, 1, h, w])."""
    import torch.nn.functional as F

    cropped = _crop_to_8(pixels)
    height, width = pixels.shape[1], pixels.shape[2]
    h, w = cropped.shape[1], cropped.shape[2]
    top, left = (height - h) // 2, (width - w) // 2
    mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    mask = F.interpolate(mask, size=(height, width), mode="bilinear")
    if mask.shape[0] not in (1, pixels.shape[0]):
        raise ValueError(f"mask batch of {mask.shape[0]} does not match image batch of {pixels.shape[0]}")
    return cropped, mask[:, :, top:top + h, left:left + w]


def _grey_out(pixels, mask):
    """The pixels with the (rounded) masked area set to mid-grey 0.5."""
    keep = (1.0 - mask.round()).permute(0, 2, 3, 1)  # [B, h, w, 1]
    return (pixels - 0.5) * keep + 0.5


class VAEEncodeForInpaint(Node):
    """Encodes an image for inpainting: the masked area is filled with grey before encoding,
    and the mask (grown by ``grow_mask_by`` pixels) becomes the latent's noise mask. A mask
    of another size is stretched to the image, and both are cropped to multiples of 8
    pixels at the same centred offset."""

    category = "latent/inpaint"
    display_name = "VAE Encode (for Inpainting)"
    inputs = {"pixels": Socket("IMAGE"), "vae": Socket("VAE"), "mask": Socket("MASK"),
              "grow_mask_by": Int(default=6, min=0, max=64)}
    outputs = [Output("LATENT")]

    def run(self, pixels, vae, mask, grow_mask_by):
        import torch
        import torch.nn.functional as F

        pixels, mask = _inpaint_inputs(pixels, mask)
        h, w = pixels.shape[1], pixels.shape[2]
        grown = mask
        if grow_mask_by > 0:
            kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
            pad = math.ceil((grow_mask_by - 1) / 2)
            grown = F.conv2d(mask.round(), kernel, padding=pad).clamp(0, 1)[:, :, :h, :w]
        latent = vae.encode(_grey_out(pixels, mask))
        return ({"samples": latent, "noise_mask": grown.round()},)


class InpaintModelConditioning(Node):
    """Prepares an inpainting model's inputs: the image with the masked area greyed out is
    encoded and set, with the mask, on both conditionings (an inpainting UNet reads them as
    its extra input channels); the LATENT is the whole image encoded, with the mask as its
    noise mask when ``noise_mask`` is on (sampling then changes only the masked area). The
    mask is stretched to the image and both are cropped to multiples of 8 pixels at the same
    centred offset, as in VAEEncodeForInpaint."""

    category = "conditioning/inpaint"
    inputs = {"positive": Socket("CONDITIONING"), "negative": Socket("CONDITIONING"), "vae": Socket("VAE"),
              "pixels": Socket("IMAGE"), "mask": Socket("MASK"),
              "noise_mask": Bool(default=True, tooltip="add a noise mask to the latent so sampling only "
                                                       "happens within the mask")}
    outputs = [Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent")]

    def run(self, positive, negative, vae, pixels, mask, noise_mask=True):
        cropped, mask = _inpaint_inputs(pixels, mask)
        concat_latent = vae.encode(_grey_out(cropped, mask))
        latent = {"samples": vae.encode(_crop_to_8(pixels))}
        if noise_mask:
            latent["noise_mask"] = mask
        meta = {"concat_latent_image": concat_latent, "concat_mask": mask}
        out = [[[cond, {**old, **meta}] for cond, old in conditioning] for conditioning in (positive, negative)]
        return out[0], out[1], latent
