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
from ldm.diffusion import SAMPLER_NAMES
from ldm.evaluation.bound import bound_not_applicable, heldout_latent_bound
from ldm.evaluation.distilled import TIMING, teacher_comparison, teacher_problem
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
    guidance_sweep_steps: int = 50  # DDIM steps of the guidance sweep (a distilled model: lcm at its default steps)
    ddim_steps: list[int] = field(default_factory=lambda: [10, 25, 50])
    ddpm_steps: int = 1000
    lcm_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # a distilled model's step sweep instead
    teacher: str | None = None  # with a distilled model: the folder it was distilled from, compared beside it
    teacher_samplers: dict[str, int] = field(default_factory=lambda: {"ddim": 50, "dpmpp_2m": 15})  # name: steps
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
        if any(s < 1 for s in [*self.ddim_steps, self.ddpm_steps, self.guidance_sweep_steps, *self.lcm_steps]):
            raise ValueError("ddim_steps, ddpm_steps, guidance_sweep_steps, lcm_steps: must be >= 1")
        if not self.lcm_steps:
            raise ValueError("lcm_steps: need at least one step count")
        unknown = sorted(set(self.teacher_samplers) - set(SAMPLER_NAMES))
        if unknown or not self.teacher_samplers or any(n < 1 for n in self.teacher_samplers.values()):
            raise ValueError(
                f"teacher_samplers: need at least one sampler name ({', '.join(SAMPLER_NAMES)}) with steps >= 1, "
                f"got {self.teacher_samplers}"
            )


def evaluate_model(
    model_dir: str | Path, output_dir: str | Path, cfg: EvaluationConfig, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Write OUT/metrics.json, OUT/report.md, the sweep plots and a sample grid; return the metrics.

    A distilled model (its U-Net takes the guidance scale) is swept with its own sampler, lcm: guidance at its
    default steps, then `cfg.lcm_steps`; its bound is not applicable. With `cfg.teacher`, the teacher's
    `cfg.teacher_samplers` rows are drawn beside the student's step rows (metrics["teacher_comparison"])."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = LatentDiffusionPipeline.from_pretrained(model_dir, device=device, variant=cfg.variant)
    resolution = pipeline.default_size
    teacher = None if cfg.teacher is None else open_teacher(model_dir, cfg, resolution, device)  # before any work
    distilled = pipeline.guidance_in_unet
    metrics: dict[str, Any] = {
        "model": str(model_dir),
        "machine": describe_machine(pipeline.device),
        "settings": asdict(cfg),
        "distilled": distilled,
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

    # A distilled student samples with lcm, one U-Net evaluation per step: DDIM 50 would measure another model.
    sweep_sampler, sweep_steps = "ddim", cfg.guidance_sweep_steps
    if distilled:
        sweep_sampler, sweep_steps = "lcm", pipeline.defaults.num_inference_steps

    def guidance_sweep(captions: FidelityPrompts) -> list[dict[str, Any]]:
        points = [sweep_point(w, sweep_steps, sweep_sampler, cfg.seed) for w in cfg.guidance_scales]
        return [_row(p, prompt_fidelity(pipeline, probe, captions, p), f"{p.guidance_scale:g}") for p in points]

    guidance_rows = guidance_sweep(prompts)
    compositional_rows = guidance_sweep(novel_prompts)
    step_settings = step_sweep(pipeline, cfg, default_w)
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
    if distilled:  # the lcm steps that do not fit the folder's skip-step schedule are left out, and named
        ran = {s.num_inference_steps for s in step_settings}
        metrics["fidelity"]["steps_beyond_schedule"] = [n for n in cfg.lcm_steps if n not in ran]
    if teacher is not None:
        rows = teacher_comparison(
            pipeline, step_settings, step_rows, teacher, cfg.teacher_samplers, probe, prompts, default_w, cfg.seed
        )
        metrics["teacher_comparison"] = {
            "teacher": str(cfg.teacher),
            "guidance_scale": default_w,
            "num_prompts": cfg.num_prompts,
            "timing": TIMING,
            "rows": rows,
        }

    metrics["bound"] = shapes_bound(pipeline, cfg, resolution)

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


def open_teacher(
    model_dir: str | Path, cfg: EvaluationConfig, resolution: int, device: str | torch.device
) -> LatentDiffusionPipeline:
    """The teacher's pipeline; ValueError naming `teacher` if it cannot stand beside the model (see
    `teacher_problem`) or draws another image size than the probe reads."""
    problem = teacher_problem(model_dir, cfg.teacher)
    if problem is not None:
        raise ValueError(f"teacher: {problem}")
    teacher = LatentDiffusionPipeline.from_pretrained(cfg.teacher, device=device, variant=cfg.variant)
    if teacher.default_size != resolution:
        raise ValueError(
            f"teacher: {cfg.teacher} draws {teacher.default_size} px images, the model {resolution} px; the "
            "comparison reads both with one probe, so give the model's own teacher"
        )
    return teacher


def step_sweep(
    pipeline: LatentDiffusionPipeline, cfg: EvaluationConfig, guidance_scale: float
) -> list[GenerationRequest]:
    """The step sweep's points: DDIM at `cfg.ddim_steps` and DDPM at `cfg.ddpm_steps`, or for a distilled model
    lcm at the `cfg.lcm_steps` its skip-step schedule has (a 1000-step DDPM chain means nothing to a student)."""
    if pipeline.guidance_in_unet:
        fits = [n for n in cfg.lcm_steps if n <= pipeline.noise_schedule.lcm_original_steps]
        if len(fits) < len(cfg.lcm_steps):
            logger.warning("lcm steps beyond the folder's %d-step schedule left out of the step sweep",
                           pipeline.noise_schedule.lcm_original_steps)  # fmt: skip
        return [sweep_point(guidance_scale, n, "lcm", cfg.seed) for n in fits]
    points = [sweep_point(guidance_scale, n, "ddim", cfg.seed) for n in cfg.ddim_steps]
    return [*points, sweep_point(guidance_scale, cfg.ddpm_steps, "ddpm", cfg.seed)]


def shapes_bound(pipeline: LatentDiffusionPipeline, cfg: EvaluationConfig, resolution: int) -> dict[str, Any]:
    """The variational bound on `cfg.bound_latents` held-out shapes latents, or {"not_applicable": why}."""
    why = bound_not_applicable(pipeline)
    if why is not None:
        logger.info("variational bound: not applicable (%s)", why)
        return {"not_applicable": why}
    logger.info("variational bound on %d held-out latents", cfg.bound_latents)
    bound_data = ShapesDataset(cfg.bound_latents, resolution, "heldout", seed=cfg.seed + 2)
    items = [bound_data[i] for i in range(cfg.bound_latents)]
    images = torch.stack([item["pixel_values"] for item in items])
    bound = heldout_latent_bound(pipeline, images, [item["caption"] for item in items], seed=cfg.seed)
    return bound | {"timesteps": pipeline.diffusion.num_timesteps}


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
