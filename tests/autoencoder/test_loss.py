"""The CompVis-style autoencoder loss: the learned-variance NLL, the discriminator phase, LPIPS wiring."""

import math

import pytest
import torch

from autoencoder.config import LossConfig, ModelConfig
from autoencoder.discriminator import PatchDiscriminator, hinge_d_loss
from autoencoder.loss import AutoencoderLoss
from autoencoder.model import KLAutoencoder, build_vae
from autoencoder.posterior import DiagonalGaussian
from tests.host_round_trips import HostRoundTrips

TINY = ModelConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=2, norm_num_groups=8)


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _forward(model: KLAutoencoder, x: torch.Tensor):
    x_rec, moments = model(x, torch.Generator().manual_seed(0))
    return x_rec, DiagonalGaussian(moments)


@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
def test_nll_uses_the_learned_log_variance_and_kl_weight(pixel_loss):
    torch.manual_seed(0)
    model = KLAutoencoder(build_vae(TINY), logvar_init=0.5)
    cfg = LossConfig(kl_weight=1e-3, pixel_loss=pixel_loss)
    x = _batch()
    x_rec, posterior = _forward(model, x)
    terms = AutoencoderLoss(cfg).generator_loss(x, x_rec, posterior, model.logvar, step=0)
    error = (x - x_rec).abs() if pixel_loss == "l1" else (x - x_rec).square()
    nll = (error / math.exp(0.5) + 0.5).sum() / x.shape[0]
    torch.testing.assert_close(terms.loss, nll + 1e-3 * posterior.kl().mean())
    terms.loss.backward()
    assert model.logvar.grad is not None and model.logvar.grad != 0


@pytest.mark.parametrize(
    ("pixel_loss", "decoder"),
    [
        ("l1", lambda mean, logvar: torch.distributions.Laplace(mean, math.exp(logvar))),
        ("l2", lambda mean, logvar: torch.distributions.Normal(mean, math.exp(logvar / 2))),
    ],
)
def test_nll_is_the_decoder_likelihood_up_to_constants(pixel_loss, decoder):
    """l1: the Laplace NLL with scale exp(s); l2: twice the Gaussian NLL with variance exp(s)."""
    x, x_rec, logvar = _batch(1), _batch(2), 0.3
    criterion = AutoencoderLoss(LossConfig(pixel_loss=pixel_loss))
    ours = (criterion.reconstruction(x, x_rec) / math.exp(logvar) + logvar).sum()
    exact = -decoder(x_rec, logvar).log_prob(x).sum() * (2 if pixel_loss == "l2" else 1)
    constant = x.numel() * (math.log(2) if pixel_loss == "l1" else math.log(2 * math.pi))
    torch.testing.assert_close(ours, exact - constant)


def test_pixel_loss_must_be_l1_or_l2():
    with pytest.raises(ValueError, match="pixel_loss"):
        LossConfig(pixel_loss="huber")


def test_discriminator_phase_adaptive_weight_is_finite_and_positive():
    torch.manual_seed(0)
    model = KLAutoencoder(build_vae(TINY))
    disc = PatchDiscriminator(3, channels=8, layers=2)
    criterion = AutoencoderLoss(LossConfig(disc_weight=0.5, disc_start=5))
    x = _batch()

    x_rec, posterior = _forward(model, x)
    before = criterion.generator_loss(x, x_rec, posterior, model.logvar, 4, disc, model.last_layer)
    assert "d_weight" not in before.logs  # the GAN is off before disc_start

    after = criterion.generator_loss(x, x_rec, posterior, model.logvar, 5, disc, model.last_layer)
    weight = after.logs["d_weight"]
    assert math.isfinite(weight) and weight > 0
    assert after.loss.item() != pytest.approx(before.loss.item())
    after.loss.backward()
    assert all(p.grad is None for p in disc.parameters())  # the generator step never trains the discriminator
    assert model.last_layer.grad is not None and torch.isfinite(model.last_layer.grad).all()
    assert all(p.requires_grad for p in disc.parameters())  # and leaves it trainable

    model.zero_grad()
    d_terms = criterion.discriminator_loss(x, x_rec, disc, step=5)
    d_terms.loss.backward()
    assert all(p.grad is None for p in model.parameters())  # the discriminator step never trains the autoencoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())
    assert criterion.discriminator_loss(x, x_rec, disc, step=4).loss.item() == 0.0


def test_hinge_loss_is_zero_for_a_confident_discriminator():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)


def test_lpips_term_with_an_explicitly_random_backbone():
    # A randomly initialized VGG: exercises the code path only; it is not the LPIPS metric.
    import lpips

    random_backbone_lpips = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    criterion = AutoencoderLoss(LossConfig(pixel_loss="l1", lpips_weight=1.0), perceptual=random_backbone_lpips)
    x, x_rec = _batch(0), _batch(1).requires_grad_(True)
    rec = criterion.reconstruction(x, x_rec)
    torch.testing.assert_close(rec, (x - x_rec).abs() + random_backbone_lpips(x, x_rec))
    rec.sum().backward()
    assert x_rec.grad is not None and torch.isfinite(x_rec.grad).all()
    assert all(not p.requires_grad for p in random_backbone_lpips.parameters())


def test_lpips_weight_without_a_network_is_refused():
    with pytest.raises(ValueError, match="lpips_weight"):
        AutoencoderLoss(LossConfig(lpips_weight=1.0))


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16_autocast"])
def test_a_step_of_both_losses_never_waits_for_the_device(fp16):
    """Each .item() in a step is a device-to-host sync on a GPU; the logs stay tensors until a log step."""
    torch.manual_seed(0)
    model = KLAutoencoder(build_vae(TINY))
    disc = PatchDiscriminator(3, channels=8, layers=2)
    criterion = AutoencoderLoss(LossConfig(disc_weight=0.5, disc_start=0))
    x = _batch()
    with HostRoundTrips() as trips, torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        x_rec, posterior = _forward(model, x)
        g_terms = criterion.generator_loss(x, x_rec, posterior, model.logvar, 0, disc, model.last_layer)
        d_terms = criterion.discriminator_loss(x, x_rec, disc, step=0)
    assert trips.total == 0, trips
    logs = g_terms.logs | d_terms.logs
    assert set(logs) == {"rec", "nll", "kl", "logvar", "g_loss", "d_weight", "d_loss", "logits_real", "logits_fake"}
    assert all(v.ndim == 0 and not v.requires_grad and torch.isfinite(v) for v in logs.values())


def test_the_logged_logvar_is_the_steps_value_not_the_parameter():
    model = KLAutoencoder(build_vae(TINY), logvar_init=0.5)
    x = _batch()
    x_rec, posterior = _forward(model, x)
    terms = AutoencoderLoss(LossConfig()).generator_loss(x, x_rec, posterior, model.logvar, step=0)
    with torch.no_grad():
        model.logvar.add_(1.0)  # the optimizer's in-place update, before the runtime reads the logs
    assert float(terms.logs["logvar"]) == 0.5
