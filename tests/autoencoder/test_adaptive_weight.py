"""The adaptive GAN weight under float16 autocast (as accelerate's fp16 runs the step) matches float32's.

Under fp16 the two gradients it compares flow back through float16 activations without the loss scaling
the training backward gets: per-pixel gradients below fp16's smallest subnormal (6e-8) vanish, and a sum
over a batch's pixels above its maximum (65504) overflows. CPU autocast runs the same float16 ops.
"""

import pytest
import torch
from torch import Tensor, nn

from autoencoder.config import LossConfig, ModelConfig
from autoencoder.discriminator import PatchDiscriminator
from autoencoder.loss import AutoencoderLoss
from autoencoder.model import KLAutoencoder, build_vae
from autoencoder.posterior import DiagonalGaussian

TINY = ModelConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=2, norm_num_groups=8)


class ScaledLogits(nn.Module):
    """A discriminator whose logits are multiplied by `gain` in float32: every adversarial gradient scales with
    it, while the float16 forward is the same network's."""

    def __init__(self, discriminator: nn.Module, gain: float) -> None:
        super().__init__()
        self.discriminator, self.gain = discriminator, gain

    def forward(self, x: Tensor) -> Tensor:
        return self.discriminator(x).float() * self.gain


def adaptive_weight_of_one_step(logvar: float, logit_gain: float, fp16: bool) -> float:
    """The logged d_weight of a generator step of a tiny autoencoder on 8 images of 16 px."""
    torch.manual_seed(0)
    model = KLAutoencoder(build_vae(TINY), logvar_init=logvar)
    disc = ScaledLogits(PatchDiscriminator(3, channels=8, layers=2), logit_gain)
    criterion = AutoencoderLoss(LossConfig(disc_weight=1.0, disc_start=0))
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        x_rec, moments = model(x, torch.Generator().manual_seed(0))
        terms = criterion.generator_loss(x, x_rec, DiagonalGaussian(moments), model.logvar, 0, disc, model.last_layer)
    return float(terms.logs["d_weight"])


@pytest.mark.parametrize(
    ("logvar", "logit_gain"),
    [
        # A large learned variance: each pixel's reconstruction gradient, 2 (x_rec - x) e^-17 / 8 < 3e-8, rounds
        # to 0 in fp16 (and the adversarial one, 1e-4 / #logits at the logits, shrinks below it in the
        # discriminator). The old weight was 0 (fp32: 0.084).
        (17.0, 1e-4),
        # A small learned variance: the reconstruction gradient at the last layer (norm 1e6) overflows fp16.
        # The old weight was inf, clamped to 1e4 (fp32: 1416).
        (-8.0, 1e3),
        # Ordinary magnitudes: nothing under- or overflows, and the weight is unchanged (fp32: 475).
        (0.0, 1.0),
    ],
    ids=["underflow", "overflow", "ordinary"],
)
def test_adaptive_weight_under_fp16_autocast_matches_fp32(logvar, logit_gain):
    fp32 = adaptive_weight_of_one_step(logvar, logit_gain, fp16=False)
    fp16 = adaptive_weight_of_one_step(logvar, logit_gain, fp16=True)
    assert 0 < fp32 < 1e4  # inside the clamp, so a pinned weight cannot pass
    # 2%: the fp16 forward itself moves the weight by 0.5% here.
    assert fp16 == pytest.approx(fp32, rel=0.02)
