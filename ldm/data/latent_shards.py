"""Streaming precomputed latents: WebDataset shards written by `ldm precompute-latents`, read like images.

A latent shard holds, per sample key:

    KEY.moments.npy        the VAE posterior's moments (2C, h, w), float32
    KEY.moments_flip.npy   the same for the horizontally flipped image (when written with data.random_flip)
    KEY.context.npy        the frozen text encoder's embedding of the caption (L, D), float16 (optional)
    KEY.txt                the caption

and FOLDER/manifest.json says what made them (the VAE's and text encoder's fingerprints, the data
settings) and lists the shards. Shards are split between consumers exactly as image shards are
(`webdataset_source.shards_for_consumer`), so a stream of latents trains on any number of processes.
Arrays are read with `numpy.load(allow_pickle=False)`: a shard is data, never code.

A precompute with data.buckets writes each sample's moments at its bucket's size and lists the bucket
sizes in the manifest's data settings; the stream is then bucketed (`bucket_sizes`) and the loader batches
it by size (`ldm.data.buckets.BucketedStream`).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset
from webdataset.tariterators import tarfile_samples

from ldm.data.webdataset_source import shuffle_stream, this_consumers_shards

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ldm-latent-shards/1"


def read_latent_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a finished precompute at `folder`; a clear error when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"data.train_path: {folder} holds no {MANIFEST}; write the latent shards with `ldm precompute-latents` "
            "(an unfinished precompute has none: run it again, it resumes)"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a latent-shard manifest (format {manifest.get('format')!r})")
    return manifest


def encode_array(array: torch.Tensor) -> bytes:
    """A tensor as .npy bytes (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array.detach().cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def decode_array(data: bytes) -> torch.Tensor:
    """.npy bytes as a tensor; refuses pickled objects."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


class LatentShardSource(IterableDataset):
    """Items {"moments": (2C, h, w), "caption": str} (+ "context": (L, D) with `with_context`) streamed from
    the latent shards at `folder`.

    With `random_flip`, each sample's moments are those of the image or of its mirror image, drawn from
    a generator seeded per consumer and epoch (as the shuffle), so a resumed run reads the same stream.
    """

    def __init__(
        self,
        folder: str | Path,
        random_flip: bool = False,
        with_context: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.manifest = read_latent_manifest(folder)
        if random_flip and not self.manifest["flip"]:
            raise ValueError(
                f"data.random_flip: the latents at {folder} hold no flipped views; precompute them with "
                "data.random_flip=true, or train without the flip"
            )
        if with_context and self.manifest.get("text_encoder") is None:
            raise ValueError(f"{folder}: holds no caption embeddings (precomputed with a trainable text encoder)")
        self.shards = [str(self.folder / name) for name in self.manifest["shards"]]
        self.random_flip, self.with_context = random_flip, with_context
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        buckets = self.manifest["data"].get("buckets")  # (width, height) pairs, or absent: square latents
        self.bucket_sizes = None if buckets is None else [(int(w), int(h)) for w, h in buckets]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's shard order; call before iterating."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shards = this_consumers_shards(self.shards, self.rank, self.world_size, self.seed, self.epoch)
        flips = random.Random(f"flip/{self.seed}/{self.epoch}/{shards[0]}")
        stream = (self._item(sample, flips) for sample in tarfile_samples({"url": url} for url in shards))
        if self.shuffle_buffer > 0:
            stream = shuffle_stream(stream, self.shuffle_buffer, random.Random(f"{self.seed}/{self.epoch}/{shards[0]}"))
        yield from stream

    def _item(self, sample: dict[str, Any], flips: random.Random) -> dict[str, Any]:
        flip = self.random_flip and flips.random() < 0.5
        item = {
            "moments": decode_array(sample["moments_flip.npy" if flip else "moments.npy"]),
            "caption": sample["txt"].decode("utf-8"),
        }
        if self.with_context:
            item["context"] = decode_array(sample["context.npy"])
        return item
