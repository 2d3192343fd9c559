"""`precompute_latents`: write a dataset's VAE moments (and frozen caption embeddings) as WebDataset shards.

Stage 2 then streams latents instead of images (`data.source: latents`), so a dataset of any size trains
without the VAE encoder in the loop and without a cache in memory. The work is split like the caches':
output shard j is input chunk j (an input .tar shard, or `samples_per_shard` items of a folder), written
by rank j % world_size under a temporary name and renamed when complete, with a small sidecar
`latents-J.json` naming the models that made it. A killed run, launched again, redoes only the
shards without a current sidecar; rank 0 writes FOLDER/manifest.json when all exist.

With data.buckets each sample's moments are stored at its aspect-ratio bucket's size (`ldm.data.buckets`;
the sizes, which depend on the VAE and cfg.unet, are listed in the manifest's data settings).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm.auto import tqdm

from conditioning import TextEncoder
from conditioning.cache_file import write_json_atomically
from conditioning.fingerprint import weights_fingerprint
from ldm.data import build_dataset, collate_examples
from ldm.data.buckets import BucketBatchSampler, BucketedStream, Size, bucket_of_items, bucket_sizes, is_bucketed
from ldm.data.latent_shards import MANIFEST, MANIFEST_FORMAT, encode_array
from ldm.data.webdataset_source import WebDatasetSource
from ldm.training.batches import size_multiple
from ldm.training.diffusion_config import DiffusionExperimentConfig
from ldm.training.diffusion_stage import load_vae

logger = logging.getLogger(__name__)

CONTEXT_DTYPE = torch.float16  # SD-1.x: 77 x 768 x 2 bytes = 118 KB a caption


def precompute_latents(
    cfg: DiffusionExperimentConfig, output_dir: str | Path, samples_per_shard: int = 1000, batch_size: int = 64
) -> dict[str, Any]:
    """Encode cfg.data's training split with cfg.autoencoder (and a frozen cfg.text_encoder) into latent
    shards at `output_dir`; returns the manifest. Runs as is on one process or under `accelerate launch`."""
    if cfg.data.source == "latents":
        raise ValueError("data.source: is already 'latents'; point the config at the images to precompute")
    if not cfg.data.center_crop:
        raise ValueError("data.center_crop: a random crop makes a new view every epoch and cannot be precomputed")
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard: must be >= 1, got {samples_per_shard}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    vae = load_vae(cfg.autoencoder, cfg.autoencoder_variant).to(accelerator.device).eval().requires_grad_(False)
    encoder = TextEncoder.from_config(cfg.text_encoder).to(accelerator.device)
    settings = {"resolution": cfg.data.resolution, "center_crop": True, "flip": cfg.data.random_flip}
    sizes = None
    if cfg.data.buckets:  # the key only when on, so the sidecars of square precomputes stay current
        sizes = bucket_sizes(cfg.data.resolution, size_multiple(vae, cfg.unet), cfg.data.max_aspect_ratio)
        settings["buckets"] = [list(size) for size in sizes]
    identity = {
        "vae": weights_fingerprint(vae, {}),
        "text_encoder": encoder.fingerprint() if encoder.frozen else None,
        "data": settings,
    }
    chunks = input_chunks(cfg, samples_per_shard, sizes)
    rank, world = accelerator.process_index, accelerator.num_processes
    todo = [j for j in range(rank, len(chunks), world) if _sidecar(out, j) != identity]
    for j in tqdm(todo, desc="precomputing latents", unit="shard", disable=not accelerator.is_main_process):
        samples = encode_chunk(chunks[j], vae, encoder if encoder.frozen else None, cfg.data.random_flip, batch_size)
        count = write_shard(out / _shard_name(j), ((f"{j:06d}{k:06d}", s) for k, s in enumerate(samples)))
        write_json_atomically(out / f"latents-{j:06d}.json", identity | {"samples": count})
    accelerator.wait_for_everyone()
    manifest: dict[str, Any] = {}
    if accelerator.is_main_process:
        manifest = finish(out, identity, len(chunks), asdict(cfg.data))
    accelerator.wait_for_everyone()
    return manifest or json.loads((out / MANIFEST).read_text(encoding="utf-8"))


def input_chunks(
    cfg: DiffusionExperimentConfig, samples_per_shard: int, sizes: list[Size] | None = None
) -> list[Dataset | IterableDataset]:
    """The input's pieces, one per output shard: each .tar of a WebDataset, else consecutive item ranges;
    with bucket `sizes`, their images are prepared at their buckets."""
    data = cfg.data
    if data.source == "webdataset":
        source = build_dataset(data, "train")
        assert isinstance(source, WebDatasetSource)
        chunks = []
        for shard in source.shards:
            chunk = WebDatasetSource(
                [shard], data.resolution, strict=data.strict, shuffle_shards=False, rank=0, world_size=1
            )
            if sizes is not None:
                chunk.set_buckets(sizes)
            chunks.append(chunk)
        return chunks
    unflipped = type(data)(**{**asdict(data), "random_flip": False})  # the flip is written as a second view
    dataset = build_dataset(unflipped, "train")
    if sizes is not None:
        dataset.set_buckets(sizes)  # type: ignore[union-attr]
    size = len(dataset)  # type: ignore[arg-type]
    return [Subset(dataset, range(s, min(s + samples_per_shard, size))) for s in range(0, size, samples_per_shard)]


@torch.no_grad()
def encode_chunk(
    chunk: Dataset | IterableDataset, vae: Any, encoder: TextEncoder | None, flip: bool, batch_size: int
) -> Iterator[dict[str, bytes]]:
    """The shard's samples: moments (and of the mirror image), caption embedding, caption."""
    for batch in chunk_batches(chunk, batch_size):
        if not batch["captions"]:
            continue  # every image of the batch was unreadable (reported by the data layer)
        pixels = batch["pixel_values"].to(vae.device, vae.dtype)
        moments = vae.encode(pixels).latent_dist.parameters.float()
        flipped = vae.encode(pixels.flip(-1)).latent_dist.parameters.float() if flip else None
        context = encoder.encode(batch["captions"]).to(CONTEXT_DTYPE) if encoder is not None else None
        for i, caption in enumerate(batch["captions"]):
            sample = {"moments.npy": encode_array(moments[i]), "txt": caption.encode("utf-8")}
            if flipped is not None:
                sample["moments_flip.npy"] = encode_array(flipped[i])
            if context is not None:
                sample["context.npy"] = encode_array(context[i])
            yield sample


def chunk_batches(chunk: Dataset | IterableDataset, batch_size: int) -> DataLoader:
    """The chunk's items in collated batches, in order; when bucketed, bucket after bucket, one bucket a batch."""
    if isinstance(chunk, IterableDataset):
        if is_bucketed(chunk):
            return DataLoader(BucketedStream(chunk, batch_size), batch_size=None, collate_fn=collate_examples)
        return DataLoader(chunk, batch_size=batch_size, collate_fn=collate_examples)
    bucket_of = bucket_of_items(chunk)
    if bucket_of is None:
        return DataLoader(chunk, batch_size=batch_size, collate_fn=collate_examples)
    sampler = BucketBatchSampler(bucket_of, batch_size, shuffle=False, drop_last=False)
    return DataLoader(chunk, batch_sampler=sampler, collate_fn=collate_examples)


def write_shard(path: Path, samples: Iterator[tuple[str, dict[str, bytes]]]) -> int:
    """Write (key, {extension: bytes}) samples as a .tar, atomically; returns the number of samples."""
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tarfile.open(tmp, "w") as tar:
        for key, files in samples:
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            count += 1
    os.replace(tmp, path)
    return count


def finish(out: Path, identity: dict[str, Any], num_shards: int, data: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, when every shard exists: the manifest that marks the precompute done."""
    counts = []
    for j in range(num_shards):
        sidecar = _sidecar(out, j)
        if sidecar != identity:
            raise RuntimeError(f"{out / _shard_name(j)}: missing or made by other models; did a rank fail?")
        counts.append(json.loads((out / f"latents-{j:06d}.json").read_text(encoding="utf-8"))["samples"])
    names = [_shard_name(j) for j in range(num_shards) if counts[j]]
    manifest = {"format": MANIFEST_FORMAT, **identity, "flip": identity["data"]["flip"], "source_data": data}
    manifest |= {"shards": names, "samples": sum(counts)}
    write_json_atomically(out / MANIFEST, manifest)
    logger.info("precomputed %d samples in %d shards at %s", manifest["samples"], len(names), out)
    return manifest


def _shard_name(j: int) -> str:
    return f"latents-{j:06d}.tar"


def _sidecar(out: Path, j: int) -> dict[str, Any] | None:
    """What made shard j (without its sample count), or None when it is not finished."""
    path = out / f"latents-{j:06d}.json"
    if not (path.is_file() and (out / _shard_name(j)).is_file()):
        return None
    made = json.loads(path.read_text(encoding="utf-8"))
    made.pop("samples", None)
    return made
