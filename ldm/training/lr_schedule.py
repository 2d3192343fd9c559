"""The learning rate of one parameter group as a function of the step: warm-up, then constant or cosine, and an
optional step from which the group stops training. Every stage's optimizer groups are scheduled by one of these."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """lr(step) = lr * factor(step): (step + 1) / warmup_steps during the warm-up, then 1 (constant) or a cosine
    from 1 down to min_lr_ratio at total_steps; 0 from `stop_at` on (the group's weights stop moving: AdamW's
    update and its decoupled weight decay are both proportional to the lr). A function of the step alone, so a
    resumed run continues every schedule exactly."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    shape: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = 0.0
    stop_at: int | None = None

    def __post_init__(self) -> None:
        if self.shape not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: unknown {self.shape!r}; valid: {', '.join(LR_SCHEDULES)}")

    def stopped(self, step: int) -> bool:
        """Whether the group has stopped training at `step` (from `stop_at` on)."""
        return self.stop_at is not None and step >= self.stop_at

    def factor(self, step: int) -> float:
        """The LR at `step` as a fraction of `lr`."""
        if self.stopped(step):
            return 0.0
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.shape == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr * self.factor(step)
