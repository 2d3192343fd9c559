"""The one table of our samplers: name -> its function, the options it takes, whether it draws noise per step.

The model folder's allowed names, the command line's choices, the server's enum and the generation request's
checks are all read from `SAMPLERS`, so a sampler added here is offered everywhere at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ldm.diffusion.dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde
from ldm.diffusion.samplers import SampleOutput, sample_ddim, sample_ddpm, sample_euler_ancestral
from ldm.diffusion.thresholding import FolderClipping


@dataclass(frozen=True)
class Sampler:
    """One sampler: `sample(model, diffusion, x_T, **kwargs)` takes sample_ddim's keyword arguments, plus
    `options` (only DDIM's eta). `deterministic`: it draws no noise after x_T (DDIM only with eta = 0).
    `folder_clipping`: which of a folder's x0-clipping keys it honours, as diffusers' scheduler of the same
    algorithm does; `fractional_linspace`: it visits linspace spacing's fractional timesteps, as diffusers' Euler
    schedulers do (so image-to-image must start on that chain)."""

    sample: Callable[..., SampleOutput]
    options: tuple[str, ...]
    deterministic: bool
    folder_clipping: FolderClipping
    title: str
    fractional_linspace: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> SampleOutput:
        return self.sample(*args, **kwargs)

    def draws_step_noise(self, eta: float = 0.0) -> bool:
        """Whether a run with this eta draws noise at every step (so needs its generator on the device)."""
        return not self.deterministic or eta > 0


# Each of our samplers reads the keys diffusers' scheduler of the same algorithm reads (diffusers 0.3x, pinned by
# tests/diffusion/test_folder_thresholding.py):
# - DDIMScheduler.step, DDPMScheduler.step: `if thresholding: x0 = _threshold_sample(x0)`
#   `elif clip_sample: x0 = x0.clamp(-clip_sample_range, clip_sample_range)`.
# - DPMSolverMultistepScheduler.convert_model_output (dpmsolver++ and sde-dpmsolver++): `if thresholding:` only.
#   clip_sample is not one of its config keys: its __init__ refuses it, from_config carries it unread.
# - EulerAncestralDiscreteScheduler: neither; it has no such keys and its step never clips x0.
BOTH, THRESHOLDING_ONLY, NEITHER = FolderClipping(True, True), FolderClipping(False, True), FolderClipping(False, False)
SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(sample_ddim, ("eta",), True, BOTH, "DDIM (eta = 0: deterministic)"),
    "ddpm": Sampler(sample_ddpm, (), False, BOTH, "DDPM ancestral sampling"),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, (), True, THRESHOLDING_ONLY, "DPM-Solver++(2M)"),
    "dpmpp_2m_sde": Sampler(sample_dpmpp_2m_sde, (), False, THRESHOLDING_ONLY, "DPM-Solver++(2M) SDE"),
    "euler_ancestral": Sampler(sample_euler_ancestral, (), False, NEITHER, "Euler ancestral", fractional_linspace=True),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
