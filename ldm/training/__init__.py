"""Stage 2: training the latent diffusion U-Net (config, caches, EMA, the trainer)."""

from ldm.training.config import (
    DiffusionExperimentConfig,
    DiffusionLossConfig,
    DiffusionTrainConfig,
    ValidationConfig,
)
from ldm.training.ema import EMA
from ldm.training.latent_cache import LatentCache
from ldm.training.trainer import train_diffusion

__all__ = [
    "EMA",
    "DiffusionExperimentConfig",
    "DiffusionLossConfig",
    "DiffusionTrainConfig",
    "LatentCache",
    "ValidationConfig",
    "train_diffusion",
]
