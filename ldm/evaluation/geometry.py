"""Position read from the pixels alone: a second reader of where an object is, beside the attribute probe.

The background is the median colour of the image's border; the object is every pixel whose colour differs from
it by more than `THRESHOLD` (in [0, 1] units, largest channel); its centre of mass is assigned to the nearest
of the data's 9 position centres. No network is involved, so a probe fooled by images unlike its training
renderings (a blob, two objects, a smeared background) and this reading disagree, and the gap is a finding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.data.shapes import POSITION_CENTER, POSITIONS

THRESHOLD = 0.15  # the closest palette pair (red / orange, blue / purple) differs by about 0.4 in one channel
NO_OBJECT = "none"  # what an image with no pixel off the background reads as (never a caption's position)


def object_mask(images: Tensor) -> Tensor:
    """(N, H, W) bool: the pixels of images (N, 3, H, W) in [0, 1] that differ from their border's median colour."""
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]], dim=-1
    )  # (N, 3, 4H - 4)
    background = border.median(dim=-1).values[..., None, None]  # (N, 3, 1, 1)
    return (images - background).abs().amax(dim=1) > THRESHOLD


def geometric_positions(images: Tensor) -> list[str]:
    """The named position of each image's object (N, 3, H, W in [0, 1]): its centre of mass's nearest cell;
    NO_OBJECT where no pixel differs from the background."""
    mask = object_mask(images).float()  # (N, H, W)
    _, height, width = mask.shape
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height  # pixel centres as fractions of the side
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    area = mask.sum(dim=(1, 2))
    cx = (mask.sum(dim=1) * xs).sum(dim=1) / area.clamp(min=1)
    cy = (mask.sum(dim=2) * ys).sum(dim=1) / area.clamp(min=1)
    centres = torch.tensor([POSITION_CENTER[p] for p in POSITIONS])  # (9, 2) as (x, y)
    nearest = torch.cdist(torch.stack([cx, cy], dim=1), centres).argmin(dim=1)
    return [POSITIONS[i] if a > 0 else NO_OBJECT for i, a in zip(nearest.tolist(), area.tolist(), strict=True)]
