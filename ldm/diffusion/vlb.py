"""The variational bound -log p(x0) <= L_T + sum_{t>=1} L_{t-1} + L_0, in bits per dimension."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from einops import reduce
from tqdm.auto import tqdm

from ldm.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.diffusion.likelihood import discretized_gaussian_log_likelihood, gaussian_log_likelihood, normal_kl
from ldm.diffusion.thresholding import Threshold

Decoder = Literal["gaussian", "discretized"]
LN2 = math.log(2.0)


class BoundTerms(NamedTuple):
    """The bound of each sample in bits/dim: `total` = `prior` + `terms`.sum(1); `terms[:, t]` is L_t."""

    total: torch.Tensor  # (B,)
    prior: torch.Tensor  # (B,)
    terms: torch.Tensor  # (B, T)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return reduce(x, "b ... -> b", "mean")


def decoder_nll_bpd(x0: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor, decoder: Decoder) -> torch.Tensor:
    """L_0 = -log p(x0 | x_1) in bits/dim: a Gaussian density for continuous data (latents), or
    Ho et al.'s discretized Gaussian for 8-bit data scaled to [-1, 1]."""
    if decoder == "gaussian":
        log_likelihood = gaussian_log_likelihood(x0, mean, log_variance)
    elif decoder == "discretized":
        log_likelihood = discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)
    else:
        raise ValueError(f"decoder must be 'gaussian' or 'discretized', got {decoder!r}")
    return -mean_flat(log_likelihood) / LN2


def vlb_terms_bpd(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    decoder: Decoder = "gaussian",
    threshold: Threshold | None = None,
) -> torch.Tensor:
    """L_t for each sample in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t >= 1, the decoder
    NLL at t = 0. Shape (B,)."""
    true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
    p = diffusion.p_mean_variance(model_output, x_t, t, threshold)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, p.mean, p.log_variance)) / LN2
    nll = decoder_nll_bpd(x0, p.mean, p.log_variance, decoder)
    return torch.where(t == 0, nll, kl)


def prior_bpd(diffusion: GaussianDiffusion, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) in bits/dim; near 0 for a well-designed schedule. Shape (B,)."""
    t = torch.full((x0.shape[0],), diffusion.num_timesteps - 1, device=x0.device, dtype=torch.long)
    mean, _, log_variance = diffusion.q_mean_variance(x0, t)
    zeros = torch.zeros_like(mean)
    return mean_flat(normal_kl(mean, log_variance, zeros, zeros)) / LN2


@torch.no_grad()
def bits_per_dim(
    diffusion: GaussianDiffusion,
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    model_kwargs: dict[str, Any] | None = None,
    decoder: Decoder = "gaussian",
    threshold: Threshold | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> BoundTerms:
    """Evaluate the full variational bound of `model` on a batch, one forward pass per timestep."""
    model_kwargs = model_kwargs or {}
    batch = x0.shape[0]
    terms = torch.zeros(batch, diffusion.num_timesteps, device=x0.device, dtype=torch.float64)
    for step in tqdm(range(diffusion.num_timesteps - 1, -1, -1), desc="bound", disable=not progress):
        t = torch.full((batch,), step, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = diffusion.q_sample(x0, t, noise)
        output = model(x_t, diffusion.model_timesteps(t), **model_kwargs)
        terms[:, step] = vlb_terms_bpd(diffusion, output, x0, x_t, t, decoder, threshold).double()
    prior = prior_bpd(diffusion, x0).double()
    return BoundTerms(prior + terms.sum(dim=1), prior, terms)
