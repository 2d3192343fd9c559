"""Classifier-free guidance (Ho & Salimans 2021) as a wrapper around a model callable."""

from __future__ import annotations

from typing import Any

import torch

from ldm.diffusion.samplers import ModelFn


def classifier_free_guidance(
    model: ModelFn, guidance_scale: float, uncond_kwargs: dict[str, Any], rescale: float = 0.0
) -> ModelFn:
    """Wrap `model` so that one batched forward pass over [unconditional; conditional] inputs returns
    out_u + w (out_c - out_u), w = `guidance_scale` (w = 1: no guidance, the conditional output itself).

    `rescale` = phi > 0 pulls the guided output's per-sample standard deviation back towards the conditional
    output's (Lin et al. 2023, eq. 15-16): out <- phi out std(out_c) / std(out) + (1 - phi) out. Large w
    inflates that spread, which with v prediction and zero terminal SNR overexposes images.

    `uncond_kwargs` pairs with the conditioning kwargs the sampler passes (e.g. the embedding of "");
    a batch of one is broadcast. When the output also carries a learned variance (twice the input's
    channels), only the mean half is guided and the variance comes from the conditional pass.
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if guidance_scale == 1.0:
        return model

    def guided(x: torch.Tensor, t: torch.Tensor, **cond_kwargs: Any) -> torch.Tensor:
        paired = {name: _pair(uncond_kwargs.get(name), value, name) for name, value in cond_kwargs.items()}
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), **paired).chunk(2)
        channels = x.shape[1]
        guided_mean = out_uncond[:, :channels] + guidance_scale * (out_cond[:, :channels] - out_uncond[:, :channels])
        if rescale > 0:
            guided_mean = rescale_guidance(guided_mean, out_cond[:, :channels], rescale)
        return torch.cat([guided_mean, out_cond[:, channels:]], dim=1)

    return guided


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """phi guided std(conditional) / std(guided) + (1 - phi) guided, the std taken per sample (Lin et al. 2023)."""
    dims = list(range(1, guided.ndim))
    ratio = conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return torch.lerp(guided, guided * ratio, phi)


def _pair(uncond: Any, cond: Any, name: str) -> Any:
    """Stack the unconditional value above the conditional one along the batch dimension."""
    if not isinstance(cond, torch.Tensor):
        return cond  # non-tensor options (flags) are shared by both halves
    if not isinstance(uncond, torch.Tensor):
        raise ValueError(f"classifier-free guidance: no unconditional tensor given for {name!r}")
    if uncond.shape[0] == 1 and cond.shape[0] != 1:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    if uncond.shape != cond.shape:
        raise ValueError(
            f"classifier-free guidance: unconditional {name!r} has shape {tuple(uncond.shape)}, "
            f"conditional has {tuple(cond.shape)}"
        )
    return torch.cat([uncond, cond])
