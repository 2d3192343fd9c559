"""Where training spends its steps: the distribution of the timestep t each example is noised to.

`uniform` is DDPM's t ~ U{0, ..., T-1}. `logit_normal` is Esser et al. 2024 (Stable Diffusion 3): t / T =
sigmoid(u), u ~ N(mean, std^2), discretized to the step whose interval holds it. It puts the steps where the
loss is hardest to lower, in the middle of the noise range; mean > 0 moves them towards high noise, where the
layout of an image is decided.
"""

from __future__ import annotations

from typing import Literal

import torch

TimestepSampling = Literal["uniform", "logit_normal"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "logit_normal")


def sample_timesteps(
    batch_size: int,
    num_timesteps: int,
    sampling: TimestepSampling = "uniform",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`batch_size` integer timesteps in [0, num_timesteps - 1], drawn on `device`."""
    if sampling == "uniform":
        return torch.randint(0, num_timesteps, (batch_size,), device=device, generator=generator)
    if sampling == "logit_normal":
        u = torch.randn(batch_size, device=device, generator=generator) * logit_std + logit_mean
        return (torch.sigmoid(u) * num_timesteps).long().clamp(max=num_timesteps - 1)
    raise ValueError(f"timestep sampling: unknown {sampling!r}; valid: {', '.join(TIMESTEP_SAMPLINGS)}")


def logit_normal_probabilities(num_timesteps: int, logit_mean: float, logit_std: float) -> torch.Tensor:
    """P(t = k) under discretized logit-normal sampling, in closed form (float64): the normal CDF between the
    logits of k / T and (k + 1) / T."""
    edges = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    logits = torch.logit(edges)  # -inf and +inf at the ends, where the CDF is 0 and 1
    cdf = torch.special.ndtr((logits - logit_mean) / logit_std)
    return cdf[1:] - cdf[:-1]
