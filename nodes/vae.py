"""The VAE between pixels and latents: decode, encode, and encode for inpainting.

LATENT values are raw VAE latents (the model scales them while sampling), as in ComfyUI.
The VAE handle falls back to working in tiles by itself when the device runs out of memory;
the tiled nodes ask for tiles from the start.
"""

from __future__ import annotations

import math

from nodeflow import Int, Node, Output, Socket


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


class VAEDecodeTiled(Node):
    """Decodes latents tile by tile, for large images on small GPUs. ``tile_size`` is in
    pixels; tiles overlap by an eighth of their size and are blended (``overlap`` is accepted
    for ComfyUI workflows but the blend width follows the tile size)."""

    category = "latent"
    display_name = "VAE Decode (Tiled)"
    inputs = {"samples": Socket("LATENT"), "vae": Socket("VAE"),
              "tile_size": Int(default=512, min=64, max=4096, step=32),
              "overlap": Int(default=64, min=0, max=4096, step=32)}
    outputs = [Output("IMAGE")]

    def run(self, samples, vae, tile_size, overlap):
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
              "overlap": Int(default=64, min=0, max=4096, step=32)}
    outputs = [Output("LATENT")]

    def run(self, pixels, vae, tile_size, overlap):
        return ({"samples": vae.encode(_crop_to_8(pixels), tile_size=max(8, tile_size // 8))},)


class VAEEncodeForInpaint(Node):
    """Encodes an image for inpainting: the masked area is filled with grey before encoding,
    and the mask (grown by ``grow_mask_by`` pixels) becomes the latent's noise mask."""

    category = "latent/inpaint"
    display_name = "VAE Encode (for Inpainting)"
    inputs = {"pixels": Socket("IMAGE"), "vae": Socket("VAE"), "mask": Socket("MASK"),
              "grow_mask_by": Int(default=6, min=0, max=64)}
    outputs = [Output("LATENT")]

    def run(self, pixels, vae, mask, grow_mask_by):
        import torch
        import torch.nn.functional as F

        pixels = _crop_to_8(pixels).clone()
        b, h, w, _ = pixels.shape
        mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
        # A mask of another size is stretched to the image (as ComfyUI does).
        mask = F.interpolate(mask, size=(h, w), mode="bilinear")
        if mask.shape[0] not in (1, b):
            raise ValueError(f"mask batch of {mask.shape[0]} does not match image batch of {b}")
        hard = mask.round()
        grown = hard
        if grow_mask_by > 0:
            kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
            pad = math.ceil((grow_mask_by - 1) / 2)
            grown = F.conv2d(hard, kernel, padding=pad).clamp(0, 1)[:, :, :h, :w]
        keep = (1.0 - hard).permute(0, 2, 3, 1)  # [B, H, W, 1]
        pixels = (pixels - 0.5) * keep + 0.5
        latent = vae.encode(pixels)
        return ({"samples": latent, "noise_mask": grown.round()},)
