"""The typed config of `ldm distill`: latent consistency distillation (Luo et al. 2023) of a trained model folder
into a student that draws in 1-8 steps. Defaults are the CPU recipe: the quickstart model on its shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ldm.data import DataConfig
from ldm.training.config import TrainConfig
from ldm.training.diffusion_config import ValidationConfig

CONSISTENCY_LOSSES = ("huber", "l2")


@dataclass
class ConsistencyConfig:
    """The consistency-distillation objective (LCM's Algorithm 1, as diffusers' train_lcm_distill_sd_wds.py).

    Each step draws t_{n+k} from the skip-step grid of `ddim_timesteps` points, noises the latent to it, and asks
    the student's boundary-conditioned x0 there to equal the target network's at t_n, where x_{t_n} is one guided
    DDIM step of the teacher (k = T / ddim_timesteps timesteps down). The target is an EMA of the student.
    """

    # Guidance scales w drawn uniformly from [guidance_min, guidance_max] per example: the teacher's guided step
    # eps_u + w (eps_c - eps_u), which the student learns to take in one evaluation with w as its embedding.
    guidance_min: float = 2.0
    guidance_max: float = 8.0
    ddim_timesteps: int = 50  # N of the skip-step solver; LCMScheduler's original_inference_steps
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001  # the pseudo-Huber loss's c: sqrt(d^2 + c^2) - c
    timestep_scaling: float = 10.0  # the boundary condition's t scale (LCMScheduler's timestep_scaling)
    target_decay: float = 0.95  # EMA decay of the target network (LCM's mu)
    time_cond_proj_dim: int = 256  # the width of the w embedding the student's time embedding takes
    # The learning rate of the new, zero-initialised w-embedding map (its own parameter group, same schedule), for
    # a student that should learn to read w faster than it moves off the teacher; None: train.lr.
    guidance_embedding_lr: float | None = None

    def __post_init__(self) -> None:
        if self.guidance_min < 1.0:
            raise ValueError(
                f"distill.guidance_min: {self.guidance_min} is below 1; w is the guidance scale of "
                "eps_u + w (eps_c - eps_u), where 1 is no guidance and below 1 steers away from the prompt"
            )
        if self.guidance_max < self.guidance_min:
            raise ValueError(
                f"distill.guidance_max: {self.guidance_max} is below guidance_min {self.guidance_min}; give a range"
            )
        if self.ddim_timesteps < 2:
            raise ValueError(f"distill.ddim_timesteps: must be >= 2, got {self.ddim_timesteps}")
        if self.loss not in CONSISTENCY_LOSSES:
            raise ValueError(f"distill.loss: {self.loss!r} is not one of {', '.join(CONSISTENCY_LOSSES)}")
        if self.huber_c <= 0 or self.timestep_scaling <= 0:
            raise ValueError("distill.huber_c and distill.timestep_scaling: must be positive")
        if not 0.0 <= self.target_decay < 1.0:
            raise ValueError(f"distill.target_decay: must be in [0, 1), got {self.target_decay}")
        if self.time_cond_proj_dim < 4:
            raise ValueError(f"distill.time_cond_proj_dim: must be >= 4, got {self.time_cond_proj_dim}")
        if self.guidance_embedding_lr is not None and not self.guidance_embedding_lr > 0:
            raise ValueError(f"distill.guidance_embedding_lr: must be positive, got {self.guidance_embedding_lr}")


@dataclass
class DistillTrainConfig(TrainConfig):
    """The shared `train:` section with the distillation's defaults, plus AdamW's weight decay and the caches."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    warmup_steps: int = 50
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    cache_latents: bool = True  # encode the dataset once with the teacher's VAE and text encoder
    cache_dir: str | None = None  # null = OUTPUT_DIR/cache
    sample_every: int = 500
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")


def _lcm_validation() -> ValidationConfig:
    # The distilled folder's recommended settings: 4 LCM steps at the quickstart's best guidance.
    return ValidationConfig(guidance_scale=4.0, num_inference_steps=4, sampler="lcm")


@dataclass
class DistillExperimentConfig:
    """A whole `ldm distill` run. `teacher` is a model folder (`ldm train-diffusion`'s pipeline/ or a Stable Diffusion
    folder); its VAE, text encoder and noise process are the student's, frozen, and its U-Net the student's start."""

    teacher: str = "runs/quickstart/pipeline"
    data: DataConfig = field(default_factory=DataConfig)
    distill: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig)
    validation: ValidationConfig = field(default_factory=_lcm_validation)

    def __post_init__(self) -> None:
        if not self.teacher.strip():
            raise ValueError("teacher: give the model folder to distil (e.g. runs/quickstart/pipeline)")
        if self.validation.sampler != "lcm":
            raise ValueError(
                f"validation.sampler: {self.validation.sampler!r}; a distilled folder draws with 'lcm' (its samples "
                "and the folder's recommended sampler)"
            )
