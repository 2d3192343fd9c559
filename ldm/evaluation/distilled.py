"""A consistency-distilled model under evaluation: how to tell one from its folder, what a sweep point costs in
U-Net evaluations, and the comparison of the student's few-step rows with its teacher's usual samplers (the same
prompts, probe and guidance scale, seconds per image from the same run)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ldm.evaluation.fidelity import SWEEP_FIELDS, FidelityPrompts, prompt_fidelity, sweep_label, sweep_point
from ldm.evaluation.probe import AttributeProbe
from ldm.generation import GenerationRequest, LatentDiffusionPipeline
from ldm.generation.model_folder import read_json

logger = logging.getLogger(__name__)

# How the comparison's seconds per image were measured (metrics.json and the report say it).
TIMING = (
    "wall time of each row's generation (text encoding, U-Net, VAE decode; batches of up to 64 prompts) divided by "
    "its images, every row in the same run on the same machine"
)


def folder_is_distilled(folder: str | Path) -> bool:
    """Whether the folder's U-Net takes the guidance scale as an input (unet/config.json sets time_cond_proj_dim):
    a consistency-distilled student. Read from the config, without loading weights (a loaded pipeline says the
    same as `guidance_in_unet`)."""
    return read_json(Path(folder) / "unet" / "config.json").get("time_cond_proj_dim") is not None


def teacher_problem(model: str | Path, teacher: str | Path) -> str | None:
    """Why `teacher` cannot be compared with `model` (two complete model folders), or None when it can: the
    comparison needs a distilled model and a teacher that is not."""
    if not folder_is_distilled(model):
        return (
            f"compares a distilled model with its teacher, but {model} is not distilled (its unet/config.json sets "
            "no time_cond_proj_dim); evaluate a teacher on its own, without --teacher"
        )
    if folder_is_distilled(teacher):
        return (
            f"{teacher} is itself distilled (its unet/config.json sets time_cond_proj_dim); give the folder the "
            "student was distilled from"
        )
    return None


def unet_evaluations_per_image(pipeline: LatentDiffusionPipeline, point: GenerationRequest) -> int:
    """U-Net forward passes per image of a text-to-image point: one per step, two per step under classifier-free
    guidance (w != 1 on a U-Net that does not take w as an input; a distilled student never runs it)."""
    guided = not pipeline.guidance_in_unet and point.guidance_scale != 1.0
    return point.num_inference_steps * (2 if guided else 1)


def teacher_comparison(
    student: LatentDiffusionPipeline,
    student_points: list[GenerationRequest],
    student_rows: list[dict[str, Any]],
    teacher: LatentDiffusionPipeline,
    teacher_samplers: dict[str, int],
    probe: AttributeProbe,
    prompts: FidelityPrompts,
    guidance_scale: float,
    seed: int,
) -> list[dict[str, Any]]:
    """The comparison's rows: the student's step-sweep rows (drawn from `student_points`, already measured in this
    run), then one row per (sampler, steps) of `teacher_samplers` drawn by the teacher on the same prompts at the
    same guidance scale and read by the same probe; each with its U-Net evaluations per image."""
    rows = [
        {"model": "student", **row, "unet_evaluations_per_image": unet_evaluations_per_image(student, point)}
        for point, row in zip(student_points, student_rows, strict=True)
    ]
    # Untimed: a pipeline's first call pays one-time costs the student paid in the sweeps before its rows.
    warm_up = sweep_point(guidance_scale, 1, next(iter(teacher_samplers)), seed)
    teacher.generate(replace(warm_up, prompt=prompts.captions[:1]))
    for sampler, steps in teacher_samplers.items():
        point = sweep_point(guidance_scale, steps, sampler, seed)
        logger.info("teacher: %s", sweep_label(point))
        rows.append(
            {
                "model": "teacher",
                "label": sweep_label(point),
                "settings": point.settings(SWEEP_FIELDS),
                "accuracy": prompt_fidelity(teacher, probe, prompts, point),
                "unet_evaluations_per_image": unet_evaluations_per_image(teacher, point),
            }
        )
    return rows
