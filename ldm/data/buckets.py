"""Aspect-ratio buckets: train on whole images of any shape instead of square crops of them.

As SDXL, NovelAI and kohya's trainers do: a fixed set of sizes (width, height) of about the training area
resolution**2 (never more), each side a multiple of the model's size multiple (the VAE's factor times the
U-Net's downsampling, so every latent grid halves cleanly), with aspect ratios up to a maximum, in both
orientations, the square included. Each image goes to the bucket whose aspect ratio is nearest its own,
compared as log ratios (so 2:1 and 1:2 are equally far from the square); it is resized to cover the bucket and
cropped only by the remainder. Every batch holds images of one bucket:

- map-style data (an image folder, the latent cache): `BucketBatchSampler` groups indices by bucket, shuffles
  within each bucket and shuffles the order of the batches, from (seed, epoch) alone;
- streams (WebDataset shards, latent shards): `BucketedStream` keeps a buffer per bucket and yields a batch
  when one fills.

A dataset is bucketed when it has `bucket_sizes` (a list of (width, height)); a map-style one also has
`bucket_of`, each item's index into that list.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset, IterableDataset, Sampler, Subset

if TYPE_CHECKING:
    from ldm.data.config import DataConfig

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height) in pixels
BUCKETED_SOURCES = ("imagefolder", "webdataset")


def bucket_sizes(resolution: int, multiple: int, max_aspect_ratio: float = 2.0) -> list[Size]:
    """The buckets for training at `resolution`: (width, height) pairs sorted by aspect ratio w / h.

    The square side is the largest multiple of `multiple` not above `resolution`. For each wider width
    w = side + k * multiple, the height is the largest multiple with w * h <= resolution**2 (so no bucket costs
    more than the square), while w / h <= max_aspect_ratio; each such pair is added in both orientations.
    """
    if multiple < 1:
        raise ValueError(f"bucket_sizes: the size multiple must be >= 1, got {multiple}")
    if max_aspect_ratio < 1:
        raise ValueError(f"max_aspect_ratio: must be >= 1, got {max_aspect_ratio}")
    side = resolution // multiple * multiple
    if side < multiple:
        raise ValueError(f"data.resolution: {resolution} is smaller than the model's size multiple {multiple}")
    area = resolution * resolution
    sizes = {(side, side)}
    width = side + multiple
    while True:
        height = area // (width * multiple) * multiple
        if height < multiple or width / height > max_aspect_ratio:
            break  # the height only shrinks as the width grows: every later ratio is larger still
        sizes |= {(width, height), (height, width)}
        width += multiple
    return sorted(sizes, key=lambda s: (s[0] / s[1], s))


def nearest_bucket(width: int, height: int, sizes: Sequence[Size]) -> int:
    """The index of the bucket in `sizes` whose aspect ratio is nearest width / height in log ratio (the
    first of equals)."""
    if width < 1 or height < 1:
        raise ValueError(f"an image of {width}x{height} pixels has no aspect ratio")
    ratio = math.log(width / height)
    return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i][0] / sizes[i][1]) - ratio))


def describe_buckets(sizes: Sequence[Size], bucket_of: Sequence[int]) -> str:
    """A line for the log: "3 of 3 buckets in use: 12x20: 8, 16x16: 8, 20x12: 8" (width x height: items)."""
    counts = Counter(bucket_of)
    used = [f"{w}x{h}: {counts[b]}" for b, (w, h) in enumerate(sizes) if counts[b]]
    return f"{len(used)} of {len(sizes)} buckets in use: " + ", ".join(used)


def is_bucketed(dataset: Dataset | IterableDataset) -> bool:
    """Whether `dataset` prepares items at bucket sizes (it has `bucket_sizes`), so batches must group them."""
    return getattr(dataset, "bucket_sizes", None) is not None


def bucket_of_items(dataset: Dataset) -> list[int] | None:
    """Each item's bucket for a bucketed map-style dataset, or a `Subset` of one; None when not bucketed."""
    if isinstance(dataset, Subset):
        parent = bucket_of_items(dataset.dataset)
        return None if parent is None else [parent[i] for i in dataset.indices]
    bucket_of = getattr(dataset, "bucket_of", None)
    return None if bucket_of is None else list(bucket_of)


def use_buckets(dataset: Dataset | IterableDataset, cfg: DataConfig, multiple: int) -> Dataset | IterableDataset:
    """`dataset` (the training split `build_dataset(cfg, "train")` made) bucketed as cfg.buckets asks.

    `multiple` is the model's size multiple, which the data config cannot know. Image sources get
    `bucket_sizes(cfg.resolution, multiple, cfg.max_aspect_ratio)`; precomputed latents are returned as they
    are (their shards were written at the sizes the precompute chose). Without cfg.buckets nothing changes.
    """
    if not cfg.buckets or cfg.source not in BUCKETED_SOURCES:
        return dataset
    set_buckets = getattr(dataset, "set_buckets", None)
    if set_buckets is None:
        raise ValueError(f"data.buckets: {type(dataset).__name__} cannot prepare images at bucket sizes")
    set_buckets(bucket_sizes(cfg.resolution, multiple, cfg.max_aspect_ratio))
    return dataset


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices of one bucket each, in an order that depends only on (seed, epoch).

    Each epoch every bucket's indices are shuffled and cut into batches of `batch_size`, and the batches of all
    buckets are shuffled together; with `drop_last` each bucket's short last batch is left out (a different
    remainder each epoch), so every step sees `batch_size` items and every index is drawn at most once. Without
    `drop_last`, every index is drawn exactly once per epoch. Call `set_epoch` before each epoch (accelerate's
    loaders and `DataStream` do).

    Under `accelerate.prepare`, process r of P takes batches r, r + P, ... (accelerate's `BatchSamplerShard`),
    so the ranks get disjoint batches, each of one bucket, and a resume skips whole batches of the same order.
    """

    def __init__(
        self,
        bucket_of: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        groups: dict[int, list[int]] = {}
        for index, bucket in enumerate(bucket_of):
            groups.setdefault(int(bucket), []).append(index)
        self.groups = [groups[b] for b in sorted(groups)]  # the indices of each bucket in use, in index order
        self.items_per_batch = batch_size
        # accelerate's BatchSamplerShard evens out the ranks' last batches: with a fixed `batch_size` it tops a
        # short batch up with indices from the start (mixing buckets), with None it repeats whole batches.
        self.batch_size = batch_size if drop_last else None
        self.drop_last = drop_last
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0

    @property
    def sampler(self) -> BucketBatchSampler:
        """Itself: accelerate's `DataLoaderShard.set_epoch` reaches the epoch of a batch sampler it has wrapped
        (for several processes, or to skip batches on resume) through `.batch_sampler.sampler.set_epoch`."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's order (the same in every process)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(group) // self.items_per_batch for group in self.groups)
        return sum(math.ceil(len(group) / self.items_per_batch) for group in self.groups)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"buckets/{self.seed}/{self.epoch}")  # a string seed: the same in every process
        batches = []
        for group in self.groups:
            order = list(group)
            if self.shuffle:
                rng.shuffle(order)
            size = self.items_per_batch
            end = len(order) - len(order) % size if self.drop_last else len(order)
            batches += [order[start : start + size] for start in range(0, end, size)]
        if self.shuffle:
            rng.shuffle(batches)
        yield from batches


class BucketedStream(IterableDataset):
    """The items of a bucketed stream as lists of `batch_size` items of one size (read it with batch_size=None).

    A buffer per size fills as items arrive and is yielded when full; at the end of the stream the partly
    filled buffers are yielded too (a stream's last batch is short anyway). At most
    (buckets x (batch_size - 1)) items wait in memory.
    """

    def __init__(self, source: IterableDataset, batch_size: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.source, self.batch_size = source, batch_size
        self.bucket_sizes = source.bucket_sizes  # type: ignore[attr-defined]

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the stream (its shard order)."""
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        buffers: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        for item in self.source:
            key = item_size(item)
            buffer = buffers.setdefault(key, [])
            buffer.append(item)
            if len(buffer) == self.batch_size:
                yield buffer
                buffers[key] = []
        yield from (buffer for buffer in buffers.values() if buffer)


def item_size(item: dict[str, Any]) -> tuple[int, ...]:
    """The spatial size of an item's image or latent moments: (H, W) of "pixel_values" or "moments"."""
    tensor = item["pixel_values"] if "pixel_values" in item else item["moments"]
    return tuple(tensor.shape[-2:])
