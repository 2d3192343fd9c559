"""Inpainting with any trained model, as RePaint does it (Lugmayr et al. 2022).

The model never sees the mask. After every reverse step to the level alphabar', the known region is replaced
by the original noised to that level, x' <- m x' + (1 - m) (sqrt(alphabar') x0 + sqrt(1 - alphabar') z), so the
repainted region is drawn conditioned on what the known region will look like at every level. RePaint's
resampling redoes each step: it noises the blended x' one step back up with q(x_t | x') and denoises again,
which lets the two regions agree better than one pass does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.diffusion.gaussian_diffusion import GaussianDiffusion


@dataclass(frozen=True)
class Inpainting:
    """What to keep and what to repaint: `known` is the clean sample (B, C, ...), `mask` broadcasts against it
    with 1 where the sampler repaints and 0 where `known` is kept; `resample` passes per step (1 = no jumps)."""

    known: torch.Tensor
    mask: torch.Tensor
    resample: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.resample, int) and self.resample >= 1):
            raise ValueError(f"resample must be an int >= 1, got {self.resample!r}")
        try:
            torch.broadcast_shapes(self.mask.shape, self.known.shape)
        except RuntimeError as err:
            raise ValueError(
                f"mask of shape {tuple(self.mask.shape)} does not broadcast against the known sample's "
                f"{tuple(self.known.shape)}"
            ) from err

    def keep_known(
        self, chain: GaussianDiffusion, x_prev: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """x_prev (at the level alphabar_prev of chain index t) with the known region replaced by a draw of
        q(x | known) at that level: m x_prev + (1 - m) (sqrt(abar_prev) known + sqrt(1 - abar_prev) z)."""
        c = chain.coefficients(t.device)
        abar_prev = chain.gather(c.alphas_cumprod_prev, t, x_prev)
        noise = torch.randn(x_prev.shape, generator=generator, device=x_prev.device, dtype=x_prev.dtype)
        noisy_known = abar_prev.sqrt() * self.known.to(x_prev.dtype) + (1 - abar_prev).sqrt() * noise
        return torch.lerp(noisy_known, x_prev, self.mask.to(x_prev.dtype))

    @staticmethod
    def renoise(
        chain: GaussianDiffusion, x_prev: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """One forward step back up from the level of x_prev to that of chain index t:
        q(x_t | x_prev) = N(sqrt(1 - beta_t) x_prev, beta_t I), beta_t = 1 - alphabar_t / alphabar_prev."""
        c = chain.coefficients(t.device)
        beta = chain.gather(c.betas, t, x_prev)
        noise = torch.randn(x_prev.shape, generator=generator, device=x_prev.device, dtype=x_prev.dtype)
        return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise
