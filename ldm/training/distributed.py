"""What both trainers need to run the same on one process or many under `accelerate launch`.

- `prepare_loader`: map-style data is sharded by Accelerate (each process a disjoint set of batches per
  epoch, the shuffle order broadcast from the main process, or, for aspect-ratio buckets, drawn alike by
  every process from the seed and epoch); a stream that splits itself is left alone.
- `reduce_mean`: logged values are means over all processes, not the main process's share alone.
- `log_rank_step`: at DEBUG level (`ldm --log-level DEBUG ...`), one line per process and step with what
  it computed and which captions it trained on, so a multi-process run can be checked from its log.
- `is_sharded`, `whole`, `placed_like`: under FSDP (accelerate's `fully_shard`) each parameter is a DTensor of
  which a process holds one shard; these tell, gather (a collective) and re-shard such tensors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.data import DataLoader, IterableDataset

logger = logging.getLogger(__name__)


def prepare_loader(accelerator: Accelerator, loader: Iterable) -> Iterable:
    """`loader` as this process should read it: a map-style DataLoader prepared by Accelerate, anything else as is.

    A loader with a `BucketBatchSampler` (data.buckets) is split by whole batches: process r of P reads batches
    r, r + P, ... of the one order every process draws, so each gets different batches, each of one bucket.

    A streaming dataset (e.g. `WebDatasetSource`) already reads a disjoint set of shards per rank and
    worker; Accelerate's `IterableDatasetShard` would make each rank keep only every num_processes-th
    batch of its own share, so a rank would see 1/num_processes of its data per pass. Such batches are not
    placed on the device by Accelerate: the trainers move them.
    """
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        return accelerator.prepare(loader)
    return loader


def reduce_mean(accelerator: Accelerator, values: Mapping[str, float]) -> dict[str, float]:
    """The mean of each value over all processes; every process must call this with the same keys, in order."""
    if accelerator.num_processes == 1:
        return dict(values)
    stacked = torch.tensor(list(values.values()), dtype=torch.float32, device=accelerator.device)
    return dict(zip(values, accelerator.reduce(stacked, "mean").tolist(), strict=True))


def log_rank_step(accelerator: Accelerator, step: int, values: Mapping[str, float | Tensor], batch: object) -> None:
    """At DEBUG level: `rank R step S {"values": {...}, "captions": [...]}` for this process's micro-batch.

    `values` are this process's own (unreduced) numbers; `captions` are those of `batch` when it is a dict
    with "captions". Nothing is computed (no device sync) unless DEBUG logging is on.
    """
    if not logger.isEnabledFor(logging.DEBUG):
        return
    numbers = {k: float(v.detach().float().item()) if isinstance(v, Tensor) else float(v) for k, v in values.items()}
    captions = batch.get("captions", []) if isinstance(batch, dict) else []
    record = json.dumps({"values": numbers, "captions": list(captions)}, ensure_ascii=False)
    logger.debug("rank %d step %d %s", accelerator.process_index, step, record)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model`'s parameters are sharded over the processes (FSDP), so each process holds only a part."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def whole(tensor: Tensor) -> Tensor:
    """The full tensor: a sharded one gathered from every process (a collective: every rank must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def placed_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` (a whole tensor every process holds) on `like`'s device and dtype, and sharded as `like` is.

    Each process keeps its own slice; nothing is communicated (`src_data_rank=None`).
    """
    if not isinstance(like, DTensor):
        return full.to(like.device, like.dtype)
    full = full.to(like.device, like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
