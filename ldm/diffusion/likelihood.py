"""Gaussian KL divergences and decoder log-likelihoods, elementwise and in nats."""

from __future__ import annotations

import math

import torch


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats:
    1/2 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1)."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, e^log_variance) elementwise, in nats: the decoder term for continuous data (latents)."""
    return -0.5 * (math.log(2 * math.pi) + log_variance + (x - mean) ** 2 * torch.exp(-log_variance))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, num_bins: int = 256
) -> torch.Tensor:
    """log P(x) for x in [-1, 1] quantized to `num_bins` levels, under N(mean, e^(2 log_scale)) integrated
    over each level's bin, the outer bins extended to +-infinity (Ho et al. 2020), in nats."""
    half_bin = 1.0 / (num_bins - 1)
    inv_std = torch.exp(-log_scale)
    low = inv_std * (x - mean - half_bin)  # the bin's edges in standard units
    high = inv_std * (x - mean + half_bin)
    # P(low < Z < high) = Phi(high) - Phi(low). Above the mean both CDFs are near 1 and the difference
    # cancels; there, use the mirror image Phi(-low) - Phi(-high), which is the same number.
    above = (low + high) > 0
    lo, hi = torch.where(above, -high, low), torch.where(above, -low, high)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    mid = log_hi + torch.log(-torch.expm1(log_lo - log_hi))  # log(Phi(hi) - Phi(lo)), no cancellation
    low_edge = torch.special.log_ndtr(high)  # the first bin: P(Z < high)
    high_edge = torch.special.log_ndtr(-low)  # the last bin: P(Z > low)
    return torch.where(x < -1 + 1e-3, low_edge, torch.where(x > 1 - 1e-3, high_edge, mid))
