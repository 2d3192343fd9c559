"""A cache of the frozen VAE's posterior moments for a fixed dataset, so stage 2 runs only the U-Net.

One pass stores each image's q(z | x) as its moments (mean and log-variance, (2C, h, w)) with its caption.
Training then draws a fresh z = mean + std * eps from them every time an image is seen, exactly as
encoding on the fly would, without running the encoder again. The cache records a fingerprint of the VAE
weights and of the data settings (`conditioning.fingerprint.weights_fingerprint`); a cache made by another
VAE or other data is rebuilt, never reused. It is a `conditioning.sharded_cache` folder: every rank of a
launch encodes its share of the images in resumable parts, and items are read from disk one at a time.

A bucketed dataset (`ldm.data.buckets`) is cached as one such folder per bucket size, FOLDER/{W}x{H}/, each
holding the moments of that size (`BucketedLatentCache`); FOLDER/manifest.json lists the buckets.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from conditioning.cache_file import write_json_atomically
from conditioning.sharded_cache import (
    MANIFEST,
    ShardedCache,
    build_sharded,
    no_barrier,
    num_parts_for,
    read_manifest,
)
from ldm.data.buckets import Size, bucket_of_items, describe_buckets

logger = logging.getLogger(__name__)

CACHE_FORMAT = "ldm-latent-cache/2"
BUCKETED_FORMAT = "ldm-latent-buckets/1"
PART_SIZE = 1024  # images per part file

Encoder = nn.Module | Callable[[torch.Tensor], torch.Tensor]


class CacheFolder:
    """`load_or_build` for a cache class with a `cache_format`, a `load(folder)` and a `build(...)`."""

    cache_format: str

    @classmethod
    def load_or_build(
        cls,
        folder: str | Path,
        encode_moments: Encoder,
        dataset: Dataset,
        fingerprint: str,
        batch_size: int = 64,
        part_size: int = PART_SIZE,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = no_barrier,
    ) -> Any:
        """The cache at `folder` when its fingerprint matches, else a fresh one built there (resuming any
        parts a killed build finished). Every rank decides alike, from the same manifest."""
        manifest = read_manifest(folder, cls.cache_format)
        if manifest is not None and manifest["fingerprint"] == fingerprint:  # the manifest alone decides
            return cls.load(folder)  # type: ignore[attr-defined]
        if Path(folder).exists():
            logger.info("%s: made by another VAE or other data settings, or unfinished; (re)building", folder)
        launch = (rank, world_size, barrier)
        return cls.build(encode_moments, dataset, folder, fingerprint, batch_size, part_size, *launch)  # type: ignore[attr-defined]


class LatentCache(CacheFolder, Dataset):
    """Posterior moments and captions of a fixed dataset; item i is {"moments": (2C, h, w), "caption"}."""

    bucket_sizes = None  # not bucketed: every item has the same size
    cache_format = CACHE_FORMAT

    def __init__(self, store: ShardedCache) -> None:
        self.store = store
        self.fingerprint = store.fingerprint

    @property
    def captions(self) -> list[str]:
        """Every item's caption, in item order."""
        return self.store.strings

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {"moments": self.store.rows("moments", [index])[0], "caption": self.store.strings[index]}

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        encode_moments: Encoder,
        dataset: Dataset,
        folder: str | Path,
        fingerprint: str,
        batch_size: int = 64,
        part_size: int = PART_SIZE,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = no_barrier,
    ) -> LatentCache:
        """Encode every item of `dataset` ({"pixel_values", "caption"}) once into the cache folder `folder`.

        `encode_moments` maps images (B, 3, H, W) in [-1, 1] to moments (B, 2C, h, w). Under a launch every
        rank calls this with its `rank`, the `world_size` and a `barrier`; each encodes every
        world_size-th part of `part_size` images.
        """
        launch = (rank, world_size, barrier)
        num_parts = write_parts(encode_moments, dataset, folder, fingerprint, batch_size, part_size, *launch)
        cache = cls.load(folder)
        if not len(cache):
            raise ValueError(f"{folder}: the dataset yielded no images to cache")
        logger.info("cached the latents of %d images in %s (%d parts)", len(cache), folder, num_parts)
        return cache

    @classmethod
    def load(cls, folder: str | Path) -> LatentCache:
        """Open a finished cache."""
        return cls(ShardedCache(folder, CACHE_FORMAT, "latent cache", "build one with LatentCache.build"))


def write_parts(
    encode_moments: Encoder,
    dataset: Dataset,
    folder: str | Path,
    fingerprint: str,
    batch_size: int,
    part_size: int,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
) -> int:
    """Encode `dataset` (items of one size) into the sharded cache folder `folder` as `LatentCache.build`
    describes; returns the number of parts."""
    from ldm.data import collate_examples

    num_parts = num_parts_for(len(dataset), part_size)  # type: ignore[arg-type]

    def encode_part(part: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        indices = range(part * part_size, min((part + 1) * part_size, len(dataset)))  # type: ignore[arg-type]
        loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collate_examples)
        moments, captions = [], []
        for batch in loader:
            if not batch["captions"]:
                continue  # every image of the batch was unreadable (reported by the data layer)
            moments.append(encode_moments(batch["pixel_values"]).float().cpu())
            captions.extend(batch["captions"])
        return {"moments": torch.cat(moments) if moments else torch.empty(0)}, captions

    launch = (rank, world_size, barrier)
    build_sharded(folder, CACHE_FORMAT, fingerprint, num_parts, encode_part, "", *launch, "caching latents")
    return num_parts


class BucketedLatentCache(CacheFolder, Dataset):
    """The latent cache of a bucketed dataset: one `LatentCache` per bucket size, items bucket after bucket.

    Item i is {"moments": (2C, h, w), "caption"} at its bucket's latent size; `bucket_of[i]` is its index into
    `bucket_sizes` (the (width, height) pixel sizes of the buckets that hold items), which the loader batches
    by. Like `LatentCache`, it keeps captions and offsets in memory and reads the moments per item.
    """

    cache_format = BUCKETED_FORMAT

    def __init__(self, bucket_sizes: list[Size], caches: list[LatentCache], fingerprint: str) -> None:
        self.bucket_sizes, self.caches, self.fingerprint = bucket_sizes, caches, fingerprint
        self.offsets = [0]  # the item index where each bucket starts, and the total
        for cache in caches:
            self.offsets.append(self.offsets[-1] + len(cache))
        self.bucket_of = [b for b, cache in enumerate(caches) for _ in range(len(cache))]

    @property
    def captions(self) -> list[str]:
        """Every item's caption, in item order (a new list)."""
        return [caption for cache in self.caches for caption in cache.captions]

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict[str, object]:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of a latent cache of {len(self)} items")
        bucket = bisect.bisect_right(self.offsets, index) - 1
        return self.caches[bucket][index - self.offsets[bucket]]

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        encode_moments: Encoder,
        dataset: Dataset,
        folder: str | Path,
        fingerprint: str,
        batch_size: int = 64,
        part_size: int = PART_SIZE,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = no_barrier,
    ) -> BucketedLatentCache:
        """Encode every item of the bucketed `dataset` once, each bucket into its own folder FOLDER/{W}x{H}/.

        Under a launch every rank calls this as it calls `LatentCache.build`. The parts of the k-th bucket are
        dealt out from rank k % world_size on, so the first parts of the small buckets do not all fall to rank 0.
        """
        folder, sizes, bucket_of = Path(folder), getattr(dataset, "bucket_sizes", None), bucket_of_items(dataset)
        if sizes is None or bucket_of is None:
            raise ValueError("BucketedLatentCache.build: the dataset is not bucketed (no bucket_sizes / bucket_of)")
        if rank == 0:
            (folder / MANIFEST).unlink(missing_ok=True)  # an older manifest must not outlive what it describes
        members: dict[int, list[int]] = {}
        for index, bucket in enumerate(bucket_of):
            members.setdefault(bucket, []).append(index)
        used = sorted(members)
        for k, bucket in enumerate(used):
            launch = ((rank - k) % world_size, world_size, barrier)
            subset, where = Subset(dataset, members[bucket]), _bucket_folder(folder, sizes[bucket])
            write_parts(encode_moments, subset, where, fingerprint, batch_size, part_size, *launch)
        # A bucket whose images all turned out unreadable has no rows: it is left out.
        filled = [sizes[b] for b in used if len(LatentCache.load(_bucket_folder(folder, sizes[b])))]
        if not filled:
            raise ValueError(f"{folder}: the dataset yielded no images to cache")
        if rank == 0:
            manifest = {"format": BUCKETED_FORMAT, "fingerprint": fingerprint, "buckets": [list(s) for s in filled]}
            write_json_atomically(folder / MANIFEST, manifest)
        barrier()
        cache = cls.load(folder)
        summary = describe_buckets(cache.bucket_sizes, cache.bucket_of)
        logger.info("cached the latents of %d images in %s; %s", len(cache), folder, summary)
        return cache

    @classmethod
    def load(cls, folder: str | Path) -> BucketedLatentCache:
        """Open a finished bucketed cache."""
        manifest = read_manifest(folder, BUCKETED_FORMAT)
        if manifest is None:
            raise FileNotFoundError(
                f"{folder}: no finished bucketed latent cache here (no {MANIFEST}); build one with "
                "BucketedLatentCache.build"
            )
        sizes = [(int(w), int(h)) for w, h in manifest["buckets"]]
        caches = [LatentCache.load(_bucket_folder(Path(folder), size)) for size in sizes]
        return cls(sizes, caches, manifest["fingerprint"])


def _bucket_folder(folder: Path, size: Size) -> Path:
    """Where the latents of the bucket of (width, height) pixels `size` live."""
    return folder / f"{size[0]}x{size[1]}"
