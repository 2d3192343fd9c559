"""The posterior's KL and reparameterized sample, pinned against torch.distributions."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from autoencoder.posterior import LOGVAR_MAX, LOGVAR_MIN, DiagonalGaussian


def _moments(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64)  # (B, 2C, h, w), C = 4


def test_kl_matches_torch_distributions_and_is_nonnegative():
    moments = _moments().requires_grad_(True)
    posterior = DiagonalGaussian(moments)
    mean, logvar = moments.chunk(2, dim=1)
    reference = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(posterior.kl(), reference)
    assert (posterior.kl() > 0).all()
    (grad,) = torch.autograd.grad(posterior.kl().sum(), moments)
    (grad_ref,) = torch.autograd.grad(reference.sum(), moments)
    torch.testing.assert_close(grad, grad_ref)


def test_kl_is_zero_at_the_prior():
    assert DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl().abs().max() == 0


def test_sample_and_its_gradients_match_rsample():
    moments = _moments(1).requires_grad_(True)
    mean, logvar = moments.chunk(2, dim=1)
    z = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(7))
    torch.manual_seed(7)  # rsample draws eps from the global generator with the same stream
    z_ref = Normal(mean, torch.exp(0.5 * logvar)).rsample()
    torch.testing.assert_close(z, z_ref)
    weights = torch.randn(z.shape, dtype=z.dtype)  # a generic downstream loss
    (grad,) = torch.autograd.grad((weights * z).sum(), moments)
    (grad_ref,) = torch.autograd.grad((weights * z_ref).sum(), moments)
    torch.testing.assert_close(grad, grad_ref)


def test_sample_is_reproducible_with_a_generator_and_mode_is_the_mean():
    posterior = DiagonalGaussian(_moments(2))
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(posterior.mode(), posterior.mean)


def test_logvar_is_clamped():
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([[[[-100.0]], [[100.0]]]])], dim=1)
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.min() == LOGVAR_MIN and posterior.logvar.max() == LOGVAR_MAX
    assert torch.isfinite(posterior.kl()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_of_half_precision_moments_is_exact_in_float32(dtype):
    # Near the prior, sigma^2 - 1 - log sigma^2 ~ (log sigma^2)^2 / 2: bfloat16 arithmetic lost 22% of the KL here.
    g = torch.Generator().manual_seed(0)
    moments = torch.cat([0.05 * torch.randn(2, 4, 8, 8, generator=g), 0.02 * torch.randn(2, 4, 8, 8, generator=g)], 1)
    half = moments.to(dtype)  # what the encoder returns under autocast
    kl = DiagonalGaussian(half).kl()
    torch.testing.assert_close(kl.float(), DiagonalGaussian(half.double()).kl().float(), rtol=1e-4, atol=0)
    assert kl.dtype == torch.float32


def test_kl_of_float16_moments_with_a_large_variance_is_finite():
    # sigma^2 = e^12 is above float16's maximum (65504); the old KL was inf.
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 12.0)], dim=1)
    kl = DiagonalGaussian(moments.half()).kl()
    torch.testing.assert_close(kl.float(), DiagonalGaussian(moments.double()).kl().float())
