"""The one table of our samplers: name -> its function, the options it takes, whether it draws noise per step.

The model folder's allowed names, the command line's choices, the server's enum and the generation request's
checks are all read from `SAMPLERS`, so a sampler added here is offered everywhere at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ldm.diffusion.consistency import lcm_chain, sample_lcm
from ldm.diffusion.dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde
from ldm.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.diffusion.samplers import SampleOutput, sample_ddim, sample_ddpm, sample_euler_ancestral, sampling_chain
from ldm.diffusion.thresholding import FolderClipping

# The chain settings a sampler reads (from a folder's scheduler config, or a request), by the timesteps it visits.
CHAIN_SETTINGS: dict[str, tuple[str, ...]] = {
    "spaced": ("spacing", "steps_offset", "karras_sigmas"),  # num_steps timesteps spaced over the training chain
    "lcm": ("original_inference_steps",),  # LCMScheduler's: a subset of the distillation's skip-step schedule
}


@dataclass(frozen=True)
class Sampler:
    """One sampler: `sample(model, diffusion, x_T, **kwargs)` takes sample_ddim's keyword arguments, plus
    `options` (only DDIM's eta). `deterministic`: it draws no noise after x_T (DDIM only with eta = 0).
    `folder_clipping`: which of a folder's x0-clipping keys it honours, as diffusers' scheduler of the same
    algorithm does; `fractional_linspace`: it visits linspace spacing's fractional timesteps, as diffusers' Euler
    schedulers do (so image-to-image must start on that chain). `timesteps`: which timesteps it visits, so which
    chain settings (`CHAIN_SETTINGS`) it takes: "spaced" (the folder's spacing and offset, or Karras sigmas), or
    "lcm" (LCMScheduler's, from the folder's original_inference_steps; it takes no spacing, offset or Karras)."""

    sample: Callable[..., SampleOutput]
    options: tuple[str, ...]
    deterministic: bool
    folder_clipping: FolderClipping
    title: str
    fractional_linspace: bool = False
    timesteps: Literal["spaced", "lcm"] = "spaced"

    def __call__(self, *args: Any, **kwargs: Any) -> SampleOutput:
        return self.sample(*args, **kwargs)

    @property
    def chain_settings(self) -> tuple[str, ...]:
        """The names of the chain settings it takes (keyword arguments of `sample` and `chain`)."""
        return CHAIN_SETTINGS[self.timesteps]

    def chain(self, diffusion: GaussianDiffusion, num_steps: int, **settings: Any) -> GaussianDiffusion:
        """The chain `sample` walks with these settings (e.g. where image-to-image must start)."""
        if self.timesteps == "lcm":
            return lcm_chain(diffusion, num_steps, **settings)
        return sampling_chain(diffusion, num_steps, **settings, fractional_linspace=self.fractional_linspace)

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
# - LCMScheduler.step: both, as DDIM (thresholding first), on the x0 before the boundary condition mixes in x_t.
BOTH, THRESHOLDING_ONLY, NEITHER = FolderClipping(True, True), FolderClipping(False, True), FolderClipping(False, False)
SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(sample_ddim, ("eta",), True, BOTH, "DDIM (eta = 0: deterministic)"),
    "ddpm": Sampler(sample_ddpm, (), False, BOTH, "DDPM ancestral sampling"),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, (), True, THRESHOLDING_ONLY, "DPM-Solver++(2M)"),
    "dpmpp_2m_sde": Sampler(sample_dpmpp_2m_sde, (), False, THRESHOLDING_ONLY, "DPM-Solver++(2M) SDE"),
    "euler_ancestral": Sampler(sample_euler_ancestral, (), False, NEITHER, "Euler ancestral", fractional_linspace=True),
    "lcm": Sampler(sample_lcm, (), False, BOTH, "LCM (consistency-distilled models)", timesteps="lcm"),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
