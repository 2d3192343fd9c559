"""Images and captions for both training stages: synthetic shapes, image folders, WebDataset shards.

Every source yields items `{"pixel_values": (3, H, W) float32 in [-1, 1], "caption": str, ...}`;
`collate_examples` stacks them into `{"pixel_values": (B, 3, H, W), "captions": [...]}`.
"""

from ldm.data.collate import collate_examples
from ldm.data.config import DataConfig, build_dataset
from ldm.data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "DataConfig",
    "ShapesDataset",
    "build_dataset",
    "collate_examples",
]
