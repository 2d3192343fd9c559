"""Samplers: ancestral DDPM, DDIM and Euler ancestral, each a plain function over a model callable, and the
chain loop every sampler (also DPM-Solver++, `ldm.diffusion.dpm_solver`) runs in.

A model is any callable `model(x_t, t, **model_kwargs) -> output`, where t holds the timestep values
the network was trained on. Sampling over a subset of timesteps runs on the respaced process
(`GaussianDiffusion.respaced`), so every formula uses the alphabar of the previous timestep *in the
subset*. One `torch.Generator` drives all the noise, so a seed fixes the result.

No step waits for the host or copies from it: the schedule arrays and every step's timesteps are put on
x_T's device before the loop, and each step is picked by the loop's Python index.

Every sampler can start part-way down its chain (`start_step`, for image-to-image) and repaint a masked
region while keeping the rest (`inpaint`, RePaint).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.diffusion.inpainting import Inpainting
from ldm.diffusion.schedules import karras_noise_levels, spaced_timesteps
from ldm.diffusion.thresholding import Threshold

ModelFn = Callable[..., torch.Tensor]
# callback(step_index, t_value, x_prev, pred_x0), called after every step.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
# step(model_output, x_t, t, index) -> (x_prev, pred_x0): one update from the level of chain index t to the next.
ChainStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class SampleOutput(NamedTuple):
    sample: torch.Tensor  # x_0, (B, C, ...)
    trajectory: torch.Tensor | None  # x_T, ..., x_0 stacked: (steps + 1, B, C, ...), when asked for


def ddpm_step(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None,
    threshold: Threshold | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with sigma_t = exp(log Sigma_t / 2) the
    standard deviation (sqrt(beta~_t) for fixed_small), and no noise at t = 0. Returns (x_{t-1}, pred_x0)."""
    p = diffusion.p_mean_variance(model_output, x_t, t, threshold)
    if noise is None:
        return p.mean, p.pred_x0
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return p.mean + nonzero * torch.exp(0.5 * p.log_variance) * noise, p.pred_x0


def ddim_step(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    threshold: Threshold | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2020, eq. 12). Returns (x_prev, pred_x0):
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev).
    A learned variance in the output is ignored. A threshold clips x0 and leaves eps the model's, as diffusers'
    DDIMScheduler does (improved-diffusion re-derives eps from the clipped x0; diffusers calls that
    `use_clipped_model_output`), so a folder that asks for clipping samples as diffusers samples it."""
    prediction, _ = diffusion.split_output(model_output)
    pred_x0, pred_eps = diffusion.predict_x0_eps(prediction, x_t, t)
    if threshold is not None:
        pred_x0 = threshold(pred_x0)
    x0_coef, eps_coef, sigma = ddim_coefficients(diffusion, t, eta, x_t)
    x_prev = x0_coef * pred_x0 + eps_coef * pred_eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def ddim_coefficients(
    diffusion: GaussianDiffusion, t: torch.Tensor, eta: float, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sqrt(abar_prev), sqrt(1 - abar_prev - sigma^2) and sigma at t, shaped to broadcast against `like`.

    Formed from the float64 arrays and cast once to like's dtype: in bf16, 1 - abar_t / abar_prev and
    1 - abar_prev - sigma^2 cancel to negative numbers near t = 0, and their square roots are NaN.
    """
    coef = diffusion.coefficients(t.device)
    abar_t = coef.alphas_cumprod[t]  # (B,) float64
    abar_prev = coef.alphas_cumprod_prev[t]
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
    eps_coef = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
    shape = (t.shape[0], *([1] * (like.ndim - 1)))
    return tuple(c.to(like.dtype).reshape(shape) for c in (abar_prev.sqrt(), eps_coef, sigma))


def sampling_chain(
    diffusion: GaussianDiffusion,
    num_steps: int | None,
    spacing: str = "leading",
    steps_offset: int = 0,
    karras_sigmas: bool = False,
    final_alphabar: float = 1.0,
    fractional_linspace: bool = False,
) -> GaussianDiffusion:
    """The process a sampler walks: the full chain, its respacing to `num_steps` timesteps, or with `karras_sigmas`
    the `num_steps` Karras et al. noise levels between the chain's smallest and largest sigma (each told to the
    network as the timestep of its sigma, interpolated in log sigma and rounded, as diffusers does; `spacing`
    then plays no part). Its last step lands on `final_alphabar` (see `GaussianDiffusion.at_levels`).

    `fractional_linspace` is how diffusers' Euler schedulers read `linspace` spacing: the timesteps
    t_i = i (T - 1) / (n - 1) are not rounded, each level's sigma = sqrt((1 - abar) / abar) is interpolated
    linearly in t between the chain's integer timesteps, and the network is told the fractional t_i.
    DDIM, DDPM and DPM-Solver round them (the default). Other spacings are integer either way."""
    if karras_sigmas:
        return _karras_chain(diffusion, diffusion.num_timesteps if num_steps is None else num_steps, final_alphabar)
    num_steps = diffusion.num_timesteps if num_steps is None else num_steps
    if fractional_linspace and spacing == "linspace":
        return _fractional_linspace_chain(diffusion, num_steps, final_alphabar)
    if num_steps == diffusion.num_timesteps and steps_offset == 0 and final_alphabar == diffusion.final_alphabar:
        return diffusion
    timesteps = spaced_timesteps(diffusion.num_timesteps, num_steps, spacing, steps_offset)
    return diffusion.respaced(timesteps, final_alphabar)


def _karras_chain(diffusion: GaussianDiffusion, num_steps: int, final_alphabar: float) -> GaussianDiffusion:
    abar = diffusion.coef.alphas_cumprod.numpy()
    if abar[-1] == 0:
        raise ValueError(
            "karras_sigmas: a zero-terminal-SNR schedule has sigma_max = inf, which Karras sigmas cannot span; "
            "use the schedule's own timesteps"
        )
    log_sigmas = 0.5 * (np.log1p(-abar) - np.log(abar))  # ascending in t
    sigmas = karras_noise_levels(float(np.exp(log_sigmas[0])), float(np.exp(log_sigmas[-1])), num_steps)[::-1]
    timesteps = np.interp(np.log(sigmas), log_sigmas, np.arange(len(abar))).round().astype(np.int64)
    return diffusion.at_levels(1.0 / (1.0 + sigmas**2), timesteps, final_alphabar)


def _fractional_linspace_chain(
    diffusion: GaussianDiffusion, num_steps: int, final_alphabar: float
) -> GaussianDiffusion:
    spaced_timesteps(diffusion.num_timesteps, num_steps, "linspace")  # the same checks of num_steps
    # diffusers: np.linspace(0, T - 1, n, dtype=np.float32), and np.interp of its sigmas at those t.
    timesteps = np.linspace(0, diffusion.num_timesteps - 1, num_steps, dtype=np.float32).astype(np.float64)
    abar = diffusion.coef.alphas_cumprod.numpy()
    with np.errstate(divide="ignore"):  # zero terminal SNR: sigma_{T-1} = inf, visited only at t = T - 1 itself
        sigmas = np.interp(timesteps, np.arange(len(abar)), np.sqrt((1 - abar) / abar))
    return diffusion.at_levels(1.0 / (1.0 + sigmas**2), timesteps, final_alphabar)


@torch.no_grad()
def sample_ddpm(
    model: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: torch.Tensor,
    *,
    num_steps: int | None = None,
    spacing: str = "leading",
    steps_offset: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    karras_sigmas: bool = False,
    threshold: Threshold | None = None,
    start_step: int = 0,
    inpaint: Inpainting | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> SampleOutput:
    """Ancestral sampling from x_T down to x_0, over all T steps or a respaced subset of `num_steps`."""
    chain = sampling_chain(diffusion, num_steps, spacing, steps_offset, karras_sigmas)

    def step(output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = None if index == 0 else _randn_like(x, generator)  # the index, not t: reading t would sync
        return ddpm_step(chain, output, x, t, noise, threshold)

    return run_chain(
        model, chain, x_T, step, model_kwargs=model_kwargs, start_step=start_step, inpaint=inpaint,
        generator=generator, return_trajectory=return_trajectory, callback=callback, progress=progress, name="DDPM",
    )  # fmt: skip


@torch.no_grad()
def sample_ddim(
    model: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: torch.Tensor,
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    spacing: str = "leading",
    steps_offset: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    karras_sigmas: bool = False,
    threshold: Threshold | None = None,
    start_step: int = 0,
    inpaint: Inpainting | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    callback: StepCallback | None = None,
    progress: bool = True,
    name: str = "DDIM",
    final_alphabar: float = 1.0,
    fractional_linspace: bool = False,
) -> SampleOutput:
    """DDIM sampling over `num_steps` spaced timesteps; eta = 0 is deterministic, eta = 1 is DDPM-like. The last
    step lands on `final_alphabar`: 1 (x0 itself), or alphabar_0 for a scheduler config's `set_alpha_to_one: false`.
    `fractional_linspace`: see `sampling_chain` (Euler ancestral's levels)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    chain = sampling_chain(
        diffusion, num_steps, spacing, steps_offset, karras_sigmas, final_alphabar, fractional_linspace
    )

    def step(output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = _randn_like(x, generator) if eta > 0 else None
        return ddim_step(chain, output, x, t, eta, noise, threshold)

    return run_chain(
        model, chain, x_T, step, model_kwargs=model_kwargs, start_step=start_step, inpaint=inpaint,
        generator=generator, return_trajectory=return_trajectory, callback=callback, progress=progress, name=name,
    )  # fmt: skip


def sample_euler_ancestral(
    model: ModelFn, diffusion: GaussianDiffusion, x_T: torch.Tensor, *, num_steps: int = 50, **kwargs: Any
) -> SampleOutput:
    """Euler ancestral sampling (k-diffusion's `sample_euler_ancestral`, diffusers' EulerAncestralDiscreteScheduler).

    In the variance-exploding variable x / alpha with sigma = sqrt((1 - abar) / abar), a step from sigma_s to
    sigma_t goes to sigma_down = sigma_t^2 / sigma_s along the denoising direction and adds sigma_up z,
    sigma_up^2 = sigma_t^2 - sigma_down^2. Back in x, with q = SNR_s / SNR_t, that is
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) (sqrt(q) eps + sqrt(1 - q) z), and sqrt(1 - abar_t) sqrt(1 - q) is
    exactly DDIM's sigma at eta = 1. So this *is* DDIM with eta = 1, noise drawn at every step as diffusers
    draws it, over diffusers' Euler levels: on `linspace` spacing unrounded timesteps with interpolated sigmas
    (`sampling_chain`'s `fractional_linspace`). The tests pin it against EulerAncestralDiscreteScheduler. Takes
    sample_ddim's keyword arguments but eta (it is 1; for other values use sample_ddim).
    """
    if "eta" in kwargs:
        raise ValueError("sample_euler_ancestral: eta is fixed at 1 (for other values use sample_ddim)")
    return sample_ddim(
        model, diffusion, x_T, num_steps=num_steps, eta=1.0, name="Euler a", fractional_linspace=True, **kwargs
    )


def run_chain(
    model: ModelFn,
    chain: GaussianDiffusion,
    x_T: torch.Tensor,
    step: ChainStep,
    *,
    model_kwargs: dict[str, Any] | None = None,
    start_step: int = 0,
    inpaint: Inpainting | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    callback: StepCallback | None = None,
    progress: bool = True,
    name: str = "sampling",
) -> SampleOutput:
    """The loop every sampler shares: model call, step, callback, from chain index T-1-start_step down to 0.

    With `start_step` = k the first k steps are skipped: x_T must then be a sample at the noise level of index
    T-1-k (image-to-image noises an image to it). With `inpaint`, after every step the known region is reset to
    the original noised to the new level, and each step is redone `inpaint.resample` times (RePaint).
    """
    model_kwargs = model_kwargs or {}
    num_steps = chain.num_timesteps
    if not (isinstance(start_step, int) and 0 <= start_step < num_steps):
        raise ValueError(f"start_step must be an int in [0, {num_steps}), got {start_step!r}")
    chain.to(x_T.device)
    indices = torch.arange(num_steps, device=x_T.device).unsqueeze(1).repeat(1, x_T.shape[0])  # (T, B)
    model_timesteps = chain.model_timesteps(indices)  # (T, B)
    x = x_T
    trajectory = [x] if return_trajectory else None
    first = num_steps - 1 - start_step
    passes = inpaint.resample if inpaint is not None else 1
    for index in tqdm(range(first, -1, -1), desc=name, disable=not progress, leave=False):
        t = indices[index]
        for attempt in range(passes):
            output = model(x, model_timesteps[index], **model_kwargs)
            x, pred_x0 = step(output, x, t, index)
            if inpaint is not None:
                x = inpaint.keep_known(chain, x, t, generator)
                if attempt < passes - 1:  # RePaint's jump: noise the blend back up to this step's level, redo it
                    x = inpaint.renoise(chain, x, t, generator)
        if trajectory is not None:
            trajectory.append(x)
        if callback is not None:
            callback(index, int(chain.timesteps[index]), x, pred_x0)
    return SampleOutput(x, torch.stack(trajectory) if trajectory is not None else None)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
