"""Tiny random pipeline parts for fast tests: a 2-block VAE (f = 2, scaling_factor 0.5), a 2-level
cross-attention U-Net (latent 8x8, so 16x16 images) and a 1-layer CLIP text encoder of width 32.

Reusable from other test folders: `from tests.pipeline.tiny_models import tiny_pipeline`.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from conditioning import TextEncoder, TextEncoderConfig
from ldm.generation import LatentDiffusionPipeline, SamplingDefaults
from ldm.generation.noise_schedule import NoiseScheduleConfig

LATENT_CHANNELS = 4
TEXT_WIDTH = 32
IMAGE_SIZE = 16  # latent 8 x VAE factor 2
TINY_TEXT_ENCODER = TextEncoderConfig(hidden_size=TEXT_WIDTH, num_layers=1, num_heads=2, intermediate_size=64)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A random AutoencoderKL with f = 2 and scaling_factor 0.5 (not 1, so a missing division shows)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=0.5,
    )


def tiny_unet(seed: int = 0, out_channels: int = LATENT_CHANNELS, sample_size: int = 8) -> UNet2DConditionModel:
    """A random 2-level UNet2DConditionModel with cross-attention to TEXT_WIDTH-wide text states."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=LATENT_CHANNELS,
        out_channels=out_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )


@lru_cache
def tiny_text_encoder() -> TextEncoder:
    """The 1-layer random CLIP text encoder (built once: the tokenizer takes seconds); frozen, do not modify."""
    return TextEncoder.from_config(TINY_TEXT_ENCODER)


def tiny_pipeline(
    noise_schedule: NoiseScheduleConfig | None = None,
    defaults: SamplingDefaults | None = None,
    seed: int = 0,
) -> LatentDiffusionPipeline:
    """A random pipeline (the U-Net outputs 2C channels when the schedule's variance is learned_range). Its text
    encoder is a copy of the cached one, so casting or moving the pipeline leaves the cache as it was."""
    noise_schedule = noise_schedule or NoiseScheduleConfig()
    unet = tiny_unet(seed, out_channels=LATENT_CHANNELS * noise_schedule.output_channels_factor)
    encoder = copy.deepcopy(tiny_text_encoder())
    return LatentDiffusionPipeline(tiny_vae(seed), encoder, unet, noise_schedule, defaults)
