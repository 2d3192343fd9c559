"""The built-in synthetic dataset: captioned images of one simple shape on a plain background.

A scene is a shape (circle, square, triangle) in one of 8 colours on a background of another, in one of 3
sizes at one of 9 grid positions, plus a small discrete jitter of its centre and scale. To fine-tune on
something the default data never shows, `shapes` may add a cross and `colors` may add pink. Item i of a split
is drawn from a generator seeded with (seed, split, i), so any item can be produced on its own in any worker,
reproducibly.

Train and held-out never share an image, by construction: a fixed hash of the rendered pixels assigns
every possible image to exactly one split (`image_split`), and an item is redrawn until its image hashes
to the requested split. Splitting on the pixels, not on the scene parameters, matters at low
resolution, where two different jitters can rasterize to the very same image.

A third split, "compositional", tests what text conditioning is for: composing attributes never seen
together. A fixed set of (shape, colour, position) triples (`NOVEL_COMBINATIONS`) is left out of the train
and held-out splits altogether, and the compositional split draws only scenes of those triples. Every
shape, colour and position, and every pair of them, still occurs in training; only the triple is new.

Rendering is antialiased: the scene is drawn at `SUPERSAMPLE` times the resolution and box-filtered
down, so edge pixels hold the area-weighted mix of shape and background colours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")  # the default data's shapes
SHAPE_KINDS: tuple[str, ...] = (*SHAPES, "cross")  # every shape `render_scene` draws
CROSS_ARM = 0.4  # a cross's arm half-width as a fraction of its extent: about a circle's area, at 0.4^2 * 16

# Colour names and their sRGB values. The palette is shared by shapes and backgrounds (a shape is never
# drawn in its background's colour).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUNDS: tuple[str, ...] = tuple(PALETTE)
EXTRA_PALETTE: dict[str, tuple[int, int, int]] = {"pink": (250, 140, 200)}  # never in the default data
COLOR_RGB: dict[str, tuple[int, int, int]] = PALETTE | EXTRA_PALETTE  # every colour `render_scene` draws

# Half-extent of the shape as a fraction of the image side.
SIZE_EXTENT: dict[str, float] = {"small": 0.08, "medium": 0.12, "large": 0.16}
SIZES: tuple[str, ...] = tuple(SIZE_EXTENT)

# A 3x3 grid of named positions: (name, centre x, centre y) as fractions of the image side.
_GRID = (0.22, 0.5, 0.78)
_ROWS = ("top", "", "bottom")
_COLS = ("left", "", "right")
POSITION_CENTER: dict[str, tuple[float, float]] = {
    (f"{r} {c}".strip() or "center"): (_GRID[j], _GRID[i]) for i, r in enumerate(_ROWS) for j, c in enumerate(_COLS)
}
POSITIONS: tuple[str, ...] = tuple(POSITION_CENTER)

# Discrete jitter that makes scenes with equal attributes differ: the centre moves by k * JITTER_STEP of
# the side (k in -2..2, per axis) and the extent scales by one of SCALE_JITTER. The largest shape at the
# most extreme jitter still ends inside the image: 0.22 - 2 * 0.02 - 0.16 * 1.1 = 0.004 > 0.
JITTER_STEP = 0.02
JITTER_OFFSETS: tuple[int, ...] = (-2, -1, 0, 1, 2)
SCALE_JITTER: tuple[float, ...] = (0.9, 1.0, 1.1)

SPLITS: tuple[str, ...] = ("train", "heldout", "compositional")
HELDOUT_PERCENT = 10  # share of possible images (in percent) that belong to the held-out split
CACHE_LIMIT_BYTES = 256 * 2**20  # ShapesDataset keeps rendered images in memory up to this size
SUPERSAMPLE = 4  # render at this multiple of the resolution, then box-filter down (antialiasing)

# Caption templates; each names every attribute exactly once.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} at the {position} on a {background} background",
    "a {color} {shape}, {size}, {position}, {background} background",
    "{size} {color} {shape} in the {position}, {background} background",
    "a {background} background with a {size} {color} {shape} at the {position}",
    "there is a {size} {color} {shape} at the {position} of a {background} image",
    "{color} {shape} ({size}) on {background}, {position}",
)

# (shape, colour, position) triples no train or held-out scene has: the compositional split's only scenes.
# Scene k of the list is (SHAPES[k % 3], COLORS[k % 8], POSITIONS[k % 9]), k < 12: every shape four times,
# four colours twice and the rest once, every position at least once, and no pair of attributes left out
# whole (the test checks that each pair still has training scenes). 12 of 216 triples: 5.6% of scenes.
NOVEL_COMBINATIONS: frozenset[tuple[str, str, str]] = frozenset(
    (SHAPES[k % len(SHAPES)], COLORS[k % len(COLORS)], POSITIONS[k % len(POSITIONS)]) for k in range(12)
)

# Part of every cache fingerprint made from this dataset: bump it when the same (seed, split, index) would
# give another item (2: the novel combinations left out of train and held-out).
CONTENT_VERSION = "shapes/2"

MAX_ATTEMPTS = 1000  # draws per item before giving up on finding a scene of the requested split


def sample_scene(
    rng: np.random.Generator, shapes: tuple[str, ...] = SHAPES, colors: tuple[str, ...] = COLORS
) -> dict[str, Any]:
    """Draw scene parameters uniformly: attributes (background never the shape's colour) and jitter. The
    shape and background colours come from the same `colors`."""
    color = int(rng.integers(len(colors)))
    background = int(rng.integers(len(colors) - 1))
    background += background >= color  # skip the shape's own colour
    return {
        "shape": shapes[int(rng.integers(len(shapes)))],
        "color": colors[color],
        "background": colors[background],
        "size": SIZES[int(rng.integers(len(SIZES)))],
        "position": POSITIONS[int(rng.integers(len(POSITIONS)))],
        "jitter": (
            JITTER_OFFSETS[int(rng.integers(len(JITTER_OFFSETS)))],
            JITTER_OFFSETS[int(rng.integers(len(JITTER_OFFSETS)))],
            SCALE_JITTER[int(rng.integers(len(SCALE_JITTER)))],
        ),
    }


def combination(scene: dict[str, Any]) -> tuple[str, str, str]:
    """The (shape, colour, position) triple of a scene: what NOVEL_COMBINATIONS is made of."""
    return scene["shape"], scene["color"], scene["position"]


def image_split(image: Image.Image) -> str:
    """The split an image belongs to: a fixed hash of its 8-bit pixels, never seeded.

    heldout iff blake2b(pixels) mod 100 < HELDOUT_PERCENT. Being a function of the pixels alone, two
    identical images always land in the same split, so no image can be in both.
    """
    digest = hashlib.blake2b(image.tobytes(), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "little") % 100 < HELDOUT_PERCENT else "train"


def render_scene(scene: dict[str, Any], resolution: int) -> Image.Image:
    """Draw `scene` as an RGB image of `resolution` x `resolution`, antialiased by supersampling."""
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOR_RGB[scene["background"]])
    draw = ImageDraw.Draw(image)
    jx, jy, scale = scene["jitter"]
    cx, cy = POSITION_CENTER[scene["position"]]
    cx, cy = (cx + jx * JITTER_STEP) * big, (cy + jy * JITTER_STEP) * big
    r = SIZE_EXTENT[scene["size"]] * scale * big
    fill = COLOR_RGB[scene["color"]]
    if scene["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene["shape"] == "square":
        s = 0.9 * r  # a slightly smaller square has about the circle's visual weight
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif scene["shape"] == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif scene["shape"] == "cross":
        a = CROSS_ARM * r
        draw.rectangle((cx - r, cy - a, cx + r, cy + a), fill=fill)
        draw.rectangle((cx - a, cy - r, cx + a, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {scene['shape']!r}; valid: {', '.join(SHAPE_KINDS)}")
    # BOX averages each SUPERSAMPLE x SUPERSAMPLE block: edge pixels get the covered-area mix of colours.
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def check_shapes(shapes: Sequence[str], key: str = "shapes") -> tuple[str, ...]:
    """`shapes` as a tuple, if it names at least two distinct drawable shapes; ValueError naming `key` otherwise."""
    return _check_choice(shapes, SHAPE_KINDS, key, "shape")


def check_colors(colors: Sequence[str], key: str = "colors") -> tuple[str, ...]:
    """`colors` as a tuple, if it names at least two distinct known colours; ValueError naming `key` otherwise."""
    return _check_choice(colors, tuple(COLOR_RGB), key, "colour")


def _check_choice(chosen: Sequence[str], known: tuple[str, ...], key: str, what: str) -> tuple[str, ...]:
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise ValueError(f"{key}: unknown {what}(s) {unknown}; valid: {', '.join(known)}")
    if len(set(chosen)) != len(chosen) or len(chosen) < 2:
        raise ValueError(f"{key}: needs at least two different {what}s, each once; got {list(chosen)}")
    return tuple(chosen)


class ShapesDataset(Dataset):
    """Captioned synthetic shapes; item i is a pure function of (seed, split, i).

    Each item is `{"pixel_values": (3, H, W) float32 in [-1, 1], "caption": str, "attributes": {...}}`
    with attributes shape, color, background, size, position (names from the module's vocabularies).
    With `cache` (the default), rendered images are kept in memory when all of them fit in
    CACHE_LIMIT_BYTES as 8-bit pixels (20k images at 32 px take 61 MB). The train and held-out splits leave
    out NOVEL_COMBINATIONS unless `include_novel` (the attribute probe, a judge of every combination, is
    trained with them). `shapes` and `colors` are the shapes and colours drawn, each equally often; the default
    sets give the items they always gave.
    """

    def __init__(
        self,
        num_samples: int,
        resolution: int = 32,
        split: str = "train",
        seed: int = 0,
        cache: bool = True,
        include_novel: bool = False,
        shapes: Sequence[str] = SHAPES,
        colors: Sequence[str] = COLORS,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.shapes = check_shapes(shapes)
        self.colors = check_colors(colors)
        self.num_samples = num_samples
        self.resolution = resolution
        self.split = split
        self.seed = seed
        self.include_novel = include_novel
        # Rendering costs ~0.4 ms an item (train; ~2.5 ms heldout); keeping the 8-bit images makes every
        # epoch after the first nearly free. Each data-loader worker holds its own copy, so only if small.
        fits = num_samples * 3 * resolution**2 <= CACHE_LIMIT_BYTES
        self._cache: dict[int, tuple[torch.Tensor, str, dict[str, str]]] | None = {} if cache and fits else None

    def __len__(self) -> int:
        return self.num_samples

    @property
    def content_version(self) -> str:
        """What the item of an index depends on beyond (seed, split, index, resolution): part of cache keys."""
        if (self.shapes, self.colors) == (SHAPES, COLORS):
            return CONTENT_VERSION
        return f"{CONTENT_VERSION}+{'+'.join(self.shapes)}/{'+'.join(self.colors)}"

    def draw(self, index: int) -> tuple[dict[str, Any], Image.Image, np.random.Generator]:
        """Item `index`'s scene, its rendered image and the generator it was drawn from.

        Attempt k draws a scene from a generator seeded with (seed, split, index, k); the first that belongs
        to this split is the item: for train and heldout, an image of that split (`image_split`) and not a
        novel combination (about 1.2 draws for train, 10.6 for heldout); for compositional, a novel
        combination (18 draws on average, only the last one rendered).
        """
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.num_samples}")
        for attempt in range(MAX_ATTEMPTS):
            rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index, attempt])
            scene = sample_scene(rng, self.shapes, self.colors)
            novel = combination(scene) in NOVEL_COMBINATIONS
            if self.split == "compositional":
                if novel:
                    return scene, render_scene(scene, self.resolution), rng
                continue
            if novel and not self.include_novel:
                continue
            image = render_scene(scene, self.resolution)
            if image_split(image) == self.split:
                return scene, image, rng
        raise RuntimeError(f"no {self.split} scene found in {MAX_ATTEMPTS} draws at resolution {self.resolution}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        cached = self._cache.get(index) if self._cache is not None else None
        if cached is None:
            scene, image, rng = self.draw(index)
            attributes = {key: scene[key] for key in ("shape", "color", "background", "size", "position")}
            template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
            pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W) uint8
            cached = (pixels, template.format(**attributes), attributes)
            if self._cache is not None:
                self._cache[index] = cached
        pixels, caption, attributes = cached
        return {
            "pixel_values": pixels.to(torch.float32) / 127.5 - 1.0,  # same map as images.to_model_tensor
            "caption": caption,
            "attributes": dict(attributes),
        }
