"""Where a stage-2 batch comes from: the latent + text caches, precomputed latent shards, or the frozen
encoders run on every step.

Every source turns a loader batch into the same pair: latents z * scaling_factor (B, C, h, w), drawn
fresh from q(z | x), and the U-Net's conditioning for the captions after caption dropout: the text
context `encoder_hidden_states` (B, L, D) from a frozen encoder (cached embeddings arrive with the batch,
and their dropout is drawn on the device), or the `captions` themselves when the encoder trains with the
U-Net (it then runs inside the model's forward pass; see `Denoiser`).

With data.buckets (`ldm.data.buckets`) the items come at their bucket's size and every batch holds one bucket;
the latent cache then keeps one folder per bucket (`BucketedLatentCache`), and the caption cache is the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from autoencoder.posterior import DiagonalGaussian
from conditioning import TextEmbeddingCache, TextEncoder, drop_captions
from conditioning.fingerprint import weights_fingerprint
from ldm.data import collate_examples
from ldm.data.buckets import is_bucketed
from ldm.data.image_folder import METADATA_FILE
from ldm.data.latent_shards import LatentShardSource
from ldm.training.latent_cache import BucketedLatentCache, LatentCache
from ldm.unet import UNetConfig

logger = logging.getLogger(__name__)


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack cached items into {"moments": (B, 2C, h, w), "captions": list[str]} and, when the items carry
    their caption's embedding, "context": (B, L, D)."""
    batch = {"moments": torch.stack([item["moments"] for item in items]), "captions": [i["caption"] for i in items]}
    if "context" in items[0]:
        batch["context"] = torch.stack([item["context"] for item in items])
    return batch


class CachedExamples(Dataset):
    """The latent cache's items with their caption's cached embedding as "context", both read from disk per
    item, in the data loader's workers: a training process holds one batch of the caches, not the caches."""

    def __init__(self, latents: LatentCache | BucketedLatentCache, captions: TextEmbeddingCache) -> None:
        self.latents, self.captions = latents, captions
        self.bucket_sizes = latents.bucket_sizes  # the loader batches by bucket when the latents are bucketed
        self.bucket_of = getattr(latents, "bucket_of", None)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.latents[index]
        return item | {"context": self.captions.encode([item["caption"]])[0]}


class LatentBatches:
    """Turns loader batches into (latents, conditioning) for the U-Net, from caches or by encoding live."""

    def __init__(
        self, vae: AutoencoderKL, text_encoder: TextEncoder, p_uncond: float, unconditional: Tensor | None = None
    ) -> None:
        """`unconditional`: the (1, L, D) context of "" on the model's device, for batches that carry their
        cached "context" (caption dropout then swaps rows on the device)."""
        self.vae = vae
        self.text_encoder = text_encoder
        self.p_uncond = p_uncond
        self.unconditional = unconditional
        self.scaling_factor = float(vae.config.scaling_factor)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Latents scaling_factor * z, z ~ q(z | x), (B, C, h, w), and the U-Net's conditioning keywords."""
        if "moments" in batch:
            moments = batch["moments"].to(self.vae.device)  # a stream's batches are not placed by Accelerate
        else:
            moments = self.vae.encode(batch["pixel_values"].to(self.vae.device, self.vae.dtype)).latent_dist.parameters
        latents = DiagonalGaussian(moments.float()).sample() * self.scaling_factor
        if "context" in batch and self.text_encoder.frozen and self.unconditional is not None:
            return latents, {"encoder_hidden_states": self._drop_context(batch["context"].to(latents.device))}
        captions = drop_captions(batch["captions"], self.p_uncond)
        if not self.text_encoder.frozen:
            return latents, {"captions": captions}  # encoded with gradients inside the Denoiser
        return latents, {"encoder_hidden_states": self.text_encoder.encode(captions).to(latents.device, torch.float32)}

    def _drop_context(self, context: Tensor) -> Tensor:
        """Caption dropout on cached embeddings: each row becomes the context of "" with probability p_uncond,
        drawn on the device, so no step waits for the host."""
        drop = torch.rand(context.shape[0], device=context.device) < self.p_uncond
        return torch.where(drop[:, None, None], self.unconditional, context.float())


def build_train_dataset(
    dataset: Dataset | IterableDataset,
    vae: AutoencoderKL,
    text_encoder: TextEncoder,
    data_settings: Any,
    cache_dir: Path | None,
    accelerator: Accelerator,
) -> tuple[Dataset | IterableDataset, Tensor | None, float]:
    """The dataset the loader reads, the context of "" on the device when its items carry cached caption
    embeddings (else None), and the seconds spent building the caches.

    With `cache_dir` the VAE moments and (for a frozen text encoder) the caption embeddings are computed
    once, every process encoding its share in resumable parts; without it the raw dataset is returned and
    both encoders run on every step. Only a fixed map-style dataset with deterministic preprocessing can be
    cached. A bucketed dataset is cached per bucket (`BucketedLatentCache`).
    """
    if cache_dir is None:
        return dataset, None, 0.0
    start = time.perf_counter()
    data = asdict(data_settings)
    # Bucket sizes depend on the model too, so they are recorded; without buckets the keys are left out, as before.
    if data.pop("buckets", False):
        data["bucket_sizes"] = [list(size) for size in dataset.bucket_sizes]  # type: ignore[union-attr]
    else:
        data.pop("max_aspect_ratio", None)
    for key in ("shapes", "colors"):  # the shapes dataset's content_version names sets other than the default
        data.pop(key, None)
    content = {
        "data": data,
        "size": len(dataset),
        "version": getattr(dataset, "content_version", None),
    }  # type: ignore[arg-type]
    fingerprint = weights_fingerprint(vae, content)
    launch = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "barrier": accelerator.wait_for_everyone,
    }

    def encode_moments(x: Tensor) -> Tensor:
        return vae.encode(x.to(vae.device, vae.dtype)).latent_dist.parameters

    kind = BucketedLatentCache if is_bucketed(dataset) else LatentCache
    latents = kind.load_or_build(cache_dir / "latents", encode_moments, dataset, fingerprint, **launch)
    if not text_encoder.frozen:  # its embeddings change every step
        return latents, None, time.perf_counter() - start
    captions = TextEmbeddingCache.load_or_build(cache_dir / "captions", text_encoder, latents.captions, **launch)
    unconditional = captions.encode([""]).to(accelerator.device, torch.float32)  # (1, L, D), moved once
    return CachedExamples(latents, captions), unconditional, time.perf_counter() - start


def use_latent_shards(
    source: LatentShardSource, vae: AutoencoderKL, text_encoder: TextEncoder, cfg: Any, device: torch.device
) -> Tensor | None:
    """Check precomputed latent shards against this run's models, and have them carry their caption
    embeddings when the text encoder is frozen. Returns the context of "" on `device` in that case, else None."""
    where = source.folder / "manifest.json"
    if source.manifest["vae"] != weights_fingerprint(vae, {}):
        raise ValueError(f"{where}: the latents were made by another VAE than autoencoder={cfg.autoencoder}")
    if source.manifest["data"]["resolution"] != cfg.data.resolution:
        made = source.manifest["data"]["resolution"]
        raise ValueError(f"{where}: the latents are of {made}px images, but data.resolution is {cfg.data.resolution}")
    if is_bucketed(source) != cfg.data.buckets:
        made = "at aspect-ratio bucket sizes" if is_bucketed(source) else "as square crops"
        raise ValueError(
            f"{where}: the latents were precomputed {made}, but data.buckets is {cfg.data.buckets}; set "
            f"data.buckets={str(is_bucketed(source)).lower()} (the shards decide), or precompute again"
        )
    if not text_encoder.frozen:
        return None  # encoded with gradients every step
    if source.manifest["text_encoder"] != text_encoder.fingerprint():
        raise ValueError(
            f"{where}: the caption embeddings were made by another text encoder than this run's frozen one; "
            "precompute again with this text_encoder section"
        )
    source.with_context = True
    return text_encoder.unconditional(1).to(device, torch.float32)


def collate_for(dataset: Dataset | IterableDataset) -> Callable[[list[Any]], dict[str, Any]]:
    """How the loader stacks items of `dataset`: cached or precomputed moments (and embeddings), or images."""
    cached = isinstance(dataset, (LatentCache, BucketedLatentCache, CachedExamples, LatentShardSource))
    return collate_cached if cached else collate_examples


def cacheable(cfg: Any, dataset: Dataset | IterableDataset) -> bool:
    """Whether the run (a DiffusionExperimentConfig) uses the latent + text caches: asked for, and the data is
    a fixed, unaugmented set."""
    if not cfg.train.cache_latents or isinstance(dataset, LatentShardSource):  # the latter is latents already
        return False
    if isinstance(dataset, IterableDataset):
        logger.info(
            "train.cache_latents: streaming data (%s) is encoded on every step; `ldm precompute-latents` writes "
            "its latents as shards to stream instead (data.source: latents)",
            cfg.data.source,
        )
        return False
    if cfg.data.random_flip or not cfg.data.center_crop:
        raise ValueError(
            "train.cache_latents: the cache stores one view per image, but data.random_flip / a random crop "
            "make a new view every epoch; set train.cache_latents=false or turn the augmentation off"
        )
    return True


def training_captions(dataset: Dataset | IterableDataset) -> list[str]:
    """Every distinct caption of a fixed training set (cached or map-style), for text_encoder.token_rows=captions."""
    if isinstance(dataset, CachedExamples):
        dataset = dataset.latents
    if isinstance(dataset, (IterableDataset, LatentShardSource)):
        raise ValueError(
            "text_encoder.token_rows: 'captions' needs the training captions up front, but this data streams; "
            "set text_encoder.token_rows=all (or train_token_embedding=false)"
        )
    if hasattr(dataset, "captions"):
        return sorted(set(dataset.captions))
    if hasattr(dataset, "records"):  # an image folder: its metadata, no image decoded; every caption of a record
        found = (c for _, captions in dataset.records for c in (captions if isinstance(captions, list) else [captions]))
        return sorted(set(found))
    return sorted({dataset[i]["caption"] for i in range(len(dataset))})


def require_captions(dataset: Dataset | IterableDataset) -> None:
    """Stop a text-to-image run whose image folder has no captions, before it silently trains unconditionally."""
    if getattr(dataset, "has_captions", True):
        return
    folder = getattr(dataset, "root", "the image folder")
    raise ValueError(
        f"data.train_path: {folder} has no {METADATA_FILE}, so every caption would be empty and the run would "
        'learn an unconditional model; add the captions (one JSON line per image: {"file_name": ..., "text": ...})'
    )


def size_multiple(vae: AutoencoderKL, unet: UNetConfig) -> int:
    """What every image side must be a multiple of for the latents to halve cleanly through the U-Net: the VAE's
    downsampling f = 2^(levels - 1) times the U-Net's 2^(levels - 1) (a pretrained U-Net's read from its config)."""
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if unet.pretrained is None:
        return vae_factor * unet.downsampling_factor
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(unet.pretrained, subfolder="unet")
    return vae_factor * 2 ** (len(config["block_out_channels"]) - 1)
