"""`evaluate_model`: every number `ldm evaluate` reports for a model folder, in one place."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from autoencoder.evaluate import evaluate_reconstruction
from autoencoder.model import KLAutoencoder
from ldm.data import collate_examples
from ldm.data.shapes import ShapesDataset
from ldm.evaluation.bound import heldout_latent_bound
from ldm.evaluation.fidelity import (
    SWEEP_FIELDS,
    FidelityPrompts,
    chance_accuracy,
    prompt_fidelity,
    sweep_label,
    sweep_point,
)
from ldm.evaluation.machine import describe_machine
from ldm.evaluation.pretrained import pretrained_scores, reconstruction_fid
from ldm.evaluation.probe import AttributeProbe, ProbeConfig, accuracy, load_or_train_probe, shapes_tensors
from ldm.evaluation.report import plot_sweep, write_report
from ldm.evaluation.text_pathway import summary_line, text_pathway
from ldm.generation import GenerationRequest, LatentDiffusionPipeline
from ldm.images import save_image_grid

logger = logging.getLogger(__name__)


@dataclass
class EvaluationConfig:
    num_prompts: int = 96  # held-out shapes captions, one image each, per sweep setting
    autoencoder_images: int = 1000
    bound_latents: int = 64  # each costs T U-Net passes
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 7.5])
    guidance_sweep_steps: int = 50  # DDIM steps of the guidance sweep
    ddim_steps: list[int] = field(default_factory=lambda: [10, 25, 50])
    ddpm_steps: int = 1000
    seed: int = 0
    clip_model: str | None = None  # a local CLIPModel folder: enables the CLIP score
    inception_weights: str | None = None  # torch-fidelity's Inception .pth: enables FID and rFID
    variant: str | None = None  # the weight files to load (e.g. fp16: *.fp16.safetensors)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.autoencoder_images < 1 or self.bound_latents < 1:
            raise ValueError("num_prompts, autoencoder_images, bound_latents: must be >= 1")
        if any(w < 0 for w in self.guidance_scales) or not self.guidance_scales:
            raise ValueError(f"guidance_scales: need at least one value, all >= 0, got {self.guidance_scales}")
        if any(s < 1 for s in [*self.ddim_steps, self.ddpm_steps, self.guidance_sweep_steps]):
            raise ValueError("ddim_steps, ddpm_steps, guidance_sweep_steps: must be >= 1")


def evaluate_model(
    model_dir: str | Path, output_dir: str | Path, cfg: EvaluationConfig, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Write OUT/metrics.json, OUT/report.md, the sweep plots and a sample grid; return the metrics."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = LatentDiffusionPipeline.from_pretrained(model_dir, device=device, variant=cfg.variant)
    resolution = pipeline.default_size
    metrics: dict[str, Any] = {
        "model": str(model_dir),
        "machine": describe_machine(pipeline.device),
        "settings": asdict(cfg),
    }

    logger.info("autoencoder on %d held-out images", cfg.autoencoder_images)
    heldout = ShapesDataset(cfg.autoencoder_images, resolution, "heldout")
    loader = DataLoader(heldout, batch_size=100, collate_fn=collate_examples)
    autoencoder = KLAutoencoder(pipeline.vae).eval()
    metrics["autoencoder"] = evaluate_reconstruction(autoencoder, loader, cfg.autoencoder_images, pipeline.device)
    metrics["autoencoder"] |= reconstruction_fid(autoencoder, loader, cfg.inception_weights, pipeline.device)

    probe_cfg = replace(cfg.probe, resolution=resolution)  # the probe reads images of the model's size
    probe, probe_accuracy = load_or_train_probe(probe_cfg, out / "probe")
    metrics["probe"] = {"heldout_accuracy": probe_accuracy, "config": asdict(probe_cfg)}
    # What survives stage 1 bounds what stage 2 can draw: the probe on reconstructions is that ceiling.
    metrics["autoencoder"]["probe_accuracy_on_reconstructions"] = reconstruction_probe_accuracy(
        autoencoder, probe, heldout
    )
    metrics["text_pathway"] = text_pathway(pipeline.text_encoder, seed=cfg.seed)
    logger.info(summary_line(metrics["text_pathway"]))
    prompts = FidelityPrompts.heldout(cfg.num_prompts, resolution)
    novel_prompts = FidelityPrompts.compositional(cfg.num_prompts, resolution)
    default_w = pipeline.defaults.guidance_scale

    def guidance_sweep(captions: FidelityPrompts) -> list[dict[str, Any]]:
        points = [sweep_point(w, cfg.guidance_sweep_steps, "ddim", cfg.seed) for w in cfg.guidance_scales]
        return [_row(p, prompt_fidelity(pipeline, probe, captions, p), f"{p.guidance_scale:g}") for p in points]

    guidance_rows = guidance_sweep(prompts)
    compositional_rows = guidance_sweep(novel_prompts)
    step_settings = [sweep_point(default_w, n, "ddim", cfg.seed) for n in cfg.ddim_steps]
    step_settings.append(sweep_point(default_w, cfg.ddpm_steps, "ddpm", cfg.seed))
    step_rows = [
        _row(s, prompt_fidelity(pipeline, probe, prompts, s), f"{s.sampler}\n{s.num_inference_steps}")
        for s in step_settings
    ]
    metrics["fidelity"] = {
        "num_prompts": cfg.num_prompts,
        "chance": chance_accuracy(),
        "guidance_sweep": guidance_rows,
        "step_sweep": step_rows,
        "compositional_guidance_sweep": compositional_rows,
        "default_guidance_scale": default_w,
    }

    logger.info("variational bound on %d held-out latents", cfg.bound_latents)
    bound_data = ShapesDataset(cfg.bound_latents, resolution, "heldout", seed=cfg.seed + 2)
    items = [bound_data[i] for i in range(cfg.bound_latents)]
    images = torch.stack([item["pixel_values"] for item in items])
    metrics["bound"] = heldout_latent_bound(pipeline, images, [item["caption"] for item in items], seed=cfg.seed)
    metrics["bound"]["timesteps"] = pipeline.diffusion.num_timesteps

    metrics["pretrained"] = pretrained_scores(pipeline, prompts, heldout, cfg, default_w)

    sample_prompts = prompts.captions[:8]
    generator = torch.Generator(pipeline.device).manual_seed(cfg.seed)
    grid = GenerationRequest(sample_prompts, num_images_per_prompt=4, generator=generator, progress=False)
    grid_images = pipeline.generate(grid).images
    save_image_grid(grid_images, out / "samples.png", rows=len(sample_prompts), scale=max(1, 64 // resolution))
    (out / "samples_prompts.txt").write_text("\n".join(sample_prompts) + "\n", encoding="utf-8")

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    plot_sweep(guidance_rows, cfg.guidance_scales, "guidance scale w", out / "fidelity_vs_guidance.png")
    plot_sweep(
        compositional_rows, cfg.guidance_scales, "guidance scale w (novel combinations)",
        out / "compositional_fidelity_vs_guidance.png",
    )  # fmt: skip
    step_counts = [float(s.num_inference_steps) for s in step_settings]
    plot_sweep(step_rows, step_counts, "sampling steps", out / "fidelity_vs_steps.png", log_x=True)
    write_report(metrics, out / "report.md")
    return metrics


@torch.no_grad()
def reconstruction_probe_accuracy(
    autoencoder: KLAutoencoder, probe: AttributeProbe, heldout: ShapesDataset, batch_size: int = 100
) -> dict[str, float]:
    """The probe's per-attribute accuracy on the autoencoder's reconstructions (posterior mean) of held-out
    renderings: how much of each attribute the latents keep."""
    images, labels = shapes_tensors(heldout)
    device = next(autoencoder.parameters()).device
    reconstructions = torch.cat(
        [
            autoencoder.decode(autoencoder.encode(x.to(device)).mode()).clamp(-1, 1).cpu()
            for x in images.split(batch_size)
        ]
    )
    return accuracy(probe, reconstructions, labels)


def _row(point: GenerationRequest, accuracy: dict[str, float], tick: str) -> dict[str, Any]:
    return {"label": sweep_label(point), "tick": tick, "settings": point.settings(SWEEP_FIELDS), "accuracy": accuracy}
