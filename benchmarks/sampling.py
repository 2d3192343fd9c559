"""Sampling speed and memory: LatentDiffusionPipeline vs diffusers.StableDiffusionPipeline on one folder.

Both load the same model folder and draw the same batch with the same DDIM schedule, steps, guidance and
seed; the table gives seconds per image (median of repeats), the ratio, the largest pixel
difference between their images, and each one's peak resident memory (each runs in its own subprocess).

    PYTHONPATH=. python benchmarks/sampling.py --model runs/quickstart/pipeline
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ldm.evaluation.machine import peak_resident_mb

PROMPTS = ["a large red circle on a white background", "a small blue square at the top left on a yellow background"]


def run(which: str, folder: Path, batch: int, steps: int, guidance: float, repeats: int) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    if which == "ours":
        from ldm import LatentDiffusionPipeline

        pipe = LatentDiffusionPipeline.from_pretrained(folder)

        def draw() -> np.ndarray:
            # Both draw x_T with diffusers' randn_tensor from the generator: the same seed, the same start.
            generator = torch.Generator().manual_seed(0)
            out = pipe(prompts, guidance_scale=guidance, num_inference_steps=steps, sampler="ddim",
                       generator=generator, output_type="np", progress=False)  # fmt: skip
            return out.images
    else:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False, use_safetensors=True
        )
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def draw() -> np.ndarray:
            generator = torch.Generator().manual_seed(0)
            out = pipe(prompts, guidance_scale=guidance, num_inference_steps=steps, generator=generator,
                       output_type="np", eta=0.0)  # fmt: skip
            return out.images

    images = draw()  # warm-up, and the images compared
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        draw()
        times.append(time.perf_counter() - start)
    peak = peak_resident_mb()
    return {"seconds_per_image": statistics.median(times) / batch, "peak_rss_mb": peak, "images": images.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder (diffusers SD layout)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        result = run(args.worker, args.model, args.batch, args.steps, args.guidance, args.repeats)
        args.out.write_text(json.dumps(result))
        return

    from ldm.evaluation.machine import describe_machine

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for which in ("diffusers", "ours"):
            out = Path(folder) / f"{which}.json"
            command = [sys.executable, __file__, "--worker", which, "--out", str(out)]
            command += ["--model", str(args.model), "--batch", str(args.batch), "--steps", str(args.steps)]
            command += ["--guidance", str(args.guidance), "--repeats", str(args.repeats)]
            command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{which} failed:\n{done.stderr[-3000:]}")
            results[which] = json.loads(out.read_text())

    diff = np.abs(np.array(results["ours"]["images"]) - np.array(results["diffusers"]["images"])).max()
    ratio = results["diffusers"]["seconds_per_image"] / results["ours"]["seconds_per_image"]
    print(f"machine: {describe_machine()}")
    print(f"model {args.model}: batch {args.batch}, DDIM {args.steps} steps, guidance {args.guidance}, fp32\n")
    print("| pipeline | s / image | speed vs diffusers | peak RSS (MB) |")
    print("| --- | --- | --- | --- |")
    for which, label in (("diffusers", "diffusers StableDiffusionPipeline"), ("ours", "LatentDiffusionPipeline")):
        r = results[which]
        speed = results["diffusers"]["seconds_per_image"] / r["seconds_per_image"]
        print(f"| {label} | {r['seconds_per_image']:.4f} | {speed:.2f}x | {r['peak_rss_mb']:.0f} |")
    print(f"\nours is {ratio:.2f}x diffusers' speed; max pixel difference {diff:.2e} (images in [0, 1])")


if __name__ == "__main__":
    main()
