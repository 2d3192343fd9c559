"""`evaluate_on_data`: a model measured on the held-out split of the user's own data (`ldm evaluate --data`).

One pass over the first N held-out images measures the autoencoder (PSNR, SSIM; LPIPS with its pretrained
backbone) and, with Inception weights, collects their features; the first of them give the variational bound
and the sample grid. With Inception weights or a CLIP model, the model then draws one image for each of the N
held-out captions at the data's resolution with the folder's default sampling settings, and FID / KID against
the real images and the CLIP score against the captions are computed from them. On the built-in shapes data
the attribute probe also reads the images drawn for the held-out captions.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from autoencoder.evaluate import evaluate_reconstruction
from autoencoder.model import KLAutoencoder
from ldm.config import to_dict
from ldm.evaluation.bound import bound_not_applicable, heldout_latent_bound
from ldm.evaluation.fidelity import (
    SWEEP_FIELDS,
    FidelityPrompts,
    chance_accuracy,
    prompt_fidelity,
    sweep_label,
    sweep_point,
)
from ldm.evaluation.heldout import HeldoutData, check_resolution, heldout_batches
from ldm.evaluation.machine import describe_machine
from ldm.evaluation.pretrained import (
    ClipScore,
    InceptionDistances,
    clip_unavailable_reason,
    lpips_unavailable_reason,
    open_inception,
    reconstruction_fid,
)
from ldm.evaluation.probe import ProbeConfig, load_or_train_probe
from ldm.evaluation.report import write_data_report
from ldm.generation import LatentDiffusionPipeline
from ldm.images import save_image_grid, to_pil

logger = logging.getLogger(__name__)

GRID_FILE = "heldout_grid.png"
GRID_CAPTIONS_FILE = "heldout_grid_captions.txt"


@dataclass
class DataEvaluationConfig:
    """What `evaluate_on_data` measures and with what; recorded whole in metrics.json."""

    num_samples: int = 1000  # held-out images reconstructed; with weights, as many generated for FID / KID / CLIP
    bound_latents: int = 64  # the first held-out images whose bound is computed; each costs T U-Net passes
    grid_captions: int = 8  # rows of the sample grid: a real held-out image, then images drawn for its caption
    grid_images_per_caption: int = 4
    batch_size: int = 32
    seed: int = 0
    variant: str | None = None  # the weight files the model was loaded from (e.g. fp16)
    clip_model: str | None = None  # a local CLIPModel folder: enables the CLIP score
    inception_weights: str | None = None  # torch-fidelity's Inception .pth: enables FID, KID and rFID
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # at most the number of images (KID is computed on subsets of each set)
    lpips_net: str = "vgg"
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # shapes data only: the attribute probe

    def __post_init__(self) -> None:
        for name in ("num_samples", "bound_latents", "grid_captions", "grid_images_per_caption", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise ValueError(f"kid_subsets, kid_subset_size: must be >= 1 and >= 2, got {self.kid_subsets}, "
                             f"{self.kid_subset_size}")  # fmt: skip


@dataclass
class HeldoutSample:
    """What the evaluation keeps of its pass over the held-out images: every caption, and the first images
    (those the bound and the grid need), (K, 3, R, R) in [-1, 1]."""

    captions: list[str]
    images: Tensor


def evaluate_on_data(
    pipeline: LatentDiffusionPipeline,
    heldout: HeldoutData,
    output_dir: str | Path,
    cfg: DataEvaluationConfig,
    model: str = "",
) -> dict[str, Any]:
    """Write OUT/metrics.json, OUT/report.md, OUT/heldout_grid.png (+ its captions) for `pipeline` on the
    held-out split `heldout`; return the metrics. ValueError naming data.resolution before any work when the
    model cannot draw images of the data's size."""
    data = heldout.config
    check_resolution(data.resolution, pipeline.size_multiple, heldout.source)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pipeline.device
    metrics: dict[str, Any] = {
        "model": model,
        "machine": describe_machine(device),
        "data": {"config_file": heldout.source, "description": heldout.describe(), "config": to_dict(data)},
        "settings": asdict(cfg),
        # What every generated image is drawn with: the folder's defaults, at the data's size.
        "sampling": asdict(pipeline.defaults) | {"height": data.resolution, "width": data.resolution},
    }
    inception, inception_reason = open_inception(cfg.inception_weights, device)
    clip_reason = clip_unavailable_reason(cfg.clip_model)
    distances = None
    if inception is not None:
        distances = InceptionDistances(inception, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)

    autoencoder = KLAutoencoder(pipeline.vae).eval()
    # Seeded without touching the caller's generator: the caption drawn for an image with several, and the
    # posterior samples behind the latent statistics.
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        metrics["autoencoder"], sample = measure_autoencoder(autoencoder, heldout, cfg, distances)
    batches = heldout_batches(heldout.dataset, len(sample.captions), cfg.batch_size)
    metrics["autoencoder"] |= reconstruction_fid(autoencoder, batches, cfg.inception_weights, device, inception)
    empty = sum(not caption.strip() for caption in sample.captions)
    metrics["data"] |= {"num_images": len(sample.captions), "empty_captions": empty}
    if empty:
        logger.warning("%d of %d held-out images have no caption: drawn unconditioned", empty, len(sample.captions))

    not_applicable = bound_not_applicable(pipeline)
    if not_applicable is not None:
        metrics["bound"] = {"not_applicable": not_applicable}
    else:
        count = min(cfg.bound_latents, len(sample.captions))
        logger.info("variational bound on %d held-out latents", count)
        metrics["bound"] = heldout_latent_bound(
            pipeline, sample.images[:count], sample.captions[:count], batch_size=cfg.batch_size, seed=cfg.seed
        )
        metrics["bound"]["timesteps"] = pipeline.diffusion.num_timesteps

    metrics["generated"] = score_generated(pipeline, sample.captions, data.resolution, cfg, distances, clip_reason)
    if inception_reason is not None:
        metrics["generated"]["unavailable"] |= {"FID": inception_reason, "KID": inception_reason}
    metrics["grid"] = write_grid(pipeline, sample, data.resolution, cfg, out)
    if data.source == "shapes":
        metrics["shapes_probe"] = shapes_probe_fidelity(pipeline, heldout, len(sample.captions), cfg, out)

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    write_data_report(metrics, out / "report.md")
    return metrics


def measure_autoencoder(
    autoencoder: KLAutoencoder, heldout: HeldoutData, cfg: DataEvaluationConfig, distances: InceptionDistances | None
) -> tuple[dict[str, Any], HeldoutSample]:
    """`evaluate_reconstruction` (PSNR, SSIM, KL, latent statistics; LPIPS when its backbone is on disk) on
    the first `cfg.num_samples` held-out images, in one pass that also keeps their captions and first images
    and gives the images to `distances` as the real set."""
    device = next(autoencoder.parameters()).device
    lpips_reason = lpips_unavailable_reason(cfg.lpips_net)
    perceptual = None
    if lpips_reason is None:
        from autoencoder.perceptual import build_lpips

        perceptual = build_lpips(cfg.lpips_net).to(device)
    keep = max(cfg.bound_latents, cfg.grid_captions)
    captions: list[str] = []
    kept: list[Tensor] = []

    def tapped() -> Any:
        with tqdm(total=cfg.num_samples, desc="held-out images", unit="image") as bar:
            for batch in heldout_batches(heldout.dataset, cfg.num_samples, cfg.batch_size):
                x = batch["pixel_values"]  # (B, 3, R, R) in [-1, 1]
                captions.extend(batch["captions"])
                have = sum(t.shape[0] for t in kept)
                if have < keep:
                    kept.append(x[: keep - have].clone())
                if distances is not None:
                    distances.update((x + 1) / 2, real=True)
                bar.update(x.shape[0])
                yield batch

    logger.info("autoencoder on up to %d held-out images of %s", cfg.num_samples, heldout.describe())
    metrics = evaluate_reconstruction(autoencoder, tapped(), cfg.num_samples, device, perceptual)
    metrics["unavailable"] = {} if lpips_reason is None else {"LPIPS": lpips_reason}
    return metrics, HeldoutSample(captions, torch.cat(kept))


@torch.no_grad()
def score_generated(
    pipeline: LatentDiffusionPipeline,
    captions: list[str],
    resolution: int,
    cfg: DataEvaluationConfig,
    distances: InceptionDistances | None,
    clip_reason: str | None,
) -> dict[str, Any]:
    """One image per held-out caption (seeded, the folder's default sampling settings, `resolution` pixels),
    scored by FID / KID against the held-out images `distances` has seen and by the CLIP score against the
    captions. Nothing is drawn when neither has its weights."""
    scores: dict[str, Any] = {"num_images": 0, "fid": None, "kid_mean": None, "kid_std": None, "clip_score": None}
    scores["unavailable"] = {} if clip_reason is None else {"CLIP score": clip_reason}
    clip = ClipScore(cfg.clip_model, pipeline.device) if clip_reason is None else None
    if distances is None and clip is None:
        return scores
    generator = torch.Generator(pipeline.device).manual_seed(cfg.seed)
    began = time.perf_counter()
    for start in tqdm(range(0, len(captions), cfg.batch_size), desc="generating for held-out captions", unit="batch"):
        batch = captions[start : start + cfg.batch_size]
        images = pipeline(
            batch, height=resolution, width=resolution, generator=generator, output_type="np", progress=False
        ).images
        generated = torch.from_numpy(images).permute(0, 3, 1, 2)  # (B, 3, R, R) in [0, 1]
        if distances is not None:
            distances.update(generated, real=False)
        if clip is not None:
            clip.update(generated, batch)
    scores["num_images"] = len(captions)
    scores["seconds_per_image"] = (time.perf_counter() - began) / len(captions)
    if distances is not None:
        distance_scores = distances.compute()
        scores["unavailable"] |= distance_scores.pop("unavailable", {})
        scores |= distance_scores
    if clip is not None:
        scores["clip_score"] = clip.compute()
    return scores


@torch.no_grad()
def write_grid(
    pipeline: LatentDiffusionPipeline, sample: HeldoutSample, resolution: int, cfg: DataEvaluationConfig, out: Path
) -> dict[str, Any]:
    """OUT/heldout_grid.png: one row per held-out caption (the first `cfg.grid_captions`), its real image in the
    first column and `cfg.grid_images_per_caption` images drawn for the caption beside it; the captions, one per
    line in row order, in OUT/heldout_grid_captions.txt."""
    rows = min(cfg.grid_captions, len(sample.captions))
    captions = sample.captions[:rows]
    per_caption = cfg.grid_images_per_caption
    generator = torch.Generator(pipeline.device).manual_seed(cfg.seed)
    drawn = pipeline(
        captions, num_images_per_prompt=per_caption, height=resolution, width=resolution, generator=generator,
        progress=False,
    ).images  # fmt: skip  # caption-major: caption 0's images first
    reals = to_pil(sample.images[:rows])
    tiles = []
    for i in range(rows):
        tiles += [reals[i], *drawn[i * per_caption : (i + 1) * per_caption]]
    save_image_grid(tiles, out / GRID_FILE, rows=rows, scale=max(1, 64 // resolution))
    one_line = [" ".join(caption.split()) for caption in captions]  # a caption's own line breaks would shift rows
    (out / GRID_CAPTIONS_FILE).write_text("\n".join(one_line) + "\n", encoding="utf-8")
    return {"file": GRID_FILE, "captions_file": GRID_CAPTIONS_FILE, "captions": captions, "per_caption": per_caption}


def shapes_probe_fidelity(
    pipeline: LatentDiffusionPipeline, heldout: HeldoutData, count: int, cfg: DataEvaluationConfig, out: Path
) -> dict[str, Any]:
    """On the built-in shapes data: the attribute probe's reading of images drawn for the first `count`
    held-out captions at the folder's default sampling settings (`ldm evaluate` without --data sweeps guidance
    and steps). The probe reads images of the model's own size, as in that report; saved in OUT/probe/."""
    dataset = heldout.dataset
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    prompts = FidelityPrompts([item["caption"] for item in items], [item["attributes"] for item in items])
    # Data with an added shape or colour (data.shapes, data.colors) needs a probe that knows it.
    data = heldout.config
    probe_cfg = replace(cfg.probe, resolution=pipeline.default_size, shapes=data.shapes, colors=data.colors)
    probe, probe_accuracy = load_or_train_probe(probe_cfg, out / "probe")
    d = pipeline.defaults
    point = sweep_point(d.guidance_scale, d.num_inference_steps, d.sampler, cfg.seed)
    return {
        "num_prompts": len(prompts.captions),
        "resolution": pipeline.default_size,
        "probe_heldout_accuracy": probe_accuracy,
        "probe_config": asdict(probe_cfg),
        "chance": chance_accuracy(tuple(probe_cfg.shapes), tuple(probe_cfg.colors)),
        "default_sampling": {"label": sweep_label(point), "settings": point.settings(SWEEP_FIELDS),
                             "accuracy": prompt_fidelity(pipeline, probe, prompts, point, cfg.batch_size)},
    }  # fmt: skip
