"""Stage 1: the KL-regularized autoencoder (a diffusers AutoencoderKL), its losses and its trainer.

This package imports torch, diffusers, lpips and accelerate only; it is handed data loaders and
never imports `ldm`. The configs import instantly; the rest loads on first use, so a command line
that only parses its config stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from autoencoder.config import AutoencoderConfig, LossConfig, ModelConfig, TrainConfig

_LAZY = {
    "AutoencoderLoss": "autoencoder.loss",
    "DiagonalGaussian": "autoencoder.posterior",
    "KLAutoencoder": "autoencoder.model",
    "PatchDiscriminator": "autoencoder.discriminator",
    "adaptive_weight": "autoencoder.discriminator",
    "build_lpips": "autoencoder.perceptual",
    "build_vae": "autoencoder.model",
    "lpips_backbone_available": "autoencoder.perceptual",
    "require_lpips_backbone": "autoencoder.perceptual",
    "train_autoencoder": "autoencoder.trainer",
}

__all__ = ["AutoencoderConfig", "LossConfig", "ModelConfig", "TrainConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autoencoder' has no attribute {name!r}")
