"""The noise process of a model folder: one typed config, saved as diffusers' `scheduler/` config.

The same settings build our `GaussianDiffusion` (for training and our samplers) and a diffusers
scheduler config, so `diffusers.StableDiffusionPipeline` walks the same chain our pipeline does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from ldm.diffusion import DIFFUSERS_SCHEDULE_NAMES, DynamicThreshold, GaussianDiffusion, StaticThreshold
from ldm.diffusion.consistency import ORIGINAL_INFERENCE_STEPS, TIMESTEP_SCALING
from ldm.diffusion.schedules import SPACINGS
from ldm.diffusion.thresholding import FolderClipping, folder_threshold_for

# Our prediction names and diffusers' `prediction_type` values.
DIFFUSERS_PREDICTION_NAMES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULER_CLASS = "DDIMScheduler"  # what `scheduler/scheduler_config.json` names; DDPM reads the same arrays
CONSISTENCY_SCHEDULER_CLASS = "LCMScheduler"  # what a consistency-distilled folder's scheduler config names


@dataclass
class NoiseScheduleConfig:
    """The forward process q(x_t | x_0) and what the network predicts about it.

    Defaults are Stable Diffusion 1.x's: 1000 steps of the scaled-linear schedule from 0.00085 to 0.012,
    eps prediction, fixed-small (beta~) reverse variance. Sampling visits `leading` timesteps shifted by
    `steps_offset` (diffusers' convention), and the final DDIM step lands on alphabar = 1.
    """

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction: Literal["eps", "v", "x0"] = "eps"
    variance: Literal["fixed_small", "fixed_large", "learned_range"] = "fixed_small"
    zero_terminal_snr: bool = False  # rescale so alphabar_T = 0 (needs v or x0 prediction)
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    steps_offset: int = 1
    # How a downloaded folder's scheduler says to sample (diffusers' keys; DDIM honours set_alpha_to_one):
    set_alpha_to_one: bool = True  # DDIM's last step lands on alphabar = 1; false: on alphabar_0 (SD 1.x / 2.x)
    clip_sample: bool = False  # clamp the predicted x0 to +-clip_sample_range
    clip_sample_range: float = 1.0
    thresholding: bool = False  # Imagen's dynamic thresholding of the predicted x0 (before clip_sample)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    # A consistency-distilled folder (LCMScheduler's keys, written only for one): the number N of the skip-step
    # schedule it was distilled on, whose subset the lcm sampler visits, and the scale of t in its boundary
    # condition. None: not distilled; the config is DDIMScheduler's and lcm takes LCMScheduler's default N = 50.
    original_inference_steps: int | None = None
    timestep_scaling: float = TIMESTEP_SCALING

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps: must be >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"beta_start, beta_end: need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if self.zero_terminal_snr and self.prediction == "eps":
            raise ValueError("zero_terminal_snr: needs prediction 'v' or 'x0'; eps cannot recover x0 at SNR 0")
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ValueError(f"steps_offset: must be in [0, {self.num_train_timesteps}), got {self.steps_offset}")
        if self.clip_sample_range <= 0 or self.sample_max_value <= 0:
            raise ValueError("clip_sample_range, sample_max_value: must be > 0")
        if not 0 < self.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio: must be in (0, 1], got {self.dynamic_thresholding_ratio}")
        original = self.original_inference_steps
        if original is not None and not (isinstance(original, int) and 1 <= original <= self.num_train_timesteps):
            raise ValueError(
                f"original_inference_steps: must be an int in [1, {self.num_train_timesteps}] (the training "
                f"timesteps) or None, got {original!r}"
            )
        if not (math.isfinite(self.timestep_scaling) and self.timestep_scaling > 0):
            raise ValueError(f"timestep_scaling: must be a positive number, got {self.timestep_scaling}")

    def build(self) -> GaussianDiffusion:
        """The `GaussianDiffusion` these settings describe."""
        return GaussianDiffusion.from_schedule(
            self.beta_schedule,
            self.num_train_timesteps,
            self.prediction,
            self.variance,
            zero_terminal_snr=self.zero_terminal_snr,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
        )

    def final_alphabar(self, diffusion: GaussianDiffusion) -> float:
        """Where DDIM's last step lands: 1, or alphabar_0 of `diffusion` (this config's process) when
        set_alpha_to_one is false, as diffusers' DDIMScheduler reads the same config."""
        return 1.0 if self.set_alpha_to_one else float(diffusion.coef.alphas_cumprod[0])

    def threshold(self, reads: FolderClipping) -> DynamicThreshold | StaticThreshold | None:
        """The clipping of the predicted x0 the config asks for, of the keys a sampler `reads` (its
        `Sampler.folder_clipping`): dynamic thresholding first, as diffusers checks it first, then clip_sample."""
        return folder_threshold_for(
            reads, clip_sample=self.clip_sample, clip_sample_range=self.clip_sample_range,
            thresholding=self.thresholding, dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
            sample_max_value=self.sample_max_value,
        )  # fmt: skip

    @property
    def lcm_original_steps(self) -> int:
        """N of the skip-step schedule the lcm sampler takes its timesteps from (LCMScheduler's default for a folder
        that records none, as LCMScheduler.from_config reads such a config)."""
        return ORIGINAL_INFERENCE_STEPS if self.original_inference_steps is None else self.original_inference_steps

    @property
    def output_channels_factor(self) -> int:
        """2 when the network also outputs the variance interpolation (learned_range), else 1."""
        return 2 if self.variance == "learned_range" else 1

    def to_scheduler_config(self) -> dict[str, Any]:
        """diffusers' scheduler config (the content of `scheduler/scheduler_config.json`): DDIMScheduler's, or for a
        consistency-distilled folder LCMScheduler's (its keys are DDIM's plus original_inference_steps and
        timestep_scaling), so diffusers' StableDiffusionPipeline loads the folder with the scheduler it samples with."""
        distilled = self.original_inference_steps is not None
        consistency_keys = {
            "original_inference_steps": self.original_inference_steps,
            "timestep_scaling": self.timestep_scaling,
        }
        return {
            "_class_name": CONSISTENCY_SCHEDULER_CLASS if distilled else SCHEDULER_CLASS,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": DIFFUSERS_SCHEDULE_NAMES[self.beta_schedule],
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": DIFFUSERS_PREDICTION_NAMES[self.prediction],
            "variance_type": self.variance,
            "rescale_betas_zero_snr": self.zero_terminal_snr,
            "timestep_spacing": self.timestep_spacing,
            "steps_offset": self.steps_offset,
            "set_alpha_to_one": self.set_alpha_to_one,
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "thresholding": self.thresholding,
            "dynamic_thresholding_ratio": self.dynamic_thresholding_ratio,
            "sample_max_value": self.sample_max_value,
        } | (consistency_keys if distilled else {})

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any], source: str = "scheduler config") -> NoiseScheduleConfig:
        """Read a diffusers scheduler config (any of its DDPM/DDIM/PNDM/... classes share these keys)."""
        schedules = {v: k for k, v in DIFFUSERS_SCHEDULE_NAMES.items()}
        predictions = {v: k for k, v in DIFFUSERS_PREDICTION_NAMES.items()}
        schedule = config.get("beta_schedule", "linear")
        prediction = config.get("prediction_type", "epsilon")
        if schedule not in schedules:
            raise ValueError(f"{source}: beta_schedule {schedule!r} is not supported; use one of {sorted(schedules)}")
        if prediction not in predictions:
            raise ValueError(f"{source}: prediction_type {prediction!r} is not one of {sorted(predictions)}")
        if config.get("trained_betas") is not None:
            raise ValueError(f"{source}: trained_betas (an explicit beta array) is not supported")
        spacing = config.get("timestep_spacing", "leading")
        if spacing not in SPACINGS:
            raise ValueError(f"{source}: timestep_spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
        original = config.get("original_inference_steps")
        if original is None and config.get("_class_name") == CONSISTENCY_SCHEDULER_CLASS:
            original = ORIGINAL_INFERENCE_STEPS  # what LCMScheduler takes for a config without the key
        variance = config.get("variance_type") or "fixed_small"
        if variance not in ("fixed_small", "fixed_large", "learned_range"):
            raise ValueError(f"{source}: variance_type {variance!r} is not fixed_small, fixed_large or learned_range")
        return cls(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_schedule=schedules[schedule],
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            prediction=predictions[prediction],
            variance=variance,
            zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
            timestep_spacing=spacing,
            steps_offset=int(config.get("steps_offset", 0)),
            set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
            clip_sample=bool(config.get("clip_sample", False)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
            thresholding=bool(config.get("thresholding", False)),
            dynamic_thresholding_ratio=float(config.get("dynamic_thresholding_ratio", 0.995)),
            sample_max_value=float(config.get("sample_max_value", 1.0)),
            original_inference_steps=None if original is None else int(original),
            timestep_scaling=float(config.get("timestep_scaling", TIMESTEP_SCALING)),
        )
