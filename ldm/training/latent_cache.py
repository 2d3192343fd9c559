"""A cache of the frozen VAE's posterior moments for a fixed dataset, so stage 2 runs only the U-Net.

One pass stores each image's q(z | x) as its moments (mean and log-variance, (2C, h, w)) with its caption.
Training then draws a fresh z = mean + std * eps from them every time an image is seen, exactly as
encoding on the fly would, without running the encoder again. The cache records a fingerprint of the VAE
weights and of the data settings (`conditioning.fingerprint.weights_fingerprint`); a cache made by another
VAE or other data is rebuilt, never reused. It is a `conditioning.sharded_cache` folder: every rank of a
launch encodes its share of the images in resumable parts, and items are read from disk one at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from conditioning.sharded_cache import ShardedCache, build_sharded, no_barrier, num_parts_for, read_manifest

logger = logging.getLogger(__name__)

CACHE_FORMAT = "ldm-latent-cache/2"
PART_SIZE = 1024  # images per part file


class LatentCache(Dataset):
    """Posterior moments and captions of a fixed dataset; item i is {"moments": (2C, h, w), "caption"}."""

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
        encode_moments: nn.Module | Callable[[torch.Tensor], torch.Tensor],
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
        cache = cls.load(folder)
        if not len(cache):
            raise ValueError(f"{folder}: the dataset yielded no images to cache")
        logger.info("cached the latents of %d images in %s (%d parts)", len(cache), folder, num_parts)
        return cache

    @classmethod
    def load_or_build(
        cls,
        folder: str | Path,
        encode_moments: nn.Module | Callable[[torch.Tensor], torch.Tensor],
        dataset: Dataset,
        fingerprint: str,
        batch_size: int = 64,
        part_size: int = PART_SIZE,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = no_barrier,
    ) -> LatentCache:
        """The cache at `folder` when its fingerprint matches, else a fresh one built there (resuming any
        parts a killed build finished). Every rank decides alike, from the same manifest."""
        manifest = read_manifest(folder, CACHE_FORMAT)
        if manifest is not None and manifest["fingerprint"] == fingerprint:  # the manifest alone decides
            return cls.load(folder)
        if Path(folder).exists():
            logger.info("%s: made by another VAE or other data settings, or unfinished; (re)building", folder)
        return cls.build(encode_moments, dataset, folder, fingerprint, batch_size, part_size, rank, world_size, barrier)

    @classmethod
    def load(cls, folder: str | Path) -> LatentCache:
        """Open a finished cache."""
        return cls(ShardedCache(folder, CACHE_FORMAT, "latent cache", "build one with LatentCache.build"))
