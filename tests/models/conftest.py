"""Tiny random checkpoints in every real layout, written once per test session."""

from __future__ import annotations

import pytest
import torch

from nodeflow.models import testing

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def sd1_path(ckpt_dir):
    return testing.write_tiny_sd1(ckpt_dir / "sd1.safetensors")


@pytest.fixture(scope="session")
def sd1_ckpt_path(ckpt_dir):
    """The same weights as ``sd1_path``, pickled the LDM way ({"state_dict": ...}) with older CLIP keys."""
    return testing.write_tiny_sd1(ckpt_dir / "sd1.ckpt", legacy_clip_keys=True)


@pytest.fixture(scope="session")
def sd1_inpaint_path(ckpt_dir):
    return testing.write_tiny_sd1(ckpt_dir / "sd1_inpaint.safetensors", inpaint=True)


@pytest.fixture(scope="session")
def sd2_path(ckpt_dir):
    return testing.write_tiny_sd2(ckpt_dir / "sd2.safetensors")


@pytest.fixture(scope="session")
def sd2_v_path(ckpt_dir):
    return testing.write_tiny_sd2(ckpt_dir / "sd2_v.safetensors", v_prediction=True)


@pytest.fixture(scope="session")
def sdxl_path(ckpt_dir):
    return testing.write_tiny_sdxl(ckpt_dir / "sdxl.safetensors")


@pytest.fixture(scope="session")
def refiner_path(ckpt_dir):
    return testing.write_tiny_sdxl_refiner(ckpt_dir / "sdxl_refiner.safetensors")


@pytest.fixture(scope="session")
def vae_path(ckpt_dir):
    return testing.write_tiny_vae(ckpt_dir / "vae.safetensors")


@pytest.fixture(scope="session")
def diffusers_sd1(ckpt_dir):
    return testing.write_tiny_diffusers(ckpt_dir / "diffusers_sd1", "sd1")


@pytest.fixture(scope="session")
def diffusers_sdxl(ckpt_dir):
    return testing.write_tiny_diffusers(ckpt_dir / "diffusers_sdxl", "sdxl")


@pytest.fixture(scope="session")
def sd1(sd1_path):
    from nodeflow.models import load_checkpoint
    return load_checkpoint(sd1_path)


@pytest.fixture(scope="session")
def sdxl(sdxl_path):
    from nodeflow.models import load_checkpoint
    return load_checkpoint(sdxl_path)
