"""DDIM inversion: run deterministic DDIM backwards, from a clean sample up to the x_T that regenerates it."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ldm.diffusion.gaussian_diffusion import GaussianDiffusion, Prediction
from ldm.diffusion.samplers import ModelFn, SampleOutput, StepCallback, sampling_chain


@torch.no_grad()
def ddim_invert(
    model: ModelFn,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    *,
    num_steps: int = 50,
    spacing: str = "leading",
    steps_offset: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    return_trajectory: bool = False,
    callback: StepCallback | None = None,
    progress: bool = True,
    final_alphabar: float = 1.0,
) -> SampleOutput:
    """The x_T from which `sample_ddim` (eta = 0, same steps and spacing) returns about x0; `.sample` is x_T.

    Step i (i = 0 .. n-1) takes x from its level alphabar_prev[i] up to alphabar[i] along the DDIM direction:
    x' = sqrt(abar[i]) x0_hat + sqrt(1 - abar[i]) eps_hat, with (x0_hat, eps_hat) read from the model's output
    at x's own level and the model told timestep t_i, the one it steps to (as diffusers' DDIMInverseScheduler
    does). That evaluation stands in for the one DDIM makes at x' itself, which is what makes inversion
    approximate; with more steps the two draw closer. eps and v prediction (an x0-predicting model gives no
    noise direction at the clean level). x0 is taken to be at the level `final_alphabar` (as `sample_ddim`'s
    last step leaves it).
    """
    if diffusion.prediction is Prediction.X0:
        raise ValueError("ddim_invert: needs an eps or v prediction model; x0 prediction has no eps at the clean level")
    model_kwargs = model_kwargs or {}
    chain = sampling_chain(diffusion, num_steps, spacing, steps_offset, final_alphabar=final_alphabar).to(x0.device)
    indices = torch.arange(chain.num_timesteps, device=x0.device).unsqueeze(1).repeat(1, x0.shape[0])  # (n, B)
    model_timesteps = chain.model_timesteps(indices)
    c = chain.coefficients(x0.device)
    x = x0
    trajectory = [x] if return_trajectory else None
    for index in tqdm(range(chain.num_timesteps), desc="DDIM inversion", disable=not progress, leave=False):
        t = indices[index]
        prediction, _ = chain.split_output(model(x, model_timesteps[index], **model_kwargs))
        abar_here = chain.gather(c.alphas_cumprod_prev, t, x)
        alpha, sigma = abar_here.sqrt(), (1 - abar_here).sqrt()
        if chain.prediction is Prediction.EPS:
            pred_eps = prediction
            pred_x0 = (x - sigma * pred_eps) / alpha
        else:  # v = alpha eps - sigma x0, x = alpha x0 + sigma eps
            pred_x0 = alpha * x - sigma * prediction
            pred_eps = alpha * prediction + sigma * x
        abar_next = chain.gather(c.alphas_cumprod, t, x)
        x = abar_next.sqrt() * pred_x0 + (1 - abar_next).sqrt() * pred_eps
        if trajectory is not None:
            trajectory.append(x)
        if callback is not None:
            callback(index, int(chain.timesteps[index]), x, pred_x0)
    return SampleOutput(x, torch.stack(trajectory) if trajectory is not None else None)
