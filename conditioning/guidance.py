"""Classifier-free guidance on the text side: caption dropout at training time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from conditioning.tokenizer import validate_prompts


def drop_captions(captions: Sequence[str], p_uncond: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by "" independently with probability `p_uncond` (Ho & Salimans 2021).

    One model then learns both eps(x_t, c) and eps(x_t, "") = eps_u, which guidance combines at sampling
    time as eps~ = eps_u + w (eps_c - eps_u). The draws come from `generator` (CPU), so a seeded run
    drops the same captions.
    """
    captions = validate_prompts(captions, name="captions")
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond: is a probability, must be in [0, 1], got {p_uncond}")
    drop = torch.rand(len(captions), generator=generator) < p_uncond  # (B,) Bernoulli(p_uncond)
    return ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
