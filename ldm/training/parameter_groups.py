"""Stage 2's optimizer groups: the U-Net at the `train:` section's LR and schedule, and a trainable text encoder
in a group of its own (its LR, warm-up, schedule, weight decay and freezing step from `text_encoder:`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from conditioning.token_rows import CaptionRowEmbedding
from ldm.training.denoiser import Denoiser
from ldm.training.lr_schedule import LRSchedule
from ldm.training.runtime import train_schedule

logger = logging.getLogger(__name__)


@dataclass
class ParameterGroup:
    """One AdamW parameter group and its LR schedule."""

    name: str
    parameters: list[nn.Parameter]
    weight_decay: float
    schedule: LRSchedule

    def as_optimizer_group(self) -> dict[str, Any]:
        # The name rides along in the optimizer's group (torch keeps extra keys) for the run log's per-group LR.
        return {"params": self.parameters, "weight_decay": self.weight_decay, "lr": self.schedule(0), "name": self.name}

    def describe(self) -> str:
        count = sum(p.numel() for p in self.parameters)
        s = self.schedule
        stop = f", frozen from step {s.stop_at}" if s.stop_at is not None else ""
        return (
            f"{self.name}: {count:,} parameters at lr {s.lr:g} ({s.shape}, warm-up {s.warmup_steps}, floor "
            f"{s.min_lr_ratio:g}{stop}), weight decay {self.weight_decay:g}"
        )


def parameter_groups(cfg: Any, denoiser: Denoiser) -> list[ParameterGroup]:
    """The trainable parameters of `denoiser` for a DiffusionExperimentConfig `cfg`: the U-Net's group, then the
    text encoder's when it trains. The run log names each group, its size and its schedule."""
    tc, te = cfg.train, cfg.text_encoder
    groups = [ParameterGroup("unet", trainable(denoiser.unet), tc.weight_decay, train_schedule(tc))]
    if denoiser.text_encoder is not None:
        schedule = LRSchedule(
            te.lr if te.lr is not None else tc.lr,
            tc.steps,
            te.warmup_steps if te.warmup_steps is not None else tc.warmup_steps,
            te.lr_schedule or tc.lr_schedule,
            te.min_lr_ratio if te.min_lr_ratio is not None else tc.min_lr_ratio,
            stop_at=te.freeze_after,
        )
        decay = te.weight_decay if te.weight_decay is not None else tc.weight_decay
        groups.append(ParameterGroup("text encoder", trainable(denoiser.text_encoder), decay, schedule))
    for group in groups:
        logger.info("trains %s", group.describe())
    table = denoiser.text_encoder.model.get_input_embeddings() if denoiser.text_encoder is not None else None
    if isinstance(table, CaptionRowEmbedding):
        logger.info("text encoder token table: %d caption rows train, the other rows stay fixed", table.rows.shape[0])
    return [g for g in groups if g.parameters]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
