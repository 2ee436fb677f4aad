import torch

from nodeflow.models import load_vae
from nodeflow.models.vae import VAE


def test_encode_decode_shapes_and_ranges(vae_path):
    vae = load_vae(vae_path)
    image = torch.rand(2, 64, 80, 3)
    latent = vae.encode(image)
    assert latent.shape == (2, 4, 8, 10) and latent.dtype == torch.float32
    decoded = vae.decode(latent)
    assert decoded.shape == (2, 64, 80, 3) and decoded.min() >= 0 and decoded.max() <= 1
    assert vae.encode(torch.rand(1, 70, 67, 4)).shape == (1, 4, 8, 8)    # cropped to multiples of 8, alpha dropped


def test_tiled_decode(vae_path):
    vae = load_vae(vae_path)
    z = torch.randn(1, 4, 24, 16)
    full = vae.decode(z)
    assert torch.allclose(vae.decode(z, tile_size=32), full, atol=1e-5)   # one tile: the same
    tiled = vae.decode(z, tile_size=16)                                # 2 tiles, blended over the overlap
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()
    assert (tiled - full).abs().mean() < 0.1                              # (an unrelated latent: ~0.26)
    assert vae.decode(z, tile_size=8).shape == full.shape
    assert vae.encode(full, tile_size=8).shape == (1, 4, 24, 16)


def test_nan_in_half_precision_falls_back_to_float32(vae_path):
    vae = load_vae(vae_path, dtype=torch.bfloat16)
    decode = vae.model.decode

    def overflowing(z):                                 # what SDXL's VAE does in fp16
        out = decode(z)
        return out * float("nan") if out.dtype != torch.float32 else out

    vae.model.decode = overflowing
    image = vae.decode(torch.randn(1, 4, 8, 8))
    assert torch.isfinite(image).all() and vae.dtype == torch.float32
    assert next(vae.model.parameters()).dtype == torch.float32
    assert isinstance(vae, VAE)


def test_out_of_memory_falls_back_to_tiles_on_older_torch(vae_path, monkeypatch):
    """torch.OutOfMemoryError is torch >= 2.5; older ones only have torch.cuda.OutOfMemoryError."""
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    vae = load_vae(vae_path)
    z = torch.randn(1, 4, 8, 8)
    expected = vae.decode(z, tile_size=64)
    decode, calls = vae.model.decode, []

    def out_of_memory_once(latent):
        calls.append(latent.shape)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return decode(latent)

    vae.model.decode = out_of_memory_once
    assert torch.equal(vae.decode(z), expected) and len(calls) == 2
