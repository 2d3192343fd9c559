"""Walking between samples: spherical interpolation of Gaussian noise."""

from __future__ import annotations

import torch
from einops import rearrange


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float, parallel: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation per sample: (sin((1 - w) theta) a + sin(w theta) b) / sin theta, with theta the
    angle between a[i] and b[i] flattened; w = 0 gives a, w = 1 gives b.

    Two draws of N(0, I) in many dimensions are nearly orthogonal and of norm ~sqrt(d); the straight line
    between them passes through norms ~sqrt(d / 2), noise a model has never seen, while the arc keeps the
    norm. Nearly parallel pairs (cos theta > `parallel`) are interpolated linearly, where the arc is a line.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp: a has shape {tuple(a.shape)} but b has {tuple(b.shape)}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"slerp: weight must be in [0, 1], got {weight}")
    precision = torch.float64 if a.dtype == torch.float64 else torch.float32  # MPS has no float64
    a_, b_ = a.to(precision), b.to(precision)
    flat_a, flat_b = rearrange(a_, "b ... -> b (...)"), rearrange(b_, "b ... -> b (...)")
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1))
    theta = cos.clamp(-1, 1).arccos()
    sin = theta.sin()
    spherical_a, spherical_b = ((1 - weight) * theta).sin() / sin, (weight * theta).sin() / sin
    linear = cos.abs() > parallel
    coef_a = torch.where(linear, torch.full_like(cos, 1 - weight), spherical_a)
    coef_b = torch.where(linear, torch.full_like(cos, weight), spherical_b)
    shape = (a.shape[0], *([1] * (a.ndim - 1)))
    return (coef_a.reshape(shape) * a_ + coef_b.reshape(shape) * b_).to(a.dtype)
