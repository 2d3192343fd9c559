"""`DataConfig`: the `data:` section of a training config, checked when it is made.

`ldm/data/build.py` turns it into a dataset. Kept apart from that module so whatever takes a `DataConfig` (e.g.
`buckets.use_buckets`) imports this one, never the module that picks between the sources. Its one import from
ldm.data is the shapes vocabulary it checks names against, and shapes.py imports nothing from ldm.data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ldm.data.shapes import COLORS, SHAPES, check_colors, check_shapes

SOURCES = ("shapes", "imagefolder", "webdataset", "latents")


@dataclass
class DataConfig:
    """Where images and captions come from and how they are prepared.

    source: "shapes" (built in, no files), "imagefolder" (a folder with metadata.jsonl),
    "webdataset" (.tar shards; paths are a glob, a brace pattern like "data/{000..099}.tar", or a list
    separated by "::") or "latents" (stage 2 only: the folder `ldm precompute-latents` wrote, streamed
    like shards). The held-out split of shapes is generated; for image sources it is read from
    `heldout_path`, always with a centre crop and no flip.

    buckets (stage 2: imagefolder, webdataset): train on whole images of any aspect ratio instead of square
    crops (ldm/data/buckets.py, docs/buckets.md). Each image goes to the bucket (width, height) of about
    resolution**2 pixels whose aspect ratio is nearest its own, up to `max_aspect_ratio` either way, and every
    batch holds one bucket. The held-out split stays square (centre crop), so evaluation numbers remain
    comparable with unbucketed runs. Shapes are square by construction: buckets are refused for them; for
    "latents" the shards carry the sizes their precompute chose, and `buckets` must match it.
    """

    source: Literal["shapes", "imagefolder", "webdataset", "latents"] = "shapes"
    resolution: int = 32
    seed: int = 0
    # shapes: number of items in each split.
    num_samples: int = 20000
    heldout_samples: int = 1000
    # shapes: the shapes drawn (ldm.data.shapes.SHAPE_KINDS), e.g. add "cross" to fine-tune on a shape never seen.
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    # shapes: the colours of shapes and backgrounds (ldm.data.shapes.COLOR_RGB), e.g. add "pink".
    colors: list[str] = field(default_factory=lambda: list(COLORS))
    # imagefolder / webdataset: where the data lives.
    train_path: str | None = None
    heldout_path: str | None = None
    caption_column: str = "text"  # imagefolder: the metadata.jsonl key that holds the caption
    verify_images: bool = True  # imagefolder: decode every image once at start-up to find bad files
    shuffle_buffer: int = 1000  # webdataset: samples mixed in memory (0 = read in shard order)
    center_crop: bool = True  # False: a random crop of the resized image
    random_flip: bool = False
    strict: bool = False  # a bad image or metadata line is an error instead of a logged skip
    buckets: bool = False  # aspect-ratio buckets (see above); off: every image is cropped to a square
    max_aspect_ratio: float = 2.0  # buckets: the widest bucket's width / height (and height / width)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source: {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.resolution < 8:
            raise ValueError(f"resolution: must be at least 8 pixels, got {self.resolution}")
        if self.num_samples <= 0:
            raise ValueError(f"num_samples: must be positive, got {self.num_samples}")
        if self.heldout_samples <= 0:
            raise ValueError(f"heldout_samples: must be positive, got {self.heldout_samples}")
        self.shapes = list(check_shapes(self.shapes))
        self.colors = list(check_colors(self.colors))
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"max_aspect_ratio: must be >= 1 (the widest bucket's w / h), got {self.max_aspect_ratio}")
        if self.buckets and self.source == "shapes":
            raise ValueError(
                "buckets: the shapes source draws square images only; bucket an imagefolder or webdataset source"
            )
        if not self.caption_column:
            raise ValueError("caption_column: must be a non-empty metadata key, e.g. 'text'")
        if self.source != "shapes" and not self.train_path:
            what = {
                "imagefolder": "a folder holding metadata.jsonl",
                "webdataset": "a glob or list of .tar shards",
                "latents": "the folder ldm precompute-latents wrote",
            }[self.source]
            raise ValueError(f"train_path: required when source is {self.source!r} ({what})")
