"""Latent consistency models (Luo et al. 2023): the math the `lcm` sampler and `ldm distill` share.

A consistency model is f(x_t, t) = c_skip(t) x_t + c_out(t) x0_theta(x_t, t), whose boundary condition
(c_skip(0) = 1, c_out(0) = 0) makes f the identity on clean data; x0_theta is the x0 the network's output
implies in the process's parameterization (eps, v or x0). A guidance-distilled U-Net also takes the guidance
scale w, as a sinusoidal embedding added to its timestep embedding (diffusers' `time_cond_proj_dim`).

Multistep sampling (LCM's Algorithm 3, diffusers' LCMScheduler) visits a few timesteps tau_1 > ... > tau_n of the
skip-step schedule the model was distilled on: at each, x0 = f(x, tau_i), and except at the last step
x <- sqrt(abar_{tau_{i+1}}) x0 + sqrt(1 - abar_{tau_{i+1}}) z with fresh noise z.

Every function follows diffusers 0.3x-0.4x (`schedulers/scheduling_lcm.py`, the LCM and Stable Diffusion pipelines);
tests/diffusion/test_consistency.py checks each against it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ldm.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.diffusion.inpainting import Inpainting
from ldm.diffusion.samplers import ModelFn, SampleOutput, StepCallback, run_chain
from ldm.diffusion.thresholding import Threshold

SIGMA_DATA = 0.5  # LCMScheduler's fixed sigma_data
TIMESTEP_SCALING = 10.0  # LCMScheduler's default timestep_scaling
ORIGINAL_INFERENCE_STEPS = 50  # LCMScheduler's default original_inference_steps
# What sample_lcm refuses by name, and why (the other samplers take these).
NOT_FOR_LCM = {
    "spacing": "LCM visits LCMScheduler's timesteps, a subset of the original_inference_steps skip-step schedule "
    "(LCMScheduler ignores timestep_spacing)",
    "steps_offset": "LCM visits LCMScheduler's timesteps, a subset of the original_inference_steps skip-step "
    "schedule (LCMScheduler ignores steps_offset)",
    "karras_sigmas": "LCM visits the timesteps the model was distilled on, not Karras et al.'s noise levels",
    "eta": "LCM draws fresh noise at every step by construction; it has no eta",
    "final_alphabar": "LCM's last step returns the boundary-conditioned x0 itself",
    "fractional_linspace": "LCM visits integer timesteps of its skip-step schedule",
}


def guidance_scale_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (B, dim) embedding of guidance scales w (B,) that a guidance-distilled U-Net takes as `timestep_cond`:
    with u = 1000 (w - 1) and f_k = 10000^(-k / (dim/2 - 1)), k < dim/2, it is [sin(u f_k), cos(u f_k)] (VDM's
    sinusoidal embedding), zero-padded by one column for an odd dim.

    w is the guidance scale of eps_u + w (eps_c - eps_u), 1 = no guidance (DESIGN.md), as the pipeline and the
    distillation trainer both hold it. diffusers' pipelines (StableDiffusionPipeline, LatentConsistencyModelPipeline)
    pass `guidance_scale - 1` to `get_guidance_scale_embedding`; this function subtracts the 1 itself, so
    guidance_scale_embedding(w, d) == get_guidance_scale_embedding(w - 1, d). w - 1 is formed in w's dtype and then
    rounded to float32, as diffusers rounds the Python float guidance_scale - 1: pass a float64 w for a Python
    guidance scale (w - 1 of a float32 w >= 1 is exact either way).
    """
    if w.ndim != 1:
        raise ValueError(f"w: must be 1-D, one guidance scale per example, got shape {tuple(w.shape)}")
    if not isinstance(dim, int) or dim < 4:
        raise ValueError(f"dim: the embedding width (time_cond_proj_dim) must be an int >= 4, got {dim!r}")
    scaled = (w - 1).to(torch.float32) * 1000.0
    half = dim // 2
    # As diffusers: log(10000) formed in float32, then divided (dim/2 - 1 is the sinusoid's last exponent).
    log_step = torch.log(torch.tensor(10000.0)) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -log_step.to(w.device))
    angles = scaled.to(dtype)[:, None] * frequencies[None, :]  # (B, dim / 2)
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(embedding, (0, 1)) if dim % 2 else embedding


def consistency_scalings(
    t: torch.Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING
) -> tuple[torch.Tensor, torch.Tensor]:
    """The boundary condition at timestep values t (the network's t, not a chain index), in float64 (float32 on MPS):
    with s = timestep_scaling t, c_skip = sigma_data^2 / (s^2 + sigma_data^2) and c_out = s / sqrt(s^2 + sigma_data^2)
    (LCMScheduler.get_scalings_for_boundary_condition_discrete; c_skip(0) = 1, c_out(0) = 0)."""
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    scaled = t.to(dtype) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def lcm_origin_timesteps(
    num_train_timesteps: int, original_inference_steps: int = ORIGINAL_INFERENCE_STEPS
) -> np.ndarray:
    """The skip-step schedule a consistency model is distilled on, ascending: (i + 1) k - 1 for i < N, with
    k = T // N and N = original_inference_steps (LCMScheduler's `lcm_origin_timesteps`, diffusers' DDIMSolver)."""
    if not (isinstance(original_inference_steps, int) and 1 <= original_inference_steps <= num_train_timesteps):
        raise ValueError(
            f"original_inference_steps: must be an int in [1, {num_train_timesteps}] (the training timesteps), "
            f"got {original_inference_steps!r}"
        )
    k = num_train_timesteps // original_inference_steps
    return np.arange(1, original_inference_steps + 1, dtype=np.int64) * k - 1


def lcm_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    original_inference_steps: int = ORIGINAL_INFERENCE_STEPS,
) -> np.ndarray:
    """The timesteps LCMScheduler.set_timesteps(num_inference_steps) visits, descending: the skip-step schedule
    (`lcm_origin_timesteps`) reversed, at the indices floor(i N / n), i < n (so the first is always T - 1 when k
    divides T). ValueError naming num_inference_steps when n is outside [1, N]."""
    origin = lcm_origin_timesteps(num_train_timesteps, original_inference_steps)
    if not (isinstance(num_inference_steps, int) and num_inference_steps >= 1):
        raise ValueError(f"num_inference_steps: must be a positive int, got {num_inference_steps!r}")
    if num_inference_steps > original_inference_steps:
        raise ValueError(
            f"num_inference_steps: {num_inference_steps} is more than the {original_inference_steps} timesteps of "
            "the skip-step schedule the model was distilled on (original_inference_steps), of which LCM visits a "
            f"subset; use 1 to {original_inference_steps}"
        )
    indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[::-1][indices].copy()


def lcm_chain(
    diffusion: GaussianDiffusion, num_steps: int, original_inference_steps: int = ORIGINAL_INFERENCE_STEPS
) -> GaussianDiffusion:
    """The chain the LCM sampler walks: `diffusion` (a full chain, index = timestep) respaced to `lcm_timesteps`, so
    each step's alphabar_prev is the next visited timestep's."""
    return diffusion.respaced(lcm_timesteps(diffusion.num_timesteps, num_steps, original_inference_steps))


def consistency_denoise(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    timestep_scaling: float = TIMESTEP_SCALING,
    sigma_data: float = SIGMA_DATA,
    threshold: Threshold | None = None,
) -> torch.Tensor:
    """f(x_t, t) = c_skip x_t + c_out x0, x0 implied by the network's output in `diffusion`'s prediction type
    (eps, v or x0; a learned variance half is ignored) and clipped by `threshold` first, as LCMScheduler.step forms
    its `denoised`. t are chain indices of `diffusion` (B,); the scalings are taken at their timestep values."""
    prediction, _ = diffusion.split_output(model_output)
    pred_x0, _ = diffusion.predict_x0_eps(prediction, x_t, t)
    if threshold is not None:
        pred_x0 = threshold(pred_x0)
    c_skip, c_out = consistency_scalings(diffusion.model_timesteps(t), sigma_data, timestep_scaling)
    shape = (t.shape[0], *([1] * (x_t.ndim - 1)))
    return c_skip.to(x_t.dtype).reshape(shape) * x_t + c_out.to(x_t.dtype).reshape(shape) * pred_x0


def lcm_step(
    chain: GaussianDiffusion,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None,
    threshold: Threshold | None = None,
    timestep_scaling: float = TIMESTEP_SCALING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LCM step from chain index t: x0 = f(x_t, t), then x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) z
    with abar_prev the next visited level's (noise None: the last step, x_prev = x0). Returns (x_prev, x0)."""
    denoised = consistency_denoise(chain, model_output, x_t, t, timestep_scaling, threshold=threshold)
    if noise is None:
        return denoised, denoised
    abar_prev = chain.coefficients(t.device).alphas_cumprod_prev[t]  # (B,) float64, cast once below
    shape = (t.shape[0], *([1] * (x_t.ndim - 1)))
    signal, spread = (c.to(x_t.dtype).reshape(shape) for c in (abar_prev.sqrt(), (1 - abar_prev).sqrt()))
    return signal * denoised + spread * noise, denoised


@torch.no_grad()
def sample_lcm(
    model: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: torch.Tensor,
    *,
    num_steps: int = 4,
    original_inference_steps: int = ORIGINAL_INFERENCE_STEPS,
    timestep_scaling: float = TIMESTEP_SCALING,
    model_kwargs: dict[str, Any] | None = None,
    threshold: Threshold | None = None,
    start_step: int = 0,
    inpaint: Inpainting | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    callback: StepCallback | None = None,
    progress: bool = True,
    **not_applicable: Any,
) -> SampleOutput:
    """Multistep consistency sampling (LCMScheduler's step loop) over `lcm_timesteps(T, num_steps,
    original_inference_steps)`: one model evaluation per step, fresh noise from `generator` after every step but
    the last. The callback's pred_x0 is the step's boundary-conditioned x0 (LCMScheduler's `denoised`).

    Takes sample_ddim's keyword arguments where they apply; spacing, steps_offset, karras_sigmas and eta do not
    (`NOT_FOR_LCM`) and raise ValueError naming them. `start_step` = k runs the last n - k steps, as diffusers'
    StableDiffusionImg2ImgPipeline runs LCMScheduler."""
    for name in not_applicable:
        if name not in NOT_FOR_LCM:
            raise TypeError(f"sample_lcm() got an unexpected keyword argument {name!r}")
        raise ValueError(f"{name}: does not apply to the lcm sampler; {NOT_FOR_LCM[name]}")
    if not (math.isfinite(timestep_scaling) and timestep_scaling > 0):
        raise ValueError(f"timestep_scaling: must be a positive number, got {timestep_scaling!r}")
    chain = lcm_chain(diffusion, num_steps, original_inference_steps)

    def step(output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The index, not t, says whether this is the last step: reading t would sync.
        noise = None if index == 0 else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return lcm_step(chain, output, x, t, noise, threshold, timestep_scaling)

    return run_chain(
        model, chain, x_T, step, model_kwargs=model_kwargs, start_step=start_step, inpaint=inpaint,
        generator=generator, return_trajectory=return_trajectory, callback=callback, progress=progress, name="LCM",
    )  # fmt: skip
