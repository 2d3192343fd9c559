"""The one way both stages build their data loaders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data import collate_examples
from ldm.training.config import TrainConfig


def make_loader(
    dataset: Dataset | IterableDataset,
    tc: TrainConfig,
    shuffle: bool = True,
    collate_fn: Callable[[list[Any]], Any] = collate_examples,
) -> DataLoader:
    """A loader of train.batch_size examples with train.num_workers workers.

    Map-style data with `shuffle` is reshuffled every epoch by the loader's own generator, seeded by
    train.seed (not the global RNG, which the training noise also draws from), so a resume can replay the
    permutation; such a loader gives full batches only, so every step sees batch_size examples. A stream
    keeps its own order, and its workers are not persistent: they must copy it anew each epoch to see its
    `set_epoch` (the shard order).
    """
    streaming = isinstance(dataset, IterableDataset)
    shuffle = shuffle and not streaming
    return DataLoader(
        dataset,
        batch_size=tc.batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        num_workers=tc.num_workers,
        collate_fn=collate_fn,
        persistent_workers=tc.num_workers > 0 and not streaming,
        generator=torch.Generator().manual_seed(tc.seed),
    )
