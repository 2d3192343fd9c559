"""Where a run is in its data, and the checkpoint round trip of the training runtime.

A resumed run must see exactly the batches the uninterrupted run would have seen next. The position is
(epoch, batches drawn in it) plus the shuffle generator's state at the epoch's start: resuming replays
that epoch's permutation and skips what was consumed (accelerate's `skip_first_batches`: for map-style
data the indices are skipped without loading anything). Weights, optimizers, the gradient scaler and the
python / numpy / torch RNGs are accelerate's part; the LR is a function of the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import get_sampler, skip_first_batches
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from ldm.training.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, step_folder
from ldm.training.faults import NonFiniteGuard

logger = logging.getLogger(__name__)

DATA_FILE = "data_state.safetensors"
_GENERATOR = "shuffle_generator"


class DataStream:
    """Training batches epoch after epoch, knowing their position (epoch, batches drawn in the epoch)."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.epoch = 0
        self.position = 0
        sampler = get_sampler(loader) if isinstance(loader, DataLoader) else None
        self.generator: torch.Generator | None = getattr(sampler, "generator", None)
        self._epoch_start = self.generator.get_state() if self.generator is not None else None
        self._batches: Iterator[Any] | None = None

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> Any:
        for _ in range(2):  # at most one epoch boundary per batch
            if self._batches is None:
                self._batches = self._open_epoch()
            batch = next(self._batches, _END)
            if batch is not _END:
                self.position += 1
                return batch
            self._batches, self.epoch, self.position = None, self.epoch + 1, 0
        raise ValueError("train loader: an epoch gave no batch (fewer examples than batch_size with drop_last?)")

    def _open_epoch(self) -> Iterator[Any]:
        if self.generator is not None:
            self._epoch_start = self.generator.get_state()
        dataset = getattr(self.loader, "dataset", None)
        if hasattr(self.loader, "set_epoch"):  # accelerate's loaders
            self.loader.set_epoch(self.epoch)
        elif hasattr(dataset, "set_epoch"):  # a stream (not prepared by Accelerate): the epoch's shard order
            dataset.set_epoch(self.epoch)
        if self.position == 0:
            return iter(self.loader)
        if isinstance(self.loader, DataLoader):
            return iter(skip_first_batches(self.loader, self.position))
        logger.info("train loader: not a DataLoader; reading and dropping %d batches to resume", self.position)
        batches = iter(self.loader)
        for _ in range(self.position):
            next(batches)
        return batches

    def save(self, folder: Path) -> None:
        """Write the position and the epoch's starting shuffle state to folder/data_state.safetensors."""
        tensors = {_GENERATOR: self._epoch_start} if self._epoch_start is not None else {}
        save_file(tensors, str(folder / DATA_FILE), metadata={"epoch": str(self.epoch), "position": str(self.position)})

    def load(self, folder: Path) -> None:
        """Continue from the position `save` wrote: the next batch is the one the saved run would have drawn."""
        path = folder / DATA_FILE
        if not path.is_file():
            logger.warning("%s: no data position in this checkpoint; the data restarts at a new epoch", folder)
            return
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = f.get_tensor(_GENERATOR) if _GENERATOR in f.keys() else None  # noqa: SIM118 (not a dict)
        if (state is None) != (self.generator is None):
            logger.warning(
                "%s: saved %s a shuffle generator, this run's train loader has %s; the batches after the resume "
                "follow this loader's order (resume with the data settings the checkpoint was trained with)",
                path, "with" if state is not None else "without", "one" if self.generator is not None else "none",
            )  # fmt: skip
        self.epoch, self.position = int(metadata["epoch"]), int(metadata["position"])
        if state is not None and self.generator is not None:
            self.generator.set_state(state)
            self._epoch_start = state
        self._batches = None


_END = object()


def save_training_state(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    stream: DataStream,
    guard: NonFiniteGuard,
    keep: int,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """A complete checkpoint of the run at `step` (collective): accelerate's state, the data position,
    the non-finite counters, and whatever `extra(folder)` writes (the main process writes these files)."""

    def write(folder: Path) -> None:
        if accelerator.is_main_process:
            stream.save(folder)
            if extra is not None:
                extra(folder)

    return save_checkpoint(accelerator, output_dir, step, write, {"nonfinite": guard.state_dict()}, keep)


def load_training_state(
    accelerator: Accelerator, output_dir: Path, resume: str, stream: DataStream, guard: NonFiniteGuard
) -> tuple[int, Path]:
    """Restore a checkpoint ("latest" or a folder) into the prepared objects; returns (step, folder).

    Call it last before the loop: it sets the RNGs, and anything drawn after it would shift them.
    """
    folder = resolve_resume(output_dir, resume)
    saved = load_checkpoint(accelerator, folder)
    stream.load(folder)
    guard.load_state_dict(saved.get("nonfinite", {}))
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, saved["step"], stream.epoch, stream.position)
    return int(saved["step"]), folder


def stopped_early(accelerator: Accelerator, output_dir: Path, step: int, signal_name: str | None) -> dict[str, Any]:
    """End a run that a signal stopped after its checkpoint was saved; returns what the command reports."""
    folder = step_folder(output_dir, step)
    signal_name = signal_name or "a signal to another process"
    logger.warning("%s: stopped at step %d; checkpoint %s; continue with --resume latest", signal_name, step, folder)
    accelerator.end_training()
    return {"step": step, "stopped_by": signal_name, "checkpoint": str(folder)}
