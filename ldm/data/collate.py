"""Batching: stack items from any source into the tensors the models take."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def collate_examples(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack items into `{"pixel_values": (B, 3, H, W) float32 in [-1, 1], "captions": list[str]}`.

    `None` items (images that failed to load at run time; the dataset has already logged them) are
    dropped, so a batch can be smaller than requested, and a batch of only `None`s has B = 0.
    """
    kept = [item for item in items if item is not None]
    if not kept:
        return {"pixel_values": torch.empty(0, 3, 0, 0), "captions": []}
    shapes = {tuple(item["pixel_values"].shape) for item in kept}
    if len(shapes) != 1:
        raise ValueError(f"collate_examples: items have different image shapes {sorted(shapes)}; expected one")
    pixel_values = torch.stack([item["pixel_values"] for item in kept]).to(torch.float32)  # (B, 3, H, W)
    return {"pixel_values": pixel_values, "captions": [str(item["caption"]) for item in kept]}
