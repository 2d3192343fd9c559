"""Our lcm sampler against diffusers' LCMScheduler on a distilled model folder: the same latents from the same x_T.

    PYTHONPATH=. python3 benchmarks/lcm_against_diffusers.py --model runs/distill/pipeline

diffusers' StableDiffusionPipeline loads the folder (it picks LCMScheduler from the folder's scheduler config) and
draws from the same x_T, prompts, guidance scale and generator seed as `LatentDiffusionPipeline(sampler="lcm")`.
Prints, per step count, the largest absolute difference of the final latents and the latents' own largest value.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

from ldm.evaluation.fidelity import FidelityPrompts
from ldm.generation import LatentDiffusionPipeline


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    ours = LatentDiffusionPipeline.from_pretrained(args.model)
    theirs = StableDiffusionPipeline.from_pretrained(args.model, use_safetensors=True)
    assert isinstance(theirs.scheduler, LCMScheduler), f"{args.model}: not an LCMScheduler folder"
    theirs.set_progress_bar_config(disable=True)
    side, w = ours.default_size, ours.defaults.guidance_scale
    prompts = FidelityPrompts.heldout(args.prompts, side).captions
    shape = (len(prompts), ours.unet.config.in_channels, side // ours.vae_scale_factor, side // ours.vae_scale_factor)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    print(f"{args.model}: {len(prompts)} held-out prompts, w = {w:g}\n")
    print("| steps | max abs difference of the latents | max abs latent |\n| --- | --- | --- |")
    for steps in args.steps:
        mine = ours(
            prompts,
            latents=x_T,
            generator=torch.Generator().manual_seed(1),
            sampler="lcm",
            num_inference_steps=steps,
            guidance_scale=w,
            output_type="latent",
            progress=False,
        ).images
        reference = theirs(
            prompts,
            latents=x_T,
            generator=torch.Generator().manual_seed(1),
            guidance_scale=w,
            num_inference_steps=steps,
            height=side,
            width=side,
            output_type="latent",
        ).images
        print(f"| {steps} | {(mine - reference).abs().max().item():.2e} | {reference.abs().max().item():.2f} |")


if __name__ == "__main__":
    main()
