"""Where a distilled student parts from its teacher, link by link: per timestep, and per guidance scale.

    PYTHONPATH=. python3 benchmarks/distill_trace.py --model runs/distill/pipeline --teacher runs/quickstart/pipeline

1. The teacher's guided DDIM 50 from x_T (w = --guidance-scale) gives a trajectory x_t and an endpoint z. For each
   timestep t the table prints how far the student's f(x_t, t) lands from z, both from the teacher's own x_t
   (what the distillation trains on) and from z re-noised to t with fresh noise (what multistep lcm sampling feeds
   it after its first step), beside the teacher's one-step guided x0 from the same re-noised point. Distances are
   mean L2 over the batch, relative to the mean norm of z.
2. Whether the student reads w at all: the mean L2 distance between its f(x_t, t) at w = 2 and at w = 8, beside
   the same distance of the teacher's one-step guided x0 (same x_t).
"""

from __future__ import annotations

import argparse

import torch

from ldm.diffusion.consistency import consistency_denoise
from ldm.diffusion.consistency_distillation import guided_prediction
from ldm.evaluation.fidelity import FidelityPrompts
from ldm.generation import LatentDiffusionPipeline

TRACED = (999, 759, 519, 279, 139, 19)  # on the 50-point grid; 999/759/519/279 are lcm's 4 steps


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).flatten(1).norm(dim=1).mean())


class Models:
    def __init__(self, teacher: LatentDiffusionPipeline, student: LatentDiffusionPipeline, prompts: list[str]):
        self.teacher, self.student, self.diffusion = teacher, student, teacher.diffusion
        self.cond, uncond = teacher.encode_prompt(prompts)
        self.uncond = uncond.expand_as(self.cond)
        self.timestep_scaling = student.noise_schedule.timestep_scaling

    def teacher_x0_eps(self, x: torch.Tensor, t: int, w: float) -> tuple[torch.Tensor, torch.Tensor]:
        tt = torch.full((x.shape[0],), t)
        steps = self.diffusion.model_timesteps(torch.cat([tt, tt]))
        output = self.teacher.unet(torch.cat([x, x]), steps, encoder_hidden_states=torch.cat([self.cond, self.uncond]))
        conditional, unconditional = output.sample.float().chunk(2)
        return guided_prediction(self.diffusion, conditional, unconditional, x, tt, torch.full((x.shape[0],), w))

    def student_f(self, x: torch.Tensor, t: int, w: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t)
        model = self.student.guided_model(w, self.uncond)
        output = model(x, self.diffusion.model_timesteps(tt), encoder_hidden_states=self.cond)
        return consistency_denoise(self.diffusion, output, x, tt, self.timestep_scaling)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the distilled model folder")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    args = parser.parse_args()
    teacher = LatentDiffusionPipeline.from_pretrained(args.teacher)
    student = LatentDiffusionPipeline.from_pretrained(args.model)
    models = Models(teacher, student, FidelityPrompts.of_split("heldout", args.prompts, teacher.default_size).captions)
    generator = torch.Generator().manual_seed(0)
    side = teacher.default_size // teacher.vae_scale_factor
    x = torch.randn((args.prompts, teacher.unet.config.in_channels, side, side), generator=generator)
    grid = list(range(teacher.diffusion.num_timesteps - 1, -1, -teacher.diffusion.num_timesteps // 50))
    trajectory = {}
    abar = teacher.diffusion.coefficients(torch.device("cpu")).alphas_cumprod.float()
    for i, t in enumerate(grid):  # the teacher's guided DDIM 50
        trajectory[t] = x
        x0, eps = models.teacher_x0_eps(x, t, args.guidance_scale)
        x = x0 if i + 1 == len(grid) else abar[grid[i + 1]].sqrt() * x0 + (1 - abar[grid[i + 1]]).sqrt() * eps
    z, w = x, args.guidance_scale
    norm = float(z.flatten(1).norm(dim=1).mean())
    print(f"1. distance to the teacher's DDIM-50 endpoint z (w = {w:g}), relative to |z| = {norm:.1f}\n")
    print("| t | student from the teacher's x_t | student from z re-noised | teacher's one-step x0 from z re-noised |")
    print("| --- | --- | --- | --- |")
    for t in TRACED:
        noised = teacher.diffusion.q_sample(z, torch.full((z.shape[0],), t), torch.randn(z.shape, generator=generator))
        on_path = distance(models.student_f(trajectory[t], t, w), z) / norm
        renoised = distance(models.student_f(noised, t, w), z) / norm
        teacher_one_step = distance(models.teacher_x0_eps(noised, t, w)[0], z) / norm
        print(f"| {t} | {on_path:.3f} | {renoised:.3f} | {teacher_one_step:.3f} |")
    print("\n2. how far apart w = 2 and w = 8 put the prediction from the same x_t (the teacher's trajectory)\n")
    print("| t | student f, w 2 vs 8 | teacher's one-step x0, w 2 vs 8 |")
    print("| --- | --- | --- |")
    for t in (999, 519, 279):
        x_t = trajectory[t]
        student_gap = distance(models.student_f(x_t, t, 2.0), models.student_f(x_t, t, 8.0))
        teacher_gap = distance(models.teacher_x0_eps(x_t, t, 2.0)[0], models.teacher_x0_eps(x_t, t, 8.0)[0])
        print(f"| {t} | {student_gap:.2f} | {teacher_gap:.2f} |")


if __name__ == "__main__":
    main()
