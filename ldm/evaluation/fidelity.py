"""Prompt fidelity: generate from shapes captions, read the images back with the probe, count matches."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ldm.data.shapes import COLORS, SHAPES, ShapesDataset
from ldm.evaluation.geometry import geometric_positions
from ldm.evaluation.probe import AttributeProbe, attribute_classes
from ldm.generation import GenerationRequest, LatentDiffusionPipeline

# The attributes every prompt names and every fidelity table reports ("all" = colour, shape and background
# right at once).
JUDGED = ("color", "shape", "background", "size", "position")
# Position read a second way, from the pixels (ldm.evaluation.geometry); reported beside the probe's reading.
GEOMETRIC = "position_geometric"


@dataclass(frozen=True)
class FidelityPrompts:
    """Captions of held-out shapes scenes (in the data's own phrasings) and the attributes each one names."""

    captions: list[str]
    attributes: list[dict[str, str]]

    @classmethod
    def of_split(cls, split: str, count: int, resolution: int = 32, seed: int = 1) -> FidelityPrompts:
        """`count` scenes of a shapes split: "heldout" (combinations seen in training, new images) or
        "compositional" (combinations no training caption has); a seed apart from training's."""
        data = ShapesDataset(count, resolution, split, seed=seed)
        items = [data[i] for i in range(count)]
        return cls([item["caption"] for item in items], [item["attributes"] for item in items])

    @classmethod
    def heldout(cls, count: int, resolution: int = 32, seed: int = 1) -> FidelityPrompts:
        return cls.of_split("heldout", count, resolution, seed)

    @classmethod
    def compositional(cls, count: int, resolution: int = 32, seed: int = 1) -> FidelityPrompts:
        return cls.of_split("compositional", count, resolution, seed)


# What a sweep point records of its request (metrics.json, the report).
SWEEP_FIELDS = ("guidance_scale", "num_inference_steps", "sampler", "seed")


def sweep_point(
    guidance_scale: float, num_inference_steps: int, sampler: str = "ddim", seed: int = 0
) -> GenerationRequest:
    """One point of the evaluation's sweep: the request of a guidance scale, a sampler and its steps, and the seed
    of its images (the prompts are each batch's)."""
    return GenerationRequest(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, sampler=sampler,
                             seed=seed, output_type="np", progress=False)  # fmt: skip


def sweep_label(point: GenerationRequest) -> str:
    """How the report names a sweep point, e.g. "ddim 50 steps, w=4"."""
    return f"{point.sampler} {point.num_inference_steps} steps, w={point.guidance_scale:g}"


@torch.no_grad()
def prompt_fidelity(
    pipeline: LatentDiffusionPipeline,
    probe: AttributeProbe,
    prompts: FidelityPrompts,
    point: GenerationRequest,
    batch_size: int = 64,
) -> dict[str, float]:
    """Per-attribute accuracy of the generated images against their prompts (the probe's), the position read from
    the pixels too (GEOMETRIC), the share with colour, shape and background all right, and the sampling wall time
    per image (text encoding, U-Net, VAE decode)."""
    # One generator for all batches, on the device (the point's seed, drawn on from batch to batch).
    generator = torch.Generator(pipeline.device).manual_seed(point.seed)
    hits = dict.fromkeys((*JUDGED, GEOMETRIC), 0)
    all_right = 0
    seconds = 0.0
    for start in range(0, len(prompts.captions), batch_size):
        captions = prompts.captions[start : start + batch_size]
        began = time.perf_counter()
        images = pipeline.generate(replace(point, prompt=captions, seed=None, generator=generator)).images
        seconds += time.perf_counter() - began
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2 - 1
        predicted = probe.predict(pixels) | {GEOMETRIC: geometric_positions(pixels * 0.5 + 0.5)}
        for i, wanted in enumerate(prompts.attributes[start : start + batch_size]):
            right = {k: predicted[k][i] == wanted[k] for k in JUDGED} | {
                GEOMETRIC: predicted[GEOMETRIC][i] == wanted["position"]
            }
            for k in right:
                hits[k] += right[k]
            all_right += right["color"] and right["shape"] and right["background"]
    n = len(prompts.captions)
    result = {k: hits[k] / n for k in hits}
    result["all"] = all_right / n
    result["seconds_per_image"] = seconds / n
    return result


def chance_accuracy(shapes: tuple[str, ...] = SHAPES, colors: tuple[str, ...] = COLORS) -> dict[str, float]:
    """What guessing uniformly would score per attribute for data of `shapes` and `colors` (the floor every table
    is read against)."""
    classes = attribute_classes(shapes, colors)
    return {k: 1.0 / len(classes[k]) for k in JUDGED}
