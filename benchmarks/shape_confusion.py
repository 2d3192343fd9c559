"""Which shapes a model draws wrong: the attribute probe's shape reading against the caption's, and by size.

    PYTHONPATH=. python3 benchmarks/shape_confusion.py --model runs/quickstart/pipeline \
        --probe runs/quickstart/evaluation/probe

Draws one image per held-out caption (the captions, probe and seed of `ldm evaluate`'s sweep) with DDIM at the
given steps and guidance, and prints the confusion table and the share right per size. The probe folder is one
`ldm evaluate` saved (it is trained there on first use when missing).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from ldm.evaluation.fidelity import FidelityPrompts, sweep_point
from ldm.evaluation.probe import ProbeConfig, load_or_train_probe
from ldm.generation import LatentDiffusionPipeline


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--probe", type=Path, required=True, help="a probe folder `ldm evaluate` wrote (OUT/probe)")
    parser.add_argument("--captions", type=int, default=384)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    pipeline = LatentDiffusionPipeline.from_pretrained(args.model)
    probe, _ = load_or_train_probe(ProbeConfig(resolution=pipeline.default_size), args.probe)
    prompts = FidelityPrompts.of_split("heldout", args.captions, pipeline.default_size)
    point = sweep_point(args.guidance_scale, args.steps, "ddim", 0)
    generator = torch.Generator(pipeline.device).manual_seed(point.seed)  # as prompt_fidelity draws
    confusion, right_by_size, count_by_size = Counter(), Counter(), Counter()
    for start in range(0, args.captions, 64):
        captions = prompts.captions[start : start + 64]
        images = pipeline.generate(replace(point, prompt=captions, seed=None, generator=generator)).images
        read = probe.predict(torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2 - 1)["shape"]
        for wanted, shape in zip(prompts.attributes[start : start + 64], read, strict=True):
            confusion[wanted["shape"], shape] += 1
            count_by_size[wanted["size"]] += 1
            right_by_size[wanted["size"]] += shape == wanted["shape"]
    shapes = sorted({wanted for wanted, _ in confusion} | {shape for _, shape in confusion})
    print(f"{args.model}: DDIM {args.steps}, w = {args.guidance_scale:g}, {args.captions} held-out captions\n")
    print("| caption's shape | " + " | ".join(f"read as {s}" for s in shapes) + " | right |")
    print("| --- |" + " --- |" * (len(shapes) + 1))
    for wanted in shapes:
        total = sum(confusion[wanted, s] for s in shapes)
        cells = " | ".join(str(confusion[wanted, s]) for s in shapes)
        print(f"| {wanted} ({total}) | {cells} | {100 * confusion[wanted, wanted] / max(total, 1):.1f}% |")
    by_size = ", ".join(f"{size} {100 * right_by_size[size] / n:.1f}%" for size, n in sorted(count_by_size.items()))
    print(f"\nshape right by size: {by_size}")


if __name__ == "__main__":
    main()
