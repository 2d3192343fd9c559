"""Turning an image file of any kind into the model's input: RGB, upright, resized, cropped, in [-1, 1].

Shared by the image-folder and WebDataset sources so both prepare pixels identically.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.data.buckets import nearest_bucket

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")

# Transparent pixels are composited onto this colour (white, as a browser shows them on a page).
ALPHA_BACKGROUND = (255, 255, 255)

# Integer modes holding more than 8 bits per pixel; PIL's own convert("L") clips them at 255, which turns
# a 16-bit image almost white, so they are rescaled from the full 16-bit range instead.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # the EXIF orientations that swap width and height


def open_image(source: str | Path | bytes, draft_size: int | None = None, name: str | None = None) -> Image.Image:
    """Open and fully decode an image, so a truncated or corrupt file fails here, not later.

    `draft_size` lets JPEG decode at a reduced scale (1/2, 1/4, 1/8) that still covers that many pixels
    on both sides, which makes large photos much cheaper to load.

    Decompression bombs follow PIL's limit `Image.MAX_IMAGE_PIXELS`: above twice the limit `Image.open`
    raises DecompressionBombError (the callers skip or reject the file by name); above the limit the image
    is loaded with a warning that names it (`name`, by default the path), since PIL's own warning does not.
    """
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        logger.warning(
            "%s: %dx%d = %d pixels is over the decompression-bomb limit of %d (PIL.Image.MAX_IMAGE_PIXELS); "
            "loading it anyway (twice the limit would be an error)",
            name or ("<bytes>" if isinstance(source, bytes) else source),
            image.width,
            image.height,
            image.width * image.height,
            limit,
        )
    if draft_size is not None and image.format == "JPEG":
        image.draft(image.mode, (draft_size, draft_size))
    image.load()  # raises OSError for truncated data
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, upright.

    EXIF orientation is applied first. Alpha (RGBA, LA, PA, or a palette / grey image with a transparent
    colour) is composited over ALPHA_BACKGROUND. 16-bit grey is scaled by 255/65535; float grey ("F") is
    read as [0, 1]. CMYK and the rest use PIL's conversion (ICC profiles are not applied).
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in _WIDE_INT_MODES:
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    elif mode == "F":
        grey = np.asarray(image, dtype=np.float64) * 255.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def upright_size(source: str | Path | bytes) -> tuple[int, int]:
    """(width, height) of an image file as `to_rgb` will turn it (EXIF orientation applied), read from its
    header without decoding the pixels."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        width, height = image.size
        transposed = image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS
    return (height, width) if transposed else (width, height)


def resize_and_crop(image: Image.Image, size: int | tuple[int, int], center_crop: bool = True) -> Image.Image:
    """Resize to the smallest size that covers `size` (bicubic, antialiased), then crop to exactly `size`.

    `size` is a side (a square: the short side is resized to it) or a (width, height) bucket, which a
    nearby aspect ratio covers with only a small remainder to crop. The crop is centred, or placed uniformly
    at random (torch's generator, so each data-loader worker draws differently) when `center_crop` is False.
    """
    target_w, target_h = (size, size) if isinstance(size, int) else size
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    new_size = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=None)
    width, height = image.size
    if center_crop:
        left, top = (width - target_w) // 2, (height - target_h) // 2
    else:
        left = int(torch.randint(width - target_w + 1, ()).item())
        top = int(torch.randint(height - target_h + 1, ()).item())
    return image.crop((left, top, left + target_w, top + target_h))


def load_pixels(
    source: str | Path | bytes,
    resolution: int | tuple[int, int],
    center_crop: bool = True,
    random_flip: bool = False,
    name: str | None = None,
    buckets: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """A file path or encoded bytes as a float32 (3, H, W) tensor in [-1, 1].

    (H, W) is (resolution, resolution) for a side, or (height, width) for a (width, height) `resolution`;
    with `buckets` (width, height) sizes, the size is the bucket nearest the image's aspect ratio
    (`ldm.data.buckets.nearest_bucket`). `name` says where encoded bytes came from, for warnings (a path
    names itself).
    """
    size = (resolution, resolution) if isinstance(resolution, int) else resolution
    # A JPEG draft keeps both sides >= the request; with buckets that is the resolution, >= any bucket's short side.
    image = to_rgb(open_image(source, draft_size=max(size), name=name))
    if buckets is not None:
        size = buckets[nearest_bucket(*image.size, buckets)]
    image = resize_and_crop(image, size, center_crop)
    pixels = to_model_tensor(image)  # (3, H, W)
    if random_flip and torch.rand(()) < 0.5:
        pixels = pixels.flip(-1)
    return pixels


def to_model_tensor(image: Image.Image) -> torch.Tensor:
    """An 8-bit RGB PIL image as a float32 (3, H, W) tensor in [-1, 1]: x / 127.5 - 1."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)
    return tensor.to(torch.float32) / 127.5 - 1.0


def describe_error(err: BaseException) -> str:
    """A one-line reason for a failed image, e.g. "UnidentifiedImageError: cannot identify image file"."""
    return f"{type(err).__name__}: {err}"


def utf8_problem(raw: bytes, err: UnicodeDecodeError) -> str:
    """Where text stops being UTF-8: "byte 0xe9 at position 12 is not UTF-8; save the text as UTF-8"."""
    return f"byte 0x{raw[err.start]:02x} at position {err.start + 1} is not UTF-8; save the text as UTF-8"
