"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022), multistep solvers over the data prediction.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and the half log-SNR lambda_t = log(alpha_t / sigma_t),
a step from level s to level t (h = lambda_t - lambda_s > 0) with the model's x0 prediction D is

    ODE (2M):  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D
    SDE (2M):  x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D + sigma_t sqrt(1 - e^{-2h}) z

where the second-order steps use D = m_0 + (m_0 - m_1) / (2 r), r = h_prev / h, from this step's x0 prediction
m_0 and the previous step's m_1 (diffusers' "midpoint" form). The first step after a start and the final step
(to alphabar = 1, where h is infinite) are first order, D = m_0, as in diffusers with `final_sigmas_type="zero"`.

Every coefficient is formed from the float64 schedule on the sample's device and cast once (DESIGN.md). The
formulas are written so the infinite values IEEE arithmetic gives at the ends of a zero-terminal-SNR chain
(lambda = -inf at alphabar = 0, +inf at alphabar = 1) cancel to their limits instead of NaN: the first step
from SNR 0 is then DDIM's, x_t = alpha_t m_0 + sigma_t x_T, and a previous level at SNR 0 has r = inf, D = m_0.
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.diffusion.inpainting import Inpainting
from ldm.diffusion.samplers import ModelFn, SampleOutput, StepCallback, run_chain, sampling_chain
from ldm.diffusion.thresholding import Threshold


def half_log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) = (log abar - log(1 - abar)) / 2; -inf at abar = 0, +inf at abar = 1."""
    return 0.5 * (torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod))


def dpmpp_2m_step(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    previous_x0: torch.Tensor | None,
    noise: torch.Tensor | None = None,
    threshold: Threshold | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++ step of chain `diffusion` from the level of index t to the next (alphabar_prev[t]).
    Returns (x_prev, pred_x0).

    `previous_x0` is the x0 prediction at index t + 1 (None: a first-order step); `noise` None is the ODE
    solver, a standard normal draw the SDE solver. A learned variance in the output is ignored.
    """
    prediction, _ = diffusion.split_output(model_output)
    pred_x0, _ = diffusion.predict_x0_eps(prediction, x_t, t)
    if threshold is not None:
        pred_x0 = threshold(pred_x0)
    x_coef, d_coef, noise_coef, history_coef = dpmpp_coefficients(diffusion, t, x_t, previous_x0 is not None, noise)
    d = pred_x0 if previous_x0 is None else pred_x0 + history_coef * (pred_x0 - previous_x0)
    x_prev = x_coef * x_t + d_coef * d
    if noise is not None:
        x_prev = x_prev + noise_coef * noise
    return x_prev, pred_x0


def dpmpp_coefficients(
    diffusion: GaussianDiffusion, t: torch.Tensor, like: torch.Tensor, second_order: bool, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's coefficients of x_s, of D, of z and 1 / (2 r), from float64 and cast once to like's dtype."""
    c = diffusion.coefficients(t.device)
    abar_s, abar_t = c.alphas_cumprod[t], c.alphas_cumprod_prev[t]  # (B,) float64
    lambda_s, lambda_t = half_log_snr(abar_s), half_log_snr(abar_t)
    h = lambda_t - lambda_s
    alpha_t, sigma_t, sigma_s = abar_t.sqrt(), (1 - abar_t).sqrt(), (1 - abar_s).sqrt()
    if noise is None:
        x_coef = sigma_t / sigma_s
        d_coef = -alpha_t * torch.expm1(-h)
        noise_coef = torch.zeros_like(h)
    else:
        x_coef = sigma_t / sigma_s * torch.exp(-h)
        d_coef = -alpha_t * torch.expm1(-2 * h)
        noise_coef = sigma_t * (-torch.expm1(-2 * h)).sqrt()
    if second_order:  # the previous step was taken from index t + 1
        r = (lambda_s - half_log_snr(c.alphas_cumprod[t + 1])) / h
        history_coef = 0.5 / r
    else:
        history_coef = torch.zeros_like(h)
    shape = (t.shape[0], *([1] * (like.ndim - 1)))
    return tuple(v.to(like.dtype).reshape(shape) for v in (x_coef, d_coef, noise_coef, history_coef))


@torch.no_grad()
def sample_dpmpp_2m(
    model: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: torch.Tensor,
    *,
    num_steps: int = 20,
    spacing: str = "leading",
    steps_offset: int = 0,
    karras_sigmas: bool = False,
    sde: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    threshold: Threshold | None = None,
    start_step: int = 0,
    inpaint: Inpainting | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> SampleOutput:
    """DPM-Solver++(2M) over `num_steps` spaced timesteps (or Karras sigmas); `sde` draws noise at every step
    (DPM-Solver++(2M) SDE). One model evaluation per step."""
    chain = sampling_chain(diffusion, num_steps, spacing, steps_offset, karras_sigmas)
    predictions: dict[int, torch.Tensor] = {}  # chain index -> x0 predicted there (kept across RePaint's redos)

    def step(output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if sde else None
        previous = predictions.get(index + 1) if index > 0 else None  # the final step is first order
        x_prev, pred_x0 = dpmpp_2m_step(chain, output, x, t, previous, noise, threshold)
        predictions[index] = pred_x0
        predictions.pop(index + 2, None)
        return x_prev, pred_x0

    return run_chain(
        model, chain, x_T, step, model_kwargs=model_kwargs, start_step=start_step, inpaint=inpaint,
        generator=generator, return_trajectory=return_trajectory, callback=callback, progress=progress,
        name="DPM++ 2M SDE" if sde else "DPM++ 2M",
    )  # fmt: skip


def sample_dpmpp_2m_sde(model: ModelFn, diffusion: GaussianDiffusion, x_T: torch.Tensor, **kwargs: Any) -> SampleOutput:
    """DPM-Solver++(2M) SDE: `sample_dpmpp_2m` with noise at every step; takes the same keyword arguments."""
    return sample_dpmpp_2m(model, diffusion, x_T, sde=True, **kwargs)
