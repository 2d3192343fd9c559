"""Image-to-image by SDEdit (Meng et al. 2022): noise an image part-way up the chain, then sample back down."""

from __future__ import annotations

import torch

from ldm.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.diffusion.samplers import sampling_chain


def sdedit_steps(num_steps: int, strength: float) -> int:
    """How many of `num_steps` steps image-to-image at `strength` runs: the last int(n strength)."""
    return int(num_steps * strength)


def sdedit_start(
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    noise: torch.Tensor,
    strength: float,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    karras_sigmas: bool = False,
    fractional_linspace: bool = False,
) -> tuple[torch.Tensor, int]:
    """(x_start, start_step) for a sampler of `num_steps` steps that should run only the last int(n strength):
    x_start = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise at the level k of the first step it runs; pass
    start_step to the sampler. strength 1 starts at the chain's top (pure noise when alphabar_T = 0).
    The chain must be the sampler's: pass `fractional_linspace=True` for Euler ancestral (see `sampling_chain`)."""
    chain = sampling_chain(diffusion, num_steps, spacing, steps_offset, karras_sigmas, 1.0, fractional_linspace)
    return sdedit_start_on(chain, x0, noise, strength)


def sdedit_start_on(
    chain: GaussianDiffusion, x0: torch.Tensor, noise: torch.Tensor, strength: float
) -> tuple[torch.Tensor, int]:
    """`sdedit_start` on the chain a sampler walks (its `Sampler.chain`, e.g. LCM's): x0 noised to the level of the
    first of the chain's last int(n strength) steps, and the start_step that runs them."""
    num_steps = chain.num_timesteps
    steps_run = sdedit_steps(num_steps, strength)
    if not 1 <= steps_run <= num_steps:
        raise ValueError(f"strength {strength} of {num_steps} steps runs {steps_run} steps; it must run 1 to all")
    chain.to(x0.device)
    start_step = num_steps - steps_run
    first = torch.full((x0.shape[0],), steps_run - 1, device=x0.device)  # the chain index of that level
    return chain.q_sample(x0.to(noise.dtype), first, noise), start_step
