"""Clipping of the predicted x0 during sampling: static, and Imagen's dynamic thresholding; and which of them a
model folder's scheduler config asks of each sampler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from einops import rearrange


class Threshold(Protocol):
    def __call__(self, x0: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class StaticThreshold:
    """Clamp the predicted x0 to [-limit, limit] (data in [-1, 1] uses limit 1)."""

    limit: float = 1.0

    def __post_init__(self) -> None:
        if not self.limit > 0:
            raise ValueError(f"limit: must be > 0, got {self.limit}")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-self.limit, self.limit)


@dataclass(frozen=True)
class DynamicThreshold:
    """Imagen's dynamic thresholding (Saharia et al. 2022), per sample:
    s = clamp(quantile(|x0|, percentile), 1, max_value); x0 <- clamp(x0, -s, s) / s."""

    percentile: float = 0.995
    max_value: float = float("inf")

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 1.0:
            raise ValueError(f"percentile: must be in (0, 1], got {self.percentile}")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        flat = rearrange(x0, "b ... -> b (...)")
        # torch.quantile wants float32/64; half-precision samples are thresholded in float32.
        magnitudes = flat.abs() if x0.dtype in (torch.float32, torch.float64) else flat.abs().float()
        s = torch.quantile(magnitudes, self.percentile, dim=1).clamp(1.0, self.max_value)
        s = s.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s


class FolderClipping(NamedTuple):
    """Which of a diffusers scheduler config's x0-clipping keys a sampler reads."""

    clip_sample: bool  # clip_sample, clip_sample_range: clamp x0 to +-range
    thresholding: bool  # thresholding, dynamic_thresholding_ratio, sample_max_value: DynamicThreshold


def folder_threshold_for(
    reads: FolderClipping,
    *,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
) -> DynamicThreshold | StaticThreshold | None:
    """The clipping of x0 a sampler that `reads` these keys (its `Sampler.folder_clipping`) applies for a folder's
    scheduler config (diffusers' keys and defaults), as diffusers' scheduler of that algorithm applies it: dynamic
    thresholding when asked for and read, else the static clamp when asked for and read (`thresholding` wins, as
    diffusers checks it first), else None."""
    if thresholding and reads.thresholding:
        return DynamicThreshold(dynamic_thresholding_ratio, sample_max_value)
    if clip_sample and reads.clip_sample:
        return StaticThreshold(clip_sample_range)
    return None
