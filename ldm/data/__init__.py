"""Images and captions for both training stages: synthetic shapes, image folders, WebDataset shards.

Every source yields items `{"pixel_values": (3, H, W) float32 in [-1, 1], "caption": str, ...}`;
`collate_examples` stacks them into `{"pixel_values": (B, 3, H, W), "captions": [...]}`.
"""

from ldm.data.build import build_dataset
from ldm.data.collate import collate_examples
from ldm.data.config import DataConfig
from ldm.data.image_folder import FolderSummary, ImageFolderDataset
from ldm.data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
)
from ldm.data.webdataset_source import WebDatasetSource

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "DataConfig",
    "FolderSummary",
    "ImageFolderDataset",
    "ShapesDataset",
    "WebDatasetSource",
    "build_dataset",
    "collate_examples",
]
