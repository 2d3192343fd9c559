"""Stage 1: the KL-regularized autoencoder (a diffusers AutoencoderKL), its losses and its trainer.

This package imports torch, diffusers, lpips and accelerate only; it is handed data loaders and
never imports `ldm`.
"""

from autoencoder._compat import ensure_torchvision_importable

# Before anything imports diffusers -> transformers -> torchvision (see autoencoder._compat).
ensure_torchvision_importable()

from autoencoder.config import AutoencoderConfig, LossConfig, ModelConfig, TrainConfig  # noqa: E402
from autoencoder.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss  # noqa: E402
from autoencoder.loss import AutoencoderLoss  # noqa: E402
from autoencoder.model import KLAutoencoder, build_vae  # noqa: E402
from autoencoder.perceptual import build_lpips, lpips_backbone_available, require_lpips_backbone  # noqa: E402
from autoencoder.posterior import DiagonalGaussian  # noqa: E402
from autoencoder.trainer import train_autoencoder  # noqa: E402

__all__ = [
    "AutoencoderConfig",
    "AutoencoderLoss",
    "DiagonalGaussian",
    "KLAutoencoder",
    "LossConfig",
    "ModelConfig",
    "PatchDiscriminator",
    "TrainConfig",
    "adaptive_weight",
    "build_lpips",
    "build_vae",
    "hinge_d_loss",
    "hinge_g_loss",
    "lpips_backbone_available",
    "require_lpips_backbone",
    "train_autoencoder",
]
