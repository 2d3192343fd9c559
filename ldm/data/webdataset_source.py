"""Streaming image + caption samples from WebDataset `.tar` shards, each shard read by exactly one consumer.

A shard holds samples as files sharing a key: `000123.jpg` (or .png, .webp, ...) and `000123.txt`.
Every consumer (a data-loader worker of a process) reads a disjoint set of whole shards:

    consumer c = rank * num_workers + worker_id,   C = world_size * num_workers
    shards of c = order[c::C],   order = the shard list permuted by Random(seed, epoch)

Every consumer computes the same permutation, so the sets partition the shard list, and the order
still changes each epoch (`set_epoch`). Fewer shards than consumers is an error (some would idle, and
under DDP an idle rank hangs the others); shard counts that do not divide evenly give some consumers
one shard more, so cap an epoch by steps rather than by exhausting the stream.

With Accelerate, do not pass this loader through `accelerator.prepare`: for an IterableDataset it would
make rank 0 read for everyone (or split what each rank already split), so each rank would see only a
fraction of its data. Move the batches to the device instead.
"""

from __future__ import annotations

import glob
import logging
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from ldm.data.buckets import Size
from ldm.data.images import describe_error, load_pixels, utf8_problem

logger = logging.getLogger(__name__)

IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")
CAPTION_KEY = "txt"


def expand_shards(urls_or_glob: str | Sequence[str]) -> list[str]:
    """The shard list: a list as given, or a string split on "::", brace-expanded ("{000..099}") and globbed."""
    if not isinstance(urls_or_glob, str):
        shards = list(urls_or_glob)
    else:
        shards = []
        for url in expand_urls(urls_or_glob):
            if any(ch in url for ch in "*?[") and "://" not in url and not url.startswith("pipe:"):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise FileNotFoundError(f"webdataset shards: no file matches {url!r}")
                shards.extend(matches)
            else:
                shards.append(url)
    if not shards:
        raise ValueError(f"webdataset shards: {urls_or_glob!r} names no shards")
    return shards


def distributed_rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed if initialised, else the RANK / WORLD_SIZE variables that
    torchrun and `accelerate launch` set, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shards_for_consumer(
    shards: Sequence[str],
    rank: int,
    world_size: int,
    worker_id: int = 0,
    num_workers: int = 1,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
) -> list[str]:
    """The shards that worker `worker_id` of process `rank` reads in `epoch` (see the module docstring)."""
    if not (0 <= rank < world_size and 0 <= worker_id < num_workers):
        raise ValueError(f"rank {rank} of {world_size} / worker {worker_id} of {num_workers} is out of range")
    consumers = world_size * num_workers
    if len(shards) < consumers:
        raise ValueError(
            f"webdataset: {len(shards)} shards cannot feed {world_size} processes x {num_workers} data-loader "
            f"workers = {consumers} readers without some reading nothing; use at least {consumers} shards "
            "or fewer workers"
        )
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}/{epoch}").shuffle(order)  # same order in every consumer
    return order[rank * num_workers + worker_id :: consumers]


def this_consumers_shards(
    shards: Sequence[str], rank: int | None, world_size: int | None, seed: int, epoch: int, shuffle: bool = True
) -> list[str]:
    """`shards_for_consumer` for the calling process and data-loader worker: `rank` / `world_size` when given,
    else the launcher's (`distributed_rank_and_world`), and the worker from torch's worker info."""
    launch_rank, launch_world = distributed_rank_and_world()
    rank = launch_rank if rank is None else rank
    world_size = launch_world if world_size is None else world_size
    info = get_worker_info()
    worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return shards_for_consumer(shards, rank, world_size, worker_id, num_workers, seed, epoch, shuffle)


class WebDatasetSource(IterableDataset):
    """Items `{"pixel_values": (3, R, R) in [-1, 1], "caption": str}` streamed from WebDataset shards.

    Images are prepared exactly as in `ImageFolderDataset` (RGB, EXIF, short-side resize, crop, optional
    flip). A sample whose image is missing or cannot be decoded is skipped with a warning naming shard
    and key (`strict=True`: an error); a missing caption is "". Each consumer logs what it read and
    skipped when its pass over its shards ends. `rank` / `world_size` default to the launcher's.
    After `set_buckets`, each image is prepared at the bucket nearest its aspect ratio instead of a square;
    `ldm.data.buckets.BucketedStream` then groups the items into batches of one bucket.
    """

    def __init__(
        self,
        urls_or_glob: str | Sequence[str],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        strict: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        shuffle_shards: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(urls_or_glob)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.strict = strict
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.rank = rank
        self.world_size = world_size
        self.bucket_sizes: list[Size] | None = None  # set by `set_buckets`
        self.epoch = 0

    def set_buckets(self, sizes: list[Size]) -> None:
        """Prepare each image at the bucket of `sizes` ((width, height) pairs) nearest its aspect ratio."""
        self.bucket_sizes = list(sizes)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's shard order; call before iterating (workers copy the dataset at that point)."""
        self.epoch = epoch

    def consumer_shards(self) -> list[str]:
        """The shards this process and data-loader worker read in the current epoch."""
        return this_consumers_shards(
            self.shards, self.rank, self.world_size, self.seed, self.epoch, self.shuffle_shards
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shards = self.consumer_shards()
        stream = self._decode(shards)
        if self.shuffle_buffer > 0:
            # Seeded per consumer (by its first shard) and epoch, so a run is reproducible.
            stream = shuffle_stream(stream, self.shuffle_buffer, random.Random(f"{self.seed}/{self.epoch}/{shards[0]}"))
        yield from stream

    def _decode(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        read, skipped, missing_captions = 0, [], 0

        def on_error(err: Exception) -> bool:  # tar-level problems: a missing or corrupt shard
            if self.strict:
                raise err
            skipped.append(("<shard>", describe_error(err)))
            logger.warning("webdataset: skipping unreadable data: %s", describe_error(err))
            return True

        for sample in tarfile_samples(({"url": url} for url in shards), handler=on_error):
            where = f"{sample.get('__url__')}: {sample.get('__key__')}"
            image_key = next((k for k in IMAGE_KEYS if k in sample), None)
            try:
                if image_key is None:
                    raise ValueError(f"no image file ({', '.join(IMAGE_KEYS)}) in this sample")
                pixels = load_pixels(
                    sample[image_key], self.resolution, self.center_crop, self.random_flip, where, self.bucket_sizes
                )
            except Exception as err:  # decoders of untrusted bytes raise many types
                if self.strict:
                    raise ValueError(f"webdataset sample {where}: {describe_error(err)}") from err
                logger.warning("webdataset: skipping sample %s: %s", where, describe_error(err))
                skipped.append((where, describe_error(err)))
                continue
            caption = self._caption(sample.get(CAPTION_KEY, b""), where)
            missing_captions += not caption
            read += 1
            yield {"pixel_values": pixels, "caption": caption}
        logger.log(
            logging.WARNING if skipped else logging.INFO,
            "webdataset: read %d samples from %d shards, skipped %d, %d with missing captions%s",
            read,
            len(shards),
            len(skipped),
            missing_captions,
            "".join(f"\n  skipped {where}: {reason}" for where, reason in skipped[:20]),
        )

    def _caption(self, raw: bytes, where: str) -> str:
        """The sample's .txt as text; bytes that are not UTF-8 become U+FFFD with a warning (strict: an error)."""
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            problem = f"caption {CAPTION_KEY!r} is not UTF-8 text ({utf8_problem(raw, err)})"
            if self.strict:
                raise ValueError(f"webdataset sample {where}: {problem}") from err
            logger.warning("webdataset sample %s: %s; read with replacement characters", where, problem)
            return raw.decode("utf-8", errors="replace").strip()


def shuffle_stream(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a buffer of `size` items: fill it, then emit a random one per new item."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer
