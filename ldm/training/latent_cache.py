"""A cache of the frozen VAE's posterior moments for a fixed dataset, so stage 2 runs only the U-Net.

One pass stores each image's q(z | x) as its moments (mean and log-variance, (2C, h, w)) with its caption.
Training then draws a fresh z = mean + std * eps from them every time an image is seen, exactly as
encoding on the fly would, without running the encoder again. The file records a fingerprint of the VAE
weights and of the data settings (`conditioning.fingerprint.weights_fingerprint`); a cache made by another
VAE or other data is rebuilt, never reused. The file itself is a `conditioning.cache_file`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from conditioning.cache_file import cache_file_fingerprint, read_cache_file, write_cache_file

logger = logging.getLogger(__name__)

CACHE_FORMAT = "ldm-latent-cache/1"


class LatentCache(Dataset):
    """Posterior moments (N, 2C, h, w) and captions of a fixed dataset; item i is {"moments", "caption"}."""

    def __init__(self, moments: torch.Tensor, captions: list[str], fingerprint: str) -> None:
        if moments.shape[0] != len(captions):
            raise ValueError(f"captions: {len(captions)} captions for {moments.shape[0]} latents")
        self.moments = moments
        self.captions = captions
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {"moments": self.moments[index], "caption": self.captions[index]}

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        encode_moments: nn.Module,
        dataset: Dataset,
        path: str | Path,
        fingerprint: str,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
    ) -> LatentCache:
        """Encode every item of `dataset` ({"pixel_values", "caption"}) once and save the cache to `path`.

        `encode_moments` maps images (B, 3, H, W) in [-1, 1] to moments (B, 2C, h, w).
        """
        from ldm.data import collate_examples

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_examples)
        moments, captions = [], []
        for batch in tqdm(loader, desc="caching latents", unit="batch"):
            if not batch["captions"]:
                continue  # every image of the batch was unreadable (reported by the data layer)
            moments.append(encode_moments(batch["pixel_values"].to(device)).float().cpu())
            captions.extend(batch["captions"])
        if not moments:
            raise ValueError(f"{path}: the dataset yielded no images to cache")
        cache = cls(torch.cat(moments), captions, fingerprint)
        cache.save(path)
        logger.info("cached the latents of %d images in %s", len(cache), path)
        return cache

    @classmethod
    def load_or_build(
        cls,
        path: str | Path,
        encode_moments: nn.Module,
        dataset: Dataset,
        fingerprint: str,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
    ) -> LatentCache:
        """The cache at `path` when its fingerprint matches, else a fresh one built and saved there."""
        if cache_file_fingerprint(path, CACHE_FORMAT) == fingerprint:  # the header alone decides
            return cls.load(path)
        if Path(path).is_file():
            logger.info("%s: made by another VAE or other data settings; rebuilding", path)
        return cls.build(encode_moments, dataset, path, fingerprint, batch_size, device)

    def save(self, path: str | Path) -> None:
        """Write the cache (to a temporary name, then renamed, so a crash never leaves half a file)."""
        extra = {"num_images": str(len(self))}
        write_cache_file(path, {"moments": self.moments}, self.captions, CACHE_FORMAT, self.fingerprint, extra)

    @classmethod
    def load(cls, path: str | Path) -> LatentCache:
        """Read a cache written by `save`."""
        file = read_cache_file(path, CACHE_FORMAT, "latent cache", "build one with LatentCache.build")
        return cls(file.tensors["moments"], file.strings, file.fingerprint)
