"""Model-space images (tensors in [-1, 1]) to pixels: PIL images, grids, denoising strips and animations.

The conversion is diffusers' `VaeImageProcessor.postprocess`: x -> (x / 2 + 0.5).clamp(0, 1), then
round(255 x) to uint8, so a PNG written here has the same bytes diffusers would write for the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

ANIMATION_FORMATS = (".gif", ".webp")


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]: (x / 2 + 0.5).clamp(0, 1), in float32."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> float32 (B, H, W, C) in [0, 1], diffusers' output_type="np"."""
    return rearrange(to_unit_range(images), "b c h w -> b h w c").cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) in [-1, 1] (C = 3, or 1 for grey) -> B PIL images, rounded as diffusers rounds."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    pixels = (to_numpy(images) * 255).round().astype(np.uint8)  # (B, H, W, C)
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[..., 0], mode="L") for p in pixels]
    return [Image.fromarray(p, mode="RGB") for p in pixels]


def image_grid(
    images: Sequence[Image.Image] | torch.Tensor,
    rows: int | None = None,
    padding: int = 2,
    background: tuple[int, int, int] = (255, 255, 255),
    scale: int = 1,
) -> Image.Image:
    """Tile images row by row into `rows` rows (default: as square as possible), `padding` pixels apart.

    `images` is a list of equally sized PIL images, or a (B, C, H, W) tensor in [-1, 1]. `scale` enlarges
    each tile by pixel repetition (nearest neighbour), so small samples stay sharp and exact when viewed.
    """
    tiles = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    if not tiles:
        raise ValueError("images: is empty; a grid needs at least one image")
    if scale < 1:
        raise ValueError(f"scale: must be >= 1, got {scale}")
    tiles = enlarged(tiles, scale)
    if rows is None:
        rows = max(1, math.isqrt(len(tiles)))
    if rows < 1:
        raise ValueError(f"rows: must be >= 1, got {rows}")
    cols = math.ceil(len(tiles) / rows)
    width, height = tiles[0].size
    if any(tile.size != (width, height) for tile in tiles):
        raise ValueError(f"images: all must have the size of the first, {width}x{height}")
    grid = Image.new(
        "RGB", (cols * width + (cols + 1) * padding, rows * height + (rows + 1) * padding), color=background
    )
    for i, tile in enumerate(tiles):
        row, col = divmod(i, cols)
        grid.paste(tile.convert("RGB"), (padding + col * (width + padding), padding + row * (height + padding)))
    return grid


def enlarged(images: Sequence[Image.Image], scale: int) -> list[Image.Image]:
    """Each image `scale` times larger by pixel repetition (nearest neighbour), so small samples stay exact."""
    if scale == 1:
        return list(images)
    return [image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST) for image in images]


def save_image_grid(
    images: Sequence[Image.Image] | torch.Tensor,
    path: str | Path,
    rows: int | None = None,
    padding: int = 2,
    scale: int = 1,
) -> Path:
    """`image_grid(images, rows, padding, scale=scale)` written as a PNG at `path` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, rows, padding, scale=scale).save(path)
    return path


def evenly_spaced(length: int, count: int) -> list[int]:
    """min(count, length) indices spread evenly over range(length); the first and last are always in (count >= 2)."""
    if length < 1 or count < 1:
        raise ValueError(f"evenly_spaced: length and count must be >= 1, got {length}, {count}")
    count = min(count, length)
    return sorted({round(i * (length - 1) / max(count - 1, 1)) for i in range(count)})


def write_animation(frames: Sequence[Image.Image], path: str | Path, fps: float = 8.0, scale: int = 1) -> Path:
    """Write `frames` as a looping animated GIF or WebP (chosen by the suffix of `path`), each frame shown for
    1000 / fps ms and enlarged `scale` times by pixel repetition; parent folders are created.

    Both formats merge a frame identical to the one before it into that one (a longer frame), so the file
    holds fewer frames than given only when consecutive frames repeat. The WebP is lossless; the GIF has a
    palette of 256 colours per frame.
    """
    path = Path(path)
    if path.suffix.lower() not in ANIMATION_FORMATS:
        raise ValueError(f"path: {str(path)!r} must end in {' or '.join(ANIMATION_FORMATS)}")
    if not frames:
        raise ValueError("frames: is empty; an animation needs at least one frame")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps: must be a positive number, got {fps}")
    if scale < 1:
        raise ValueError(f"scale: must be >= 1, got {scale}")
    tiles = enlarged([frame.convert("RGB") for frame in frames], scale)
    options = {"lossless": True} if path.suffix.lower() == ".webp" else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    # loop=0: repeat forever. GIF stores durations in hundredths of a second (125 ms is kept as 120).
    tiles[0].save(path, save_all=True, append_images=tiles[1:], duration=round(1000 / fps), loop=0, **options)
    return path
