"""The training runtime both stages run on, and each stage's config and step.

`runtime.py` is the loop, written once; `autoencoder_stage.py` and `diffusion_stage.py` are what each stage
adds (its step, samples, extra checkpoint state and export); `checkpoint.py`, `training_state.py`,
`faults.py` and `distributed.py` are the fault tolerance and multi-process details beneath the loop.
"""

from ldm.training.autoencoder_config import AutoencoderExperimentConfig, AutoencoderTrainConfig
from ldm.training.autoencoder_stage import train_autoencoder
from ldm.training.config import TrainConfig
from ldm.training.diffusion_config import (
    DiffusionExperimentConfig,
    DiffusionLossConfig,
    DiffusionTrainConfig,
    ValidationConfig,
)
from ldm.training.diffusion_stage import train_diffusion
from ldm.training.ema import EMA
from ldm.training.latent_cache import LatentCache

__all__ = [
    "EMA",
    "AutoencoderExperimentConfig",
    "AutoencoderTrainConfig",
    "DiffusionExperimentConfig",
    "DiffusionLossConfig",
    "DiffusionTrainConfig",
    "LatentCache",
    "TrainConfig",
    "ValidationConfig",
    "train_autoencoder",
    "train_diffusion",
]
