"""The state of one benchmarks/generation.py run: the model and probe, the results file that lets an interrupted
run resume, batched generation with its timing and U-Net count, kept tiles, pictures and markdown tables."""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.generation_support import unet_evaluations
from ldm.evaluation.probe import AttributeProbe
from ldm.generation import LatentDiffusionPipeline
from ldm.images import image_grid, to_unit_range

log = logging.getLogger("generation")
SEED = 0


class Results:
    """OUT/results.json: {section: {"settings": ..., "rows": {label: row}}}, rewritten after every row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def rows(self, section: str, settings: dict[str, Any]) -> dict[str, dict]:
        """The section's finished rows if they were measured with `settings`, else none (the old ones go)."""
        if self.data.get(section, {}).get("settings") != settings:
            self.data[section] = {"settings": settings, "rows": {}}
        return self.data[section]["rows"]

    def add(self, section: str, label: str, row: dict[str, Any]) -> None:
        self.data[section]["rows"][label] = row
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=2) + "\n", encoding="utf-8")
        temporary.replace(self.path)
        log.info("%s: %s done", section, label)


@dataclass
class Run:
    images: np.ndarray  # (N, H, W, 3) in [0, 1]
    seconds_per_image: float  # the median over batches
    unet_evals_per_image: float


@dataclass
class Bench:
    pipe: LatentDiffusionPipeline
    probe: AttributeProbe
    results: Results
    model: str
    out: Path
    docs: Path
    batch_size: int

    @property
    def resolution(self) -> int:
        return self.pipe.default_size

    def settings(self, **extra: Any) -> dict[str, Any]:
        """What a section's rows depend on: the model, the image size, the batch and the section's own counts."""
        return {"model": self.model, "resolution": self.resolution, "batch_size": self.batch_size} | extra

    def noise(self, count: int, seed: int = SEED) -> torch.Tensor:
        """x_T ~ N(0, I), (count, C, h, w), from its own generator: the same start whatever the batch size."""
        side = self.resolution // self.pipe.vae_scale_factor
        x_T = torch.randn(
            count, self.pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed)
        )
        return x_T.to(self.pipe.device, self.pipe.dtype)

    def generator(self) -> torch.Generator:
        return torch.Generator(self.pipe.device).manual_seed(SEED)

    def generate(self, prompts: list[str], batched: dict[str, torch.Tensor], warm_up: bool = False, **kwargs) -> Run:
        """pipe(prompts, **kwargs) in batches of `batch_size`, the tensors of `batched` (latents, image, mask_image)
        sliced alongside, one generator (seeded SEED) for the whole run; with `warm_up`, an untimed call first."""

        def call(part: slice, generator: torch.Generator) -> np.ndarray:
            tensors = {k: v[part] for k, v in batched.items()}
            return self.pipe(
                prompts[part], **tensors, **kwargs, generator=generator, output_type="np", progress=False
            ).images

        if warm_up:
            call(slice(0, 2), self.generator())
        generator, images, seconds = self.generator(), [], []
        with unet_evaluations(self.pipe) as count:
            for start in range(0, len(prompts), self.batch_size):
                began = time.perf_counter()
                images.append(call(slice(start, start + self.batch_size), generator))
                seconds.append((time.perf_counter() - began) / len(images[-1]))
        # The median batch: one batch slowed by another job on the shared cores does not move it.
        return Run(np.concatenate(images), statistics.median(seconds), count[0] / len(prompts))

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The autoencoder's reconstructions (B, 3, H, W) of images in [0, 1], clamped to [0, 1] as the pipeline's
        output is: the best any latent can give."""
        parts = torch.split(images, self.batch_size)
        return torch.cat([to_unit_range(self.pipe.decode(self.pipe.encode_image(p))).cpu() for p in parts])

    def keep(self, name: str, images: np.ndarray | None = None) -> np.ndarray | None:
        """Store (or, without `images`, load) images a picture or a later row needs: OUT/tiles/NAME.npy."""
        path = self.out / "tiles" / f"{name}.npy"
        if images is None:
            return np.load(path) if path.is_file() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, images)
        return images

    def picture(self, name: str, images: list[Image.Image], rows: int) -> Path:
        """DOCS/NAME.png: `images` row by row, each enlarged to at least 64 pixels."""
        path = self.docs / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, rows=rows, scale=max(1, math.ceil(64 / self.resolution))).save(path)
        return path


def eta_of(sampler: str) -> float | None:
    """DDIM deterministic; the other samplers take no eta (the ancestral ones fix their own noise)."""
    return 0.0 if sampler == "ddim" else None


def table(first: str, rows: list[tuple[str, dict]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table: one line per (label, row), one column per (key, header, format); None prints as -."""

    def cell(value: Any, spec: str) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        return "-" if value is None else format(value, spec)

    lines = [f"| {first} | " + " | ".join(h for _, h, _ in columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    lines += [f"| {label} | " + " | ".join(cell(row.get(k), s) for k, _, s in columns) + " |" for label, row in rows]
    return "\n".join(lines)
