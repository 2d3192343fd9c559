"""The one way both stages build their data loaders."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data import collate_examples
from ldm.data.buckets import BucketBatchSampler, BucketedStream, is_bucketed
from ldm.training.config import TrainConfig

logger = logging.getLogger(__name__)


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

    Bucketed data (`ldm.data.buckets`) gives batches of one bucket each: map-style through a
    `BucketBatchSampler` (its order a function of train.seed and the epoch; full batches only when
    shuffled), a stream through a `BucketedStream` buffer per bucket.
    """
    streaming = isinstance(dataset, IterableDataset)
    shuffle = shuffle and not streaming
    common: dict[str, Any] = {
        "num_workers": tc.num_workers,
        "collate_fn": collate_fn,
        "persistent_workers": tc.num_workers > 0 and not streaming,
        "generator": torch.Generator().manual_seed(tc.seed),
    }
    if is_bucketed(dataset) and streaming:
        return DataLoader(BucketedStream(dataset, tc.batch_size), batch_size=None, **common)
    if is_bucketed(dataset):
        sampler = BucketBatchSampler(dataset.bucket_of, tc.batch_size, tc.seed, shuffle=shuffle, drop_last=shuffle)
        if not len(sampler):
            raise ValueError(
                f"data.buckets: no bucket holds train.batch_size={tc.batch_size} images, so an epoch has no full "
                "batch; use a smaller batch size, more images or fewer buckets (a smaller data.max_aspect_ratio)"
            )
        unseen = sum(len(group) for group in sampler.groups if len(group) < tc.batch_size) if shuffle else 0
        if unseen:
            logger.warning(
                "data.buckets: %d images are in buckets of fewer than train.batch_size=%d images, so they are "
                "never trained on; use a smaller batch size or fewer buckets (a smaller data.max_aspect_ratio)",
                unseen,
                tc.batch_size,
            )
        return DataLoader(dataset, batch_sampler=sampler, **common)
    return DataLoader(dataset, batch_size=tc.batch_size, shuffle=shuffle, drop_last=shuffle, **common)
