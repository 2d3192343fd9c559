"""What benchmarks/generation.py feeds the pipeline and how it reads what comes out.

Inputs: held-out shapes scenes, the caption of a scene with one attribute changed (in the caption's own
phrasing), a square mask over the shape. Readings: the probe's attributes of pipeline images, PSNR, the error
outside a mask, and a count of U-Net evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio

from ldm.data.shapes import CAPTION_TEMPLATES, JITTER_STEP, POSITION_CENTER, SIZE_EXTENT, ShapesDataset
from ldm.evaluation.probe import AttributeProbe
from ldm.generation import LatentDiffusionPipeline
from ldm.images import to_pil

SPLIT_SEED = 1  # FidelityPrompts' held-out seed, apart from training's


@dataclass(frozen=True)
class Scene:
    """A held-out scene: its parameters (attributes and jitter, as `sample_scene` draws them), image, caption."""

    params: dict[str, Any]
    image: Image.Image
    caption: str


def heldout_scenes(count: int, resolution: int) -> list[Scene]:
    """The first `count` scenes of the held-out split, with the captions the dataset gives them."""
    data = ShapesDataset(count, resolution, "heldout", seed=SPLIT_SEED)
    return [Scene(*data.draw(i)[:2], data[i]["caption"]) for i in range(count)]


def edit_caption(caption: str, attributes: dict[str, Any], **changes: str) -> str:
    """The caption of the scene with `changes` (e.g. background="red"), in the caption's own template."""
    template = next((t for t in CAPTION_TEMPLATES if t.format(**attributes) == caption), None)
    if template is None:
        raise ValueError(f"caption: {caption!r} is not a CAPTION_TEMPLATES phrasing of {attributes}")
    return template.format(**(attributes | changes))


def next_color(palette: tuple[str, ...], current: str, avoid: str) -> str:
    """The colour after `current` in `palette` (cyclically) that is not `avoid`."""
    i = palette.index(current)
    return next(c for c in palette[i + 1 :] + palette[:i] if c != avoid)


def shape_box(params: dict[str, Any], resolution: int, pad: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), ends exclusive: the pixels the shape can touch (its centre +- its extent, jitter
    included, as `render_scene` draws it), grown by `pad` pixels and clipped to the image."""
    jx, jy, scale = params["jitter"]
    cx, cy = POSITION_CENTER[params["position"]]
    cx, cy = (cx + jx * JITTER_STEP) * resolution, (cy + jy * JITTER_STEP) * resolution
    r = SIZE_EXTENT[params["size"]] * scale * resolution  # circle +-r, square +-0.9r, triangle -r..+0.8r
    x0, y0 = max(0, math.floor(cx - r) - pad), max(0, math.floor(cy - r) - pad)
    return x0, y0, min(resolution, math.ceil(cx + r) + pad), min(resolution, math.ceil(cy + r) + pad)


def shape_masks(scenes: list[Scene], resolution: int, pad: int) -> torch.Tensor:
    """(B, 1, H, W) in {0, 1}: 1 (repaint) on each scene's `shape_box`."""
    masks = torch.zeros(len(scenes), 1, resolution, resolution)
    for mask, scene in zip(masks, scenes, strict=True):
        x0, y0, x1, y1 = shape_box(scene.params, resolution, pad)
        mask[:, y0:y1, x0:x1] = 1
    return masks


def masked_errors(images: torch.Tensor, original: torch.Tensor, masks: torch.Tensor, border: int) -> dict:
    """Mean squared error (images (B, 3, H, W) in [0, 1]) over the pixels outside the masks, and over those at
    least `border` pixels from them (the decoder mixes latents across that border)."""
    near = F.max_pool2d(masks, 2 * border + 1, stride=1, padding=border) > 0  # the masks grown by `border`
    squared = (images - original).pow(2).mean(dim=1, keepdim=True)  # (B, 1, H, W)
    return {"outside": squared[masks == 0].mean().item(), "far": squared[~near].mean().item()}


# ---- readings ------------------------------------------------------------------------------------


def channels_first(images: np.ndarray) -> torch.Tensor:
    """Pipeline images (B, H, W, 3) in [0, 1] -> (B, 3, H, W)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def read(probe: AttributeProbe, images: np.ndarray) -> dict[str, list[str]]:
    """The probe's readings of pipeline images (B, H, W, 3) in [0, 1], fed as `prompt_fidelity` feeds them."""
    return probe.predict(channels_first(images).float() * 2 - 1)


def percent(hits: list[bool]) -> float:
    """Percent of true entries."""
    return 100 * sum(hits) / len(hits)


def share(readings: list, wanted: list) -> float:
    """Percent of readings equal to the wanted values."""
    return percent([r == w for r, w in zip(readings, wanted, strict=True)])


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two batches (B, 3, H, W) in [0, 1]."""
    return peak_signal_noise_ratio(a.float(), b.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))


@contextmanager
def unet_evaluations(pipe: LatentDiffusionPipeline) -> Iterator[list[int]]:
    """Counts the U-Net's evaluations (one per image of every batch it runs on) into the yielded [count]."""
    count = [0]

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        count[0] += (args[0] if args else kwargs["sample"]).shape[0]

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def tiles(images: np.ndarray) -> list[Image.Image]:
    """Pipeline images (B, H, W, 3) in [0, 1] -> PIL images."""
    return to_pil(channels_first(images) * 2 - 1)
