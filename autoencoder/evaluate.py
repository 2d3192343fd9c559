"""Held-out metrics, the latent scaling factor, and reconstruction grids."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from autoencoder.model import KLAutoencoder


def batch_images(batch: object) -> Tensor:
    """The image tensor (B, 3, H, W) of a batch: a tensor itself or a dict with "pixel_values"."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict) and "pixel_values" in batch:
        return batch["pixel_values"]
    raise TypeError(f"a batch must be a tensor or a dict with 'pixel_values', got {type(batch).__name__}")


def take_images(loader: Iterable, count: int, device: torch.device) -> Iterable[Tensor]:
    """Yield image batches from `loader` until `count` images have been seen (the last one trimmed)."""
    seen = 0
    for batch in loader:
        images = batch_images(batch)[: count - seen].to(device)
        seen += images.shape[0]
        yield images
        if seen >= count:
            return


@torch.no_grad()
def evaluate_reconstruction(
    model: KLAutoencoder, loader: Iterable, count: int, device: torch.device, perceptual: nn.Module | None = None
) -> dict[str, float]:
    """Mean per-image PSNR / SSIM (images in [0, 1], reconstructing from the posterior mean), LPIPS when
    a pretrained `perceptual` is given, mean KL per image, and the mean / std of the posterior samples."""
    totals: dict[str, float] = {"psnr": 0.0, "ssim": 0.0, "kl": 0.0, "lpips": 0.0}
    latents, n = [], 0
    for x in take_images(loader, count, device):
        posterior = model.encode(x)
        x_rec = model.decode(posterior.mode()).clamp(-1, 1)
        real, fake = (x + 1) / 2, (x_rec + 1) / 2
        psnr = peak_signal_noise_ratio(fake, real, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(fake, real, data_range=1.0, reduction="none")
        totals["psnr"] += psnr.sum().item()
        totals["ssim"] += ssim.sum().item()
        totals["kl"] += posterior.kl().sum().item()
        if perceptual is not None:
            totals["lpips"] += perceptual(x, x_rec).sum().item()
        latents.append(posterior.sample().flatten().cpu())
        n += x.shape[0]
    if n == 0:
        raise ValueError("evaluate_reconstruction: the held-out loader yielded no images")
    metrics = {key: value / n for key, value in totals.items()}
    if perceptual is None:
        del metrics["lpips"]
    z = torch.cat(latents)
    metrics.update(latent_mean=z.mean().item(), latent_std=z.std().item(), num_images=n)
    return metrics


@torch.no_grad()
def latent_scaling_factor(model: KLAutoencoder, loader: Iterable, count: int, device: torch.device) -> float:
    """LDM's scale: 1 / std(z) over posterior samples z ~ q(z|x) of `count` images, so z * scale has unit variance."""
    z = torch.cat([model.encode(x).sample().flatten().cpu() for x in take_images(loader, count, device)])
    std = z.std().item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latent_scaling_factor: the latents' std is {std}; the autoencoder has collapsed")
    return 1.0 / std


@torch.no_grad()
def save_reconstruction_grid(x: Tensor, x_rec: Tensor, path: str | Path, upscale: int = 1) -> Path:
    """Write a PNG: inputs on the top row, their reconstructions below (images in [-1, 1])."""
    pair = torch.stack([x, x_rec.clamp(-1, 1)])  # (2, B, 3, H, W)
    pair = torch.nn.functional.pad(pair, (1, 1, 1, 1), value=1.0)  # a white 1-pixel frame around each image
    grid = rearrange(pair, "row b c h w -> (row h) (b w) c")
    pixels = ((grid.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
