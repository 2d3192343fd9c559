"""Stage 1: the KL-regularized autoencoder (a diffusers AutoencoderKL), its losses and its metrics.

What stage 1 *is*; `ldm.training.train_autoencoder` trains it on the shared training runtime. This package
imports torch, diffusers and lpips only and never imports `ldm`. The configs import instantly; the rest
loads on first use, so a command line that only parses its config stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from autoencoder.config import LossConfig, ModelConfig

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
}

__all__ = ["LossConfig", "ModelConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autoencoder' has no attribute {name!r}")
