"""`ldm generate`: text to images with a model folder; writes one PNG per image, a grid and optional strips."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.commands import add_device_argument

if TYPE_CHECKING:  # heavy imports stay inside the functions, so `ldm --help` is instant
    from PIL.Image import Image
    from torch import Tensor

    from ldm.pipeline import LatentDiffusionPipeline, SamplingSettings

DEFAULT_OUT = "outputs/generate"
STRIP_COLUMNS = 10  # denoising-strip frames, x_T .. x_0 evenly spaced
MIN_TILE = 64  # grid and strip tiles smaller than this are enlarged by whole-pixel repetition


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `generate` to the `ldm` command line."""
    parser = subparsers.add_parser(
        "generate",
        help="generate images from text prompts with a trained model folder",
        description="Sample images for each prompt with classifier-free guidance. Writes OUT/NNN-<prompt>.png per "
        "image, OUT/grid.png (one row per prompt) and, with --trajectory, OUT/trajectory-PP-<prompt>.png; "
        "prints the paths. Unset sampling options fall back to the folder's ldm_sampling.json.",
    )
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="text prompt(s)")
    parser.add_argument("--model", required=True, metavar="DIR", help="model folder (diffusers SD pipeline folder)")
    parser.add_argument("--negative-prompt", default=None, help="guide away from this text instead of ''")
    parser.add_argument("--guidance-scale", type=float, default=None, help="w; 1 = no guidance (default: folder's)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: folder's)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: folder's")
    parser.add_argument("--eta", type=float, default=None, help="DDIM noise, 0 = deterministic (default: folder's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt (default: 1)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's size)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the model's size)")
    add_device_argument(parser)
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--trajectory", action="store_true", help="also write the x_T -> x_0 strip per prompt")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ldm.commands import CommandError, resolve_device
    from ldm.pipeline import LatentDiffusionPipeline

    if args.num_images < 1:
        raise CommandError(f"--num-images: must be >= 1, got {args.num_images}")
    device = resolve_device(args.device)
    try:  # a bad folder or option is the user's to fix: one line, no traceback
        pipe = LatentDiffusionPipeline.from_pretrained(args.model, device=device)
        settings = pipe.resolve_settings(
            args.guidance_scale, args.steps, args.sampler, args.eta, args.height, args.width
        )
    except (OSError, ValueError) as err:  # a missing or corrupt component, or an invalid option
        raise CommandError(str(err)) from err
    paths = generate_images(
        pipe, args.prompts, Path(args.out), args.seed, settings, args.num_images, args.negative_prompt, args.trajectory
    )
    for path in paths:
        print(path)
    return 0


def generate_images(
    pipe: LatentDiffusionPipeline,
    prompts: list[str],
    out: Path,
    seed: int,
    settings: SamplingSettings,
    num_images_per_prompt: int = 1,
    negative_prompt: str | None = None,
    trajectory: bool = False,
) -> list[Path]:
    """Sample, then write each image, the grid (one row per prompt) and, with `trajectory`, one strip per
    prompt; returns the paths written."""
    import torch

    from ldm.images import evenly_spaced, image_grid, to_pil

    # A CPU generator draws the same x_T on every device; step noise must come from the sampling device.
    generator = torch.Generator(pipe.device if settings.stochastic else "cpu").manual_seed(seed)
    result = pipe(
        prompts,
        negative_prompt=negative_prompt,
        num_images_per_prompt=num_images_per_prompt,
        generator=generator,
        output_type="latent",
        return_trajectory=trajectory,
        **vars(settings),
    )
    images = to_pil(pipe.decode(result.images))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(out / f"{i:03d}-{slug(prompts[i // num_images_per_prompt])}.png")
        image.save(paths[-1])
    scale = max(1, MIN_TILE // min(images[0].size))
    paths.append(out / "grid.png")
    image_grid(images, rows=len(prompts), scale=scale).save(paths[-1])
    if trajectory:
        frames = evenly_spaced(result.trajectory.shape[0], STRIP_COLUMNS)
        for p, prompt in enumerate(prompts):
            images_of_prompt = range(p * num_images_per_prompt, (p + 1) * num_images_per_prompt)
            tiles = [
                t
                for b in images_of_prompt
                for t in denoising_strip(pipe, result.trajectory, result.trajectory_x0, frames, b)
            ]
            paths.append(out / f"trajectory-{p:02d}-{slug(prompt)}.png")
            image_grid(tiles, rows=2 * num_images_per_prompt, scale=scale).save(paths[-1])
    return paths


def denoising_strip(
    pipe: LatentDiffusionPipeline, trajectory: Tensor, trajectory_x0: Tensor, frames: list[int], index: int
) -> list[Image]:
    """Two rows of tiles for image `index`: decoded x_t at the trajectory positions `frames`, and below each
    the x_0 the model predicted from that x_t (at the final position, x_0 itself)."""
    import torch

    from ldm.images import to_pil

    steps = trajectory.shape[0] - 1
    x_t = trajectory[frames, index]  # (K, C, h, w)
    x0 = torch.stack([trajectory_x0[j, index] if j < steps else trajectory[steps, index] for j in frames])
    return to_pil(pipe.decode(x_t)) + to_pil(pipe.decode(x0))


def slug(prompt: str, max_length: int = 40) -> str:
    """A file-name-safe form of a prompt: lowercase words joined by '-', at most `max_length` characters."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:max_length].rstrip("-") or "unconditional"
