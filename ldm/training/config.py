"""The `train:` section both stages share: optimization, precision, data loading and the run's rhythm.

Each stage extends `TrainConfig` with what is its own (stage 1: the discriminator's LR and the held-out
evaluation; stage 2: weight decay, EMA, caches) and sets its own defaults; the checks here hold for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ldm.training.tracking import TRACKERS


@dataclass
class TrainConfig:
    """Steps, batch, optimizer, LR schedule, precision, loading, and how often to log, sample and save."""

    seed: int = 0
    steps: int = 1000  # optimizer steps (each one is grad_accum micro-batches)
    batch_size: int = 16  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: from lr down to min_lr_ratio * lr at the end
    min_lr_ratio: float = 0.0  # the cosine's floor, as a fraction of lr
    grad_clip: float | None = None  # max global gradient norm; null = no clipping
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    num_workers: int = 0
    num_threads: int = 0  # torch CPU threads; 0 = torch's default (one per core)
    log_every: int = 25
    log_with: Literal["tensorboard", "wandb", "none"] = (
        "tensorboard"  # wandb: pip install "latent-diffusion-lab[wandb]"
    )
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # the newest complete checkpoints kept; older ones go once a new one is complete
    max_nonfinite_steps: int = 10  # steps in a row with a NaN/inf loss or gradient (updates skipped) before stopping

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "log_every", "sample_every", "checkpoint_every")
        for key in (*positive, "keep_checkpoints", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas: each must be in [0, 1), got {list(self.adam_betas)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1] (a fraction of lr), got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip: must be positive (or null for none), got {self.grad_clip}")
        if self.warmup_steps < 0 or self.num_workers < 0 or self.num_threads < 0:
            raise ValueError("warmup_steps, num_workers and num_threads: must be >= 0")
        if self.log_with not in TRACKERS:
            raise ValueError(f"log_with: {self.log_with!r} is not one of {', '.join(TRACKERS)}")
