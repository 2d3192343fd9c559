"""Sampling with any diffusers scheduler object: the loop diffusers' Stable Diffusion pipelines run.

Our own samplers (`ldm.diffusion.SAMPLERS`) cover DDIM, DDPM, DPM-Solver++ and Euler ancestral; this loop lets a
pipeline call use the rest (UniPC, Heun, LMS, PNDM, DEIS, ...) as diffusers steps them, including the
image-to-image start (`add_noise` at the first kept timestep) and inpainting's known region (diffusers' way:
the original noised with the same noise to each next timestep).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import SchedulerMixin
from tqdm.auto import tqdm

from ldm.diffusion.samplers import ModelFn, SampleOutput, StepCallback
from ldm.diffusion.sdedit import sdedit_steps


def check_scheduler(scheduler: object, prediction_type: str) -> SchedulerMixin:
    """`scheduler` must be a diffusers scheduler object that predicts what the model predicts."""
    if not isinstance(scheduler, SchedulerMixin):
        raise ValueError(
            f"scheduler: must be a diffusers scheduler object (e.g. UniPCMultistepScheduler.from_config("
            f"pipe.scheduler_config)), got {type(scheduler).__name__}"
        )
    theirs = getattr(scheduler.config, "prediction_type", prediction_type)
    if theirs != prediction_type:
        raise ValueError(
            f"scheduler: its prediction_type is {theirs!r} but the model predicts {prediction_type!r}; "
            "build it with from_config(pipe.scheduler_config)"
        )
    return scheduler


@torch.no_grad()
def sample_with_scheduler(
    scheduler: SchedulerMixin,
    model: ModelFn,
    noise: torch.Tensor,
    *,
    num_steps: int,
    model_kwargs: dict[str, Any],
    generator: torch.Generator | None = None,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> SampleOutput:
    """Walk `scheduler` from noise (or from `init` noised to the step `strength` names) to a sample.

    `mask` (1 = repaint) keeps `init` elsewhere. The callback gets the scheduler's x0 prediction where its
    step returns one (`pred_original_sample`) and None otherwise.
    """
    scheduler.set_timesteps(num_steps, device=noise.device)
    timesteps = scheduler.timesteps
    if init is None:
        x = noise * scheduler.init_noise_sigma
    else:  # diffusers' img2img: keep the last int(n * strength) steps
        begin = (num_steps - min(sdedit_steps(num_steps, strength), num_steps)) * scheduler.order
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        x = scheduler.add_noise(init, noise, timesteps[:1].repeat(noise.shape[0]))
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generator} if takes_generator else {}
    host_timesteps = timesteps.tolist()  # once: reading a device tensor per step would sync
    for i, t in enumerate(tqdm(timesteps, desc=type(scheduler).__name__, disable=not progress, leave=False)):
        output = model(scheduler.scale_model_input(x, t), t.expand(x.shape[0]), **model_kwargs)
        result = scheduler.step(output, t, x, **step_kwargs)
        x = result.prev_sample
        if mask is not None:
            known = init if i == len(timesteps) - 1 else scheduler.add_noise(init, noise, timesteps[i + 1 : i + 2])
            x = torch.lerp(known, x, mask)
        if callback is not None:
            callback(i, int(host_timesteps[i]), x, getattr(result, "pred_original_sample", None))
    return SampleOutput(x, None)
