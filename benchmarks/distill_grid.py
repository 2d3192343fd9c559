"""The picture of a distilled model beside its teacher: one column per prompt, one row per setting.

Rows, top to bottom: the teacher with DDIM 50, then the student with sampler lcm at 1, 2, 4 and 8 steps, all at
the same guidance scale and with the same initial noise per column (the student's and teacher's latents have the
same shape, so one generator seed per column draws the same starting point for every row).

    PYTHONPATH=. python3 benchmarks/distill_grid.py --model runs/distill/pipeline \
        --teacher runs/quickstart/pipeline --out docs/distill_steps.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ldm.generation import LatentDiffusionPipeline
from ldm.images import save_image_grid
from ldm.training.diffusion_config import DEFAULT_VALIDATION_PROMPTS

PROMPTS = DEFAULT_VALIDATION_PROMPTS  # the grid the distillation writes while it trains
STUDENT_STEPS = (1, 2, 4, 8)


def row(pipeline: LatentDiffusionPipeline, sampler: str, steps: int, guidance: float, seed: int) -> list:
    """One image per prompt, prompt i drawn from generator seed `seed + i`."""
    images = []
    for i, prompt in enumerate(PROMPTS):
        generator = torch.Generator().manual_seed(seed + i)
        images += pipeline(
            prompt, sampler=sampler, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
            progress=False,
        ).images  # fmt: skip
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the distilled model folder")
    parser.add_argument("--teacher", required=True, help="the model folder it was distilled from")
    parser.add_argument("--out", type=Path, default=Path("docs/distill_steps.png"))
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    teacher = LatentDiffusionPipeline.from_pretrained(args.teacher)
    student = LatentDiffusionPipeline.from_pretrained(args.model)
    tiles = row(teacher, "ddim", 50, args.guidance_scale, args.seed)
    for steps in STUDENT_STEPS:
        tiles += row(student, "lcm", steps, args.guidance_scale, args.seed)
    scale = max(1, 64 // teacher.default_size)
    save_image_grid(tiles, args.out, rows=1 + len(STUDENT_STEPS), scale=scale)
    print(f"wrote {args.out}: rows teacher ddim 50, then lcm {', '.join(map(str, STUDENT_STEPS))} steps")


if __name__ == "__main__":
    main()
