"""Full-size architectures (on the meta device, no memory): the key names and shapes of real checkpoints."""

import pytest
import torch

from nodeflow.models.diffusers_format import (
    diffusers_unet_config,
    diffusers_vae_config,
    ldm_unet_to_diffusers,
    ldm_vae_to_diffusers,
)
from nodeflow.models.unet import UNet, UNetConfig, config_from_shapes
from nodeflow.models.vae import AutoencoderKL, VAEConfig

SD15 = UNetConfig()
SD21 = UNetConfig(context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
SDXL = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
                  transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_middle=10,
                  transformer_depth_output=(10, 10, 10, 2, 2, 2, 0, 0, 0), context_dim=2048,
                  use_linear_in_transformer=True, adm_in_channels=2816, num_head_channels=64)
REFINER = UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
                     transformer_depth=(0, 0, 4, 4, 4, 4, 0, 0), transformer_depth_middle=4,
                     transformer_depth_output=(0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0), context_dim=1280,
                     use_linear_in_transformer=True, adm_in_channels=2560, num_head_channels=64)


def meta_state(module_fn):
    with torch.device("meta"):
        return module_fn().state_dict()


@pytest.mark.parametrize("cfg, n_keys, n_params, samples", [
    (SD15, 686, 859_520_964, {"input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
                              "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                              "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768)}),
    (SD21, 686, 865_910_724, {"input_blocks.1.1.proj_in.weight": (320, 320),
                              "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}),
    (SDXL, 1680, 2_567_463_684, {"label_emb.0.0.weight": (1280, 2816),
                                 "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                                 "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048)}),
    (REFINER, None, None, {"label_emb.0.0.weight": (1536, 2560)}),
])
def test_full_size_unet_keys(cfg, n_keys, n_params, samples):
    from diffusers import UNet2DConditionModel

    ours = meta_state(lambda: UNet(cfg))
    if n_keys:
        assert len(ours) == n_keys and sum(v.numel() for v in ours.values()) == n_params
    for key, shape in samples.items():
        assert tuple(ours[key].shape) == shape
    assert config_from_shapes({k: v.shape for k, v in ours.items()}, num_heads=cfg.num_heads,
                              num_head_channels=cfg.num_head_channels) == cfg
    config = {k: v for k, v in diffusers_unet_config(cfg).items() if not k.startswith("_")}
    theirs = meta_state(lambda: UNet2DConditionModel(**config))
    renamed = ldm_unet_to_diffusers(ours)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_full_size_vae_keys():
    from diffusers import AutoencoderKL as DiffusersVAE

    ours = meta_state(lambda: AutoencoderKL(VAEConfig()))
    assert len(ours) == 248 and sum(v.numel() for v in ours.values()) == 83_653_863
    config = {k: v for k, v in diffusers_vae_config(VAEConfig()).items() if not k.startswith("_")}
    theirs = meta_state(lambda: DiffusersVAE(**config))
    renamed = ldm_vae_to_diffusers(ours)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
