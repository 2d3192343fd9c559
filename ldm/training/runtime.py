"""The one training loop both stages run on.

A stage (`ldm/training/autoencoder_stage.py`, `ldm/training/diffusion_stage.py`) supplies what is its own:
its step (a batch in, one `Update` per optimizer out), its sample grid, any extra checkpoint state and its
export. Everything else is here, written once: the accelerator, seeding per rank, the recorded config, the
data position, the LR schedule, gradient accumulation, the non-finite guard, stop signals, the progress bar,
when to log / sample / checkpoint, the stop path, the end-of-run barrier and `metrics.json`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from ldm.config import save_config, to_dict
from ldm.training.config import TrainConfig
from ldm.training.distributed import log_rank_step, reduce_mean
from ldm.training.faults import NonFiniteGuard, StopSignal
from ldm.training.lr_schedule import LRSchedule
from ldm.training.tracking import accelerator_log_with, start_tracking
from ldm.training.training_state import DataStream, load_training_state, save_training_state, stopped_early

logger = logging.getLogger(__name__)

RECENT_STEPS = 100  # metrics.json reports each headline value averaged over the run's last this-many steps


@dataclass
class Update:
    """One optimizer's share of a training step: its loss is backpropagated and, where gradients sync,
    the optimizer steps with each parameter group at its schedule's LR (unless the guard skips a non-finite
    update)."""

    name: str  # names the update in the guard's warnings: "autoencoder", "discriminator", "unet"
    loss: Tensor  # a scalar
    optimizer: torch.optim.Optimizer
    parameters: Iterable[nn.Parameter]  # whose gradient norm is checked (and clipped to train.grad_clip)
    schedules: Sequence[LRSchedule]  # one per parameter group of `optimizer`, in its order
    logs: Mapping[str, float | Tensor] = field(default_factory=dict)  # this process's values, before reduction


class Stage(Protocol):
    """What a stage gives the runtime. `updates` and `after_step` run every step; the rest at their intervals."""

    name: str  # the tracker's project and the progress bar's label
    headline: tuple[str, ...]  # log keys shown on the progress bar and averaged into metrics.json
    models: Sequence[nn.Module]  # the prepared models; gradient accumulation spans them

    def updates(self, batch: Any, step: int) -> Iterator[Update]:
        """The step's updates, in order; each is applied before the next is computed."""

    def after_step(self, applied: Mapping[str, bool | Tensor]) -> None:
        """Called once per optimizer step with which updates happened (e.g. to update an EMA): a bool, or a
        0-dim bool tensor on the device when the guard decided there (reading it would sync with the host)."""

    def write_samples(self, path: Path) -> Mapping[str, float] | None:
        """Write a PNG grid (called on the main process; under FSDP on every process, and the main one writes);
        may return validation scalars, which the runtime logs at this step."""

    def save_state(self, folder: Path) -> None:
        """Write what the checkpoint holds beyond models, optimizers and RNGs (main process only)."""

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote."""

    def export(self, output_dir: Path) -> dict[str, Any]:
        """Write the trained model (called as write_samples is); returns the stage's metrics."""


def start_run(cfg: Any, tc: TrainConfig, output_dir: Path, project: str) -> Accelerator:
    """The run's accelerator and tracker, every rank seeded apart (its own noise, timesteps, caption
    dropout), and the resolved config recorded up front so even an interrupted run says what it ran with."""
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum,
        log_with=accelerator_log_with(tc.log_with),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if tc.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError(
            "train.mixed_precision: fp16 on the CPU is float32 in disguise (accelerate neither autocasts nor scales "
            "the loss there); use bf16, which the CPU runs, or no"
        )
    set_seed(tc.seed, device_specific=True)  # seed + rank; models are identical anyway (DDP broadcasts rank 0's)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if accelerator.is_main_process:
        save_config(cfg, output_dir / "config.yaml")
    start_tracking(accelerator, tc.log_with, project, to_dict(cfg), output_dir / "logs")
    return accelerator


def train_schedule(tc: TrainConfig, lr: float | None = None) -> LRSchedule:
    """The `train:` section's schedule (warm-up, shape, floor over train.steps) at `lr`, by default train.lr."""
    return LRSchedule(tc.lr if lr is None else lr, tc.steps, tc.warmup_steps, tc.lr_schedule, tc.min_lr_ratio)


def learning_rate_factor(step: int, tc: TrainConfig) -> float:
    """The LR at `step` as a fraction of train.lr under the `train:` section's schedule."""
    return train_schedule(tc).factor(step)


def set_learning_rates(optimizer: torch.optim.Optimizer, schedules: Sequence[LRSchedule], step: int) -> None:
    """Set each parameter group of `optimizer` to its schedule's LR at `step`. A group that has stopped training
    also loses its gradients, so the gradient norm, its clipping and the non-finite check see only what trains
    (the gradients were computed and synced all the same: DDP needs every trainable parameter's)."""
    if len(schedules) != len(optimizer.param_groups):
        raise ValueError(f"schedules: {len(schedules)} for {len(optimizer.param_groups)} parameter groups")
    for group, schedule in zip(optimizer.param_groups, schedules, strict=True):
        group["lr"] = schedule(step)
        if schedule.stopped(step):
            for parameter in group["params"]:
                parameter.grad = None


def group_learning_rates(optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
    """The LR each parameter group stepped with, by the group's name (or its update's), for the tracker."""
    rates = {}
    for update_name, optimizer in optimizers.items():
        for i, group in enumerate(optimizer.param_groups):
            name = group.get("name") or (update_name if len(optimizer.param_groups) == 1 else f"{update_name}_{i}")
            rates[name.replace(" ", "_")] = float(group["lr"])
    return rates


class TrainLoop:
    """Runs a stage from step 0 (or a checkpoint) to train.steps: a loop of named steps, the details below it."""

    def __init__(self, accelerator: Accelerator, stage: Stage, loader: Iterable, tc: TrainConfig, output_dir: Path):
        self.accelerator, self.stage, self.tc, self.out = accelerator, stage, tc, output_dir
        self.batches = DataStream(loader)
        self.guard = NonFiniteGuard(tc.max_nonfinite_steps)
        self.step = 0
        self.logs: dict[str, float | Tensor] = {}  # the last step's, this process's
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # by update name, as the last step used them
        self.recent: deque[dict[str, float | Tensor]] = deque(maxlen=RECENT_STEPS)

    def run(self, resume: str | None = None) -> dict[str, Any]:
        """Train, export, and return the metrics (also in metrics.json); after a stop signal, the checkpoint."""
        if resume:
            self.resume(resume)  # last before the loop: it sets the RNGs
        first_step, start = self.step, time.perf_counter()
        progress = tqdm(total=self.tc.steps, initial=self.step, desc=self.stage.name, disable=not self.is_main)
        with StopSignal() as signals, progress:
            while self.step < self.tc.steps:
                if not self.run_step():
                    continue  # a micro-batch of gradient accumulation; the optimizers have not stepped
                progress.update(1)
                self.log(progress)
                self.sample()
                stop = signals.requested(self.accelerator)
                if stop or (self.checkpoint_due() and self.guard.healthy(self.step)):
                    self.save()
                if stop:
                    return stopped_early(self.accelerator, self.out, self.step, signals.received)
        return self.finish(first_step, time.perf_counter() - start)

    def run_step(self) -> bool:
        """One micro-batch: each update's backward pass and, where gradients sync, its guarded optimizer step.
        True when that completed an optimizer step."""
        batch = next(self.batches)
        logs: dict[str, float | Tensor] = {}
        applied: dict[str, bool | Tensor] = {}
        accelerator = self.accelerator
        with accelerator.accumulate(*self.stage.models), accelerator.autocast():
            for update in self.stage.updates(batch, self.step):
                accelerator.backward(update.loss)
                self.guard.watch(update.name, update.loss)
                if accelerator.sync_gradients:
                    set_learning_rates(update.optimizer, update.schedules, self.step)
                    self.optimizers[update.name] = update.optimizer
                    applied[update.name] = self.guard.apply(
                        accelerator, update.name, update.optimizer, update.parameters, self.tc.grad_clip
                    )
                logs |= update.logs
        log_rank_step(accelerator, self.step + 1, logs, batch)
        if not accelerator.sync_gradients:
            return False
        self.step += 1
        self.guard.end_step()  # counted on the device; `check` reads the counts at log and checkpoint steps
        self.stage.after_step(applied)
        self.logs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in logs.items()}
        self.recent.append({k: v for k, v in self.logs.items() if k in self.stage.headline})
        return True

    def log(self, progress: tqdm) -> None:
        """Every train.log_every steps: the step's values averaged over processes, to the tracker and the bar."""
        if self.step % self.tc.log_every:
            return
        self.guard.check(self.step)  # raises after train.max_nonfinite_steps skipped updates in a row
        logged = reduce_mean(self.accelerator, {k: float(v) for k, v in self.logs.items()})  # every process joins
        progress.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if k in self.stage.headline})
        extra = {"train/lr": self.lr, "train/nonfinite_steps": self.guard.total}
        extra |= {f"train/lr/{name}": lr for name, lr in group_learning_rates(self.optimizers).items()}
        self.accelerator.log({f"train/{k}": v for k, v in logged.items()} | extra, step=self.step)

    def sample(self) -> None:
        """Every train.sample_every steps, the stage's sample grid (see `joins_outputs`)."""
        if self.step % self.tc.sample_every == 0 and self.joins_outputs:
            scalars = self.stage.write_samples(self.out / "samples" / f"step_{self.step:07d}.png")
            if scalars and self.is_main:
                self.accelerator.log(dict(scalars), step=self.step)

    def checkpoint_due(self) -> bool:
        """Whether the schedule asks for a checkpoint at this step (every train.checkpoint_every, and the last)."""
        return self.step % self.tc.checkpoint_every == 0 or self.step == self.tc.steps

    def save(self) -> None:
        """A complete, atomic checkpoint of this step (every process takes part)."""
        self.guard.check(self.step)  # the counters the checkpoint records
        keep, extra = self.tc.keep_checkpoints, self.stage.save_state
        save_training_state(self.accelerator, self.out, self.step, self.batches, self.guard, keep, extra)

    def resume(self, resume: str) -> None:
        """Continue from checkpoint `resume` ("latest" or a folder): weights, RNGs, data position, stage state."""
        self.step, folder = load_training_state(self.accelerator, self.out, resume, self.batches, self.guard)
        self.stage.load_state(folder)

    def finish(self, first_step: int, train_seconds: float) -> dict[str, Any]:
        """After the last step: the stage's export (see `joins_outputs`) and the run's metrics (main process),
        between two barriers."""
        self.accelerator.wait_for_everyone()
        self.guard.check(self.step)
        recent = reduce_mean(self.accelerator, self.recent_means())  # every process joins
        exported = self.stage.export(self.out) if self.joins_outputs else {}
        metrics: dict[str, Any] = {}
        if self.is_main:
            steps = self.step - first_step
            images = steps * self.tc.batch_size * self.tc.grad_accum * self.accelerator.num_processes
            metrics = {"step": self.step, "steps_this_run": steps, "lr": self.lr, "nonfinite_steps": self.guard.total}
            metrics["lr_by_group"] = group_learning_rates(self.optimizers)
            metrics |= {f"{key}_last_{RECENT_STEPS}_steps": value for key, value in recent.items()}
            metrics["train_seconds"] = round(train_seconds, 1)
            metrics["images_per_second"] = round(images / train_seconds, 1) if train_seconds > 0 else None
            metrics |= exported
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
            logger.info("%s done: %s", self.stage.name, json.dumps(metrics))
        # Every process leaves together, once the export is written: a rank that tore down its process group
        # and exited while the main process still exported was seen to abort in gloo's teardown (SIGABRT).
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return metrics

    def recent_means(self) -> dict[str, float]:
        """Each headline value averaged over the last RECENT_STEPS steps it was logged in (this process)."""
        means = {}
        for key in self.stage.headline:
            values = [float(logs[key]) for logs in self.recent if key in logs]
            if values:
                means[key] = sum(values) / len(values)
        return means

    @property
    def lr(self) -> float:
        """The scheduled LR of the last completed step, at train.lr."""
        return self.tc.lr * learning_rate_factor(max(0, self.step - 1), self.tc)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def joins_outputs(self) -> bool:
        """Whether this process calls the stage's write_samples and export: the main process, and under FSDP every
        process, since each holds a shard of the weights and gathering them is a collective."""
        return self.is_main or self.accelerator.distributed_type == DistributedType.FSDP
