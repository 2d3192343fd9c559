"""The encoder's posterior q(z | x): a diagonal Gaussian over the latent grid."""

from __future__ import annotations

import torch
from torch import Tensor

# diffusers and CompVis clamp the log-variance to this range so exp() cannot overflow or vanish.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """q(z | x) = N(mu, diag(sigma^2)), built from the encoder's moments (B, 2C, h, w) = [mu, log sigma^2]."""

    def __init__(self, moments: Tensor) -> None:
        if moments.ndim < 2 or moments.shape[1] % 2:
            raise ValueError(f"moments: expected (B, 2C, ...) with an even channel count, got {tuple(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterized draw z = mu + sigma * eps, eps ~ N(0, I), so gradients reach mu and sigma."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The most likely latent, mu (what evaluation reconstructs from)."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per example, summed over latent dims: 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2) >= 0.

        In float32 at least, whatever the moments' dtype: sigma^2 - 1 - log sigma^2 cancels to (log sigma^2)^2 / 2
        near N(0, 1), which bfloat16 rounds away, and sigma^2 overflows float16 above log sigma^2 = 11. expm1
        keeps that cancellation exact in float32 too.
        """
        dtype = torch.promote_types(self.mean.dtype, torch.float32)
        mean, logvar = self.mean.to(dtype), self.logvar.to(dtype)
        per_dim = 0.5 * (mean.square() + torch.expm1(logvar) - logvar)  # sigma^2 - 1 = expm1(log sigma^2)
        return per_dim.flatten(1).sum(dim=1)  # (B,)
