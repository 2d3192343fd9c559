"""Where a stage-2 batch comes from: the latent + text caches, or the frozen encoders run on every step.

Both sources turn a loader batch into the same pair: latents z * scaling_factor (B, C, h, w), drawn
fresh from q(z | x), and the U-Net's conditioning for the captions after caption dropout: the text
context `encoder_hidden_states` (B, L, D) from a frozen encoder, or the `captions` themselves when the
encoder trains with the U-Net (it then runs inside the model's forward pass; see `Denoiser`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from autoencoder.posterior import DiagonalGaussian
from conditioning import TextEmbeddingCache, TextEncoder, drop_captions
from conditioning.fingerprint import weights_fingerprint
from ldm.data import collate_examples
from ldm.data.image_folder import METADATA_FILE
from ldm.training.latent_cache import LatentCache

logger = logging.getLogger(__name__)


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack cached items into {"moments": (B, 2C, h, w), "captions": list[str]}."""
    moments = torch.stack([item["moments"] for item in items])
    return {"moments": moments, "captions": [item["caption"] for item in items]}


class LatentBatches:
    """Turns loader batches into (latents, conditioning) for the U-Net, from caches or by encoding live."""

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: TextEncoder,
        p_uncond: float,
        text_cache: TextEmbeddingCache | None = None,
    ) -> None:
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_cache = text_cache
        self.p_uncond = p_uncond
        self.scaling_factor = float(vae.config.scaling_factor)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Latents scaling_factor * z, z ~ q(z | x), (B, C, h, w), and the U-Net's conditioning keywords."""
        if "moments" in batch:
            moments = batch["moments"]
        else:
            moments = self.vae.encode(batch["pixel_values"].to(self.vae.device, self.vae.dtype)).latent_dist.parameters
        latents = DiagonalGaussian(moments.float()).sample() * self.scaling_factor
        captions = drop_captions(batch["captions"], self.p_uncond)
        if not self.text_encoder.frozen:
            return latents, {"captions": captions}  # encoded with gradients inside the Denoiser
        encoder = self.text_cache if self.text_cache is not None else self.text_encoder
        return latents, {"encoder_hidden_states": encoder.encode(captions).to(latents.device, torch.float32)}


def build_train_dataset(
    dataset: Dataset | IterableDataset,
    vae: AutoencoderKL,
    text_encoder: TextEncoder,
    data_settings: Any,
    cache_dir: Path | None,
    device: torch.device,
    main_process_first: Any,
) -> tuple[Dataset | IterableDataset, TextEmbeddingCache | None, float]:
    """The dataset the loader reads, the text cache (or None), and the seconds spent building the caches.

    With `cache_dir` the VAE moments and (for a frozen text encoder) the caption embeddings are computed
    once (by the main process, the others wait and read the files); without it the raw dataset is returned
    and both encoders run on every step. Only a fixed map-style dataset with deterministic preprocessing can be cached.
    """
    if cache_dir is None:
        return dataset, None, 0.0
    start = time.perf_counter()
    fingerprint = weights_fingerprint(vae, {"data": asdict(data_settings), "size": len(dataset)})  # type: ignore[arg-type]

    def encode_moments(x: Tensor) -> Tensor:
        return vae.encode(x.to(vae.device, vae.dtype)).latent_dist.parameters

    with main_process_first():
        latents = LatentCache.load_or_build(cache_dir / "latents.safetensors", encode_moments, dataset, fingerprint)
        if not text_encoder.frozen:  # its embeddings change every step
            return latents, None, time.perf_counter() - start
        captions = TextEmbeddingCache.load_or_build(cache_dir / "captions.safetensors", text_encoder, latents.captions)
    return latents, captions.to(device), time.perf_counter() - start


def collate_for(dataset: Dataset | IterableDataset) -> Callable[[list[Any]], dict[str, Any]]:
    """How the loader stacks items of `dataset`: cached moments, or images."""
    return collate_cached if isinstance(dataset, LatentCache) else collate_examples


def cacheable(cfg: Any, dataset: Dataset | IterableDataset) -> bool:
    """Whether the run (a DiffusionExperimentConfig) uses the latent + text caches: asked for, and the data is
    a fixed, unaugmented set."""
    if not cfg.train.cache_latents:
        return False
    if isinstance(dataset, IterableDataset):
        logger.info("train.cache_latents: streaming data (%s) is encoded on every step", cfg.data.source)
        return False
    if cfg.data.random_flip or not cfg.data.center_crop:
        raise ValueError(
            "train.cache_latents: the cache stores one view per image, but data.random_flip / a random crop "
            "make a new view every epoch; set train.cache_latents=false or turn the augmentation off"
        )
    return True


def require_captions(dataset: Dataset | IterableDataset) -> None:
    """Stop a text-to-image run whose image folder has no captions, before it silently trains unconditionally."""
    if getattr(dataset, "has_captions", True):
        return
    folder = getattr(dataset, "root", "the image folder")
    raise ValueError(
        f"data.train_path: {folder} has no {METADATA_FILE}, so every caption would be empty and the run would "
        'learn an unconditional model; add the captions (one JSON line per image: {"file_name": ..., "text": ...})'
    )
