"""loss.latent_noise: the decoder sees noisy latents while training, and only then."""

import pytest
import torch
from diffusers import AutoencoderKL

from autoencoder.config import LossConfig
from autoencoder.model import KLAutoencoder


def tiny_autoencoder(latent_noise: float) -> KLAutoencoder:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
    )  # fmt: skip
    return KLAutoencoder(vae, latent_noise=latent_noise)


def reconstruct(model: KLAutoencoder, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return model(x, torch.Generator().manual_seed(seed))[0]


def test_latent_noise_is_added_relative_to_the_latent_scale_while_training_only():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    clean, noisy = tiny_autoencoder(0.0), tiny_autoencoder(0.5)
    with torch.no_grad():
        # Training mode: same posterior draw (same generator), but the noisy one also adds its noise.
        assert not torch.allclose(reconstruct(clean.train(), x), reconstruct(noisy.train(), x), atol=1e-4)
        # The noise is what was added: decoding the same draw plus 0.5 * rms(z) * n by hand gives the same image.
        generator = torch.Generator().manual_seed(0)
        z = noisy.encode(x).sample(generator)
        n = torch.randn(z.shape, generator=generator)
        by_hand = noisy.decode(z + 0.5 * z.square().mean().sqrt() * n)
        torch.testing.assert_close(reconstruct(noisy, x), by_hand)
        # Evaluation mode: no noise, so both models (same weights) reconstruct alike.
        torch.testing.assert_close(reconstruct(clean.eval(), x), reconstruct(noisy.eval(), x))


def test_negative_latent_noise_is_refused_by_name():
    with pytest.raises(ValueError, match="latent_noise: must be >= 0"):
        LossConfig(latent_noise=-0.1)
    with pytest.raises(ValueError, match="latent_noise: must be >= 0"):
        tiny_autoencoder(-0.1)
