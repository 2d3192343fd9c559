"""A short contrastive pre-training of a small text encoder on the training pairs, before stage 2: a CLIP of the
data's own, so the text features already separate what the images show when the U-Net starts to read them.

The image side is a small CNN over the stage-1 latents (what the U-Net will draw), flattened after pooling to a
4 x 4 grid so that where an object is stays visible to it; the text side is the mean of the encoder's token states
(every token's state is what the U-Net's cross-attention reads, not the EOS token's alone). Both are projected to
one space and trained with CLIP's symmetric InfoNCE loss and learned temperature (Radford et al. 2021). Only the
text encoder is kept; the image tower is thrown away.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from autoencoder.posterior import DiagonalGaussian
from conditioning import TextEncoder
from ldm.training.batches import collate_cached

logger = logging.getLogger(__name__)


@dataclass
class TextPretrainingConfig:
    """The `text_pretraining:` section of a stage-2 run; steps 0 = none."""

    steps: int = 0
    batch_size: int = 256
    lr: float = 1e-3  # AdamW, constant after a 5% warm-up, for the encoder and both towers
    embed_dim: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"text_pretraining.steps: must be >= 0, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(
                f"text_pretraining.batch_size: a contrastive batch needs >= 2 pairs, got {self.batch_size}"
            )
        if self.lr <= 0 or self.embed_dim < 1:
            raise ValueError("text_pretraining.lr and text_pretraining.embed_dim: must be positive")


class LatentImageTower(nn.Module):
    """Latents (B, C, h, w) -> (B, dim): three convolutions, average-pooled to 4 x 4 and flattened (not pooled to
    one vector, which would hide the object's position), then a linear map."""

    def __init__(self, channels: int, dim: int, width: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
        )  # fmt: skip
        self.project = nn.Linear(width * 16, dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(latents).flatten(1))


def token_mean(encoder: TextEncoder, captions: list[str]) -> torch.Tensor:
    """The mean of each caption's token states over its real tokens (BOS .. EOS, not the padding), (B, D)."""
    tokens = encoder.tokenize(captions)
    mask = tokens.attention_mask.to(encoder.device, torch.float32)[..., None]  # (B, L, 1)
    states = encoder.encode(captions).float()
    return (states * mask).sum(1) / mask.sum(1)


def clip_loss(image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the batch's cosine similarities, pairs on the diagonal."""
    logits = log_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def endless(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def pretrain_text_encoder(
    encoder: TextEncoder, latents: Dataset, scaling_factor: float, cfg: TextPretrainingConfig, device: torch.device
) -> list[float]:
    """Train `encoder` (in place) contrastively against the cached latents' images; returns the loss every 25 steps.

    `latents` is the stage's latent cache (items with "moments" and "caption"). The same seed gives the same
    encoder on every process, so DDP's broadcast at `prepare` changes nothing."""
    if encoder.frozen:
        raise ValueError(
            "text_pretraining.steps: pre-trains the text encoder, but text_encoder.frozen is true (its embeddings are "
            "cached before stage 2 and would no longer match); set text_encoder.frozen: false"
        )
    if len(latents) < cfg.batch_size:
        raise ValueError(
            f"text_pretraining.batch_size: {cfg.batch_size} is more than the {len(latents)} training pairs; lower it"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        first = latents[0]["moments"]
        tower = LatentImageTower(first.shape[0] // 2, cfg.embed_dim).to(device)
        text_project = nn.Linear(encoder.hidden_size, cfg.embed_dim).to(device)
        log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
        loader = DataLoader(latents, cfg.batch_size, shuffle=True, drop_last=True, collate_fn=collate_cached)
        trained = [p for p in encoder.parameters() if p.requires_grad]
        towers = [*tower.parameters(), *text_project.parameters(), log_scale]
        optimizer = torch.optim.AdamW(
            [{"params": trained, "weight_decay": 0.0}, {"params": towers, "weight_decay": 0.01}], lr=cfg.lr
        )
        warmup = max(1, cfg.steps // 20)
        losses: list[float] = []
        encoder.train()
        batches = endless(loader)
        for step in tqdm(range(cfg.steps), desc="text pre-training", mininterval=1.0):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / warmup)
            batch = next(batches)
            z = DiagonalGaussian(batch["moments"].to(device).float()).sample() * scaling_factor
            loss = clip_loss(tower(z), text_project(token_mean(encoder, batch["captions"])), log_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                log_scale.clamp_(max=math.log(100.0))  # CLIP's cap on the logit scale
            if step % 25 == 0 or step == cfg.steps - 1:
                losses.append(round(float(loss.detach()), 4))
    logger.info("text pre-training: %d steps, contrastive loss %.3f -> %.3f", cfg.steps, losses[0], losses[-1])
    return losses
