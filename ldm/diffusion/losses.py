"""Training objectives: L_simple, min-SNR-gamma weighting, and L_hybrid for learned variances."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from ldm.diffusion.gaussian_diffusion import GaussianDiffusion, Prediction, Variance
from ldm.diffusion.vlb import Decoder, mean_flat, vlb_terms_bpd

MinSnrOf = Literal["snr", "snr_plus_one"]
MIN_SNR_OF: tuple[str, ...] = ("snr", "snr_plus_one")


def min_snr_weight(diffusion: GaussianDiffusion, t: torch.Tensor, gamma: float, of: MinSnrOf = "snr") -> torch.Tensor:
    """Per-sample loss weight of min-SNR-gamma (Hang et al. 2023), for the network's own target.

    An error in the predicted x0 costs SNR times as much in the eps loss and SNR + 1 times in the v loss.
    Min-SNR-gamma makes that cost w0 = min(SNR, gamma) whatever the target: the weight is w0 / SNR for eps,
    w0 / (SNR + 1) for v, w0 for x0. With `of="snr_plus_one"`, w0 = min(SNR + 1, gamma): the v loss's own
    weighting with the same cap, so high-noise steps (SNR near 0, where the layout is decided) keep a cost of
    about 1 instead of about SNR.
    """
    snr = diffusion.snr(t)
    if of not in MIN_SNR_OF:
        raise ValueError(f"min_snr_of: unknown {of!r}; valid: {', '.join(MIN_SNR_OF)}")
    clipped = (snr + 1 if of == "snr_plus_one" else snr).clamp(max=gamma)
    if diffusion.prediction is Prediction.EPS:
        weight = clipped / snr
    elif diffusion.prediction is Prediction.V:
        weight = clipped / (snr + 1)
    else:
        weight = clipped
    # SNR = 0 (zero-terminal-SNR schedules): the eps weight is 0/0; such steps keep weight 1.
    return torch.where(snr == 0, torch.ones_like(weight), weight)


def training_losses(
    diffusion: GaussianDiffusion,
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None = None,
    model_kwargs: dict[str, Any] | None = None,
    *,
    min_snr_gamma: float | None = None,
    min_snr_of: MinSnrOf = "snr",
    vlb_weight: float = 0.001,
    decoder: Decoder = "gaussian",
) -> dict[str, torch.Tensor]:
    """Per-sample training losses at timesteps t, each of shape (B,).

    - `mse`: L_simple, the mean squared error against the eps / x0 / v target, optionally weighted by
      min-SNR-gamma (of the SNR or of SNR + 1, see `min_snr_weight`).
    - `vb` (learned_range only): lambda * T * L_t in bits/dim, with lambda = `vlb_weight` (0.001 in
      Nichol & Dhariwal): a one-sample estimate of lambda * L_vlb. The network's mean prediction enters
      it through a stop-gradient, so the bound only trains the variance.
    - `loss`: mse (+ vb), L_hybrid for learned_range.
    """
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = diffusion.q_sample(x0, t, noise)
    output = model(x_t, diffusion.model_timesteps(t), **(model_kwargs or {}))
    prediction, var_values = diffusion.split_output(output)
    if prediction.shape != x0.shape:
        raise ValueError(
            f"model output {tuple(output.shape)} does not fit data {tuple(x0.shape)} "
            f"(variance {diffusion.variance.value!r} needs {diffusion.output_channels_factor}x the channels)"
        )
    target = diffusion.training_target(x0, t, noise)
    mse = mean_flat((prediction.float() - target.float()) ** 2)
    if min_snr_gamma is not None:
        mse = mse * min_snr_weight(diffusion, t, min_snr_gamma, min_snr_of)
    terms = {"mse": mse}
    if diffusion.variance is Variance.LEARNED_RANGE:
        frozen = torch.cat([prediction.detach(), var_values], dim=1)
        vb = vlb_terms_bpd(diffusion, frozen.float(), x0.float(), x_t.float(), t, decoder)
        terms["vb"] = vb * (vlb_weight * diffusion.num_timesteps)
    terms["loss"] = terms["mse"] + terms.get("vb", 0.0)
    return terms
