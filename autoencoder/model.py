"""The network: a diffusers AutoencoderKL plus the learned log-variance of its decoder likelihood."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from autoencoder.config import ModelConfig
from autoencoder.posterior import DiagonalGaussian


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    """An AutoencoderKL from `cfg`: loaded from `cfg.pretrained`, or built fresh with f = 2^(levels-1)."""
    if cfg.pretrained:
        return AutoencoderKL.from_pretrained(cfg.pretrained, use_safetensors=True)
    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        mid_block_add_attention=cfg.mid_block_attention,
        scaling_factor=1.0,  # set from the data after training (see autoencoder.evaluate.latent_scaling_factor)
    )


class KLAutoencoder(nn.Module):
    """AutoencoderKL with our posterior, plus the scalar log-variance of p(x | z) that the loss learns.

    The log-variance is the scale of the decoder's likelihood, so it lives with the model (and is
    synchronized with it across processes); only `vae` is exported.
    """

    def __init__(self, vae: AutoencoderKL, logvar_init: float = 0.0, latent_noise: float = 0.0) -> None:
        super().__init__()
        if latent_noise < 0:
            raise ValueError(f"latent_noise: must be >= 0, got {latent_noise}")
        self.vae = vae
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))
        self.latent_noise = latent_noise

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """q(z | x) for images x (B, 3, H, W) in [-1, 1]."""
        return DiagonalGaussian(self.vae.encode(x).latent_dist.parameters)  # moments (B, 2C, H/f, W/f)

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, 3, H, W) from latents (B, C, H/f, W/f) (unscaled)."""
        return self.vae.decode(z).sample

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Reconstruct x through a posterior sample; returns (reconstruction, posterior moments).

        While training with `latent_noise` s > 0, the decoder sees z + s * rms(z) * n instead: noise relative to
        the batch's latent scale (so the encoder cannot outgrow it), which the decoder must learn to tolerate,
        as it must tolerate the diffusion model's errors later."""
        posterior = self.encode(x)
        z = posterior.sample(generator)
        if self.training and self.latent_noise > 0:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = z + self.latent_noise * z.detach().square().mean().sqrt() * noise
        return self.decode(z), torch.cat([posterior.mean, posterior.logvar], dim=1)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output convolution weight, where the adaptive GAN weight compares gradients."""
        return self.vae.decoder.conv_out.weight
