"""`ldm interpolate`: frames between two seeds (and two prompts), written as a strip, a GIF and a WebP.

Frame k of N has weight w = k / (N - 1). Its x_T is slerp(x_T(seed_a), x_T(seed_b), w), which keeps the norm a
Gaussian sample has where a straight line would pass through low-norm noise the model never saw; its text
embedding is (1 - w) c_a + w c_b, the two prompts' CLIP embeddings mixed linearly.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ldm.commands import add_device_argument, add_model_arguments, add_sampler_arguments

if TYPE_CHECKING:  # heavy imports stay inside the functions, so `ldm --help` is instant
    from torch import Tensor

DEFAULT_FRAMES = 8
DEFAULT_FPS = 8.0
DEFAULT_BATCH = 8
T = TypeVar("T")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `interpolate` to the `ldm` command line."""
    parser = subparsers.add_parser(
        "interpolate",
        help="images along a path between two seeds and two prompts, as a strip and an animation",
        description="Sample FRAMES images whose x_T moves from --seed-a's noise to --seed-b's (spherically) and "
        "whose text embedding moves from PROMPT_A's to PROMPT_B's (with one prompt, only the noise moves). "
        "Writes OUT/strip.png, OUT/interpolation.gif and OUT/interpolation.webp (there and back, looping) and "
        "prints the paths. A deterministic sampler (ddim with eta 0, dpmpp_2m) gives the smoothest motion.",
    )
    parser.add_argument("prompt_a", metavar="PROMPT_A", help="the text of the first frame")
    parser.add_argument("prompt_b", nargs="?", default=None, metavar="PROMPT_B", help="the text of the last frame")
    add_model_arguments(parser)
    parser.add_argument(
        "--frames", type=int, default=DEFAULT_FRAMES, metavar="N", help=f"frames, >= 2 (default: {DEFAULT_FRAMES})"
    )
    parser.add_argument("--seed-a", type=int, default=0, help="seed of the first frame's noise (default: 0)")
    parser.add_argument("--seed-b", type=int, default=1, help="seed of the last frame's noise (default: 1)")
    add_sampler_arguments(parser)
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH, help=f"frames per pipeline call (default: {DEFAULT_BATCH})"
    )
    add_device_argument(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--fps", type=float, default=DEFAULT_FPS, help=f"animation frames per second (default: {DEFAULT_FPS:g})"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ldm.commands import CommandError, resolve_device
    from ldm.commands.generate import MIN_TILE
    from ldm.generation import GenerationRequest, LatentDiffusionPipeline
    from ldm.images import image_grid, write_animation

    for flag, value, least in (("--frames", args.frames, 2), ("--batch-size", args.batch_size, 1)):
        if value < least:
            raise CommandError(f"{flag}: must be >= {least}, got {value}")
    if not args.fps > 0:
        raise CommandError(f"--fps: must be > 0, got {args.fps}")
    device = resolve_device(args.device)
    weights = frame_weights(args.frames)
    try:  # a bad folder, option or prompt is the user's to fix: one line, no traceback
        pipe = LatentDiffusionPipeline.from_pretrained(args.model, device=device, variant=args.variant)
        f, side = pipe.vae_scale_factor, pipe.default_size
        shape = (1, pipe.unet.config.in_channels, side // f, side // f)  # (1, C, h, w)
        latents = interpolated_noise(shape, args.seed_a, args.seed_b, weights)  # (N, C, h, w)
        cond_a, uncond = pipe.encode_prompt([args.prompt_a])  # (1, L, D) each
        cond_b = cond_a if args.prompt_b is None else pipe.encode_prompt([args.prompt_b])[0]
        embeds = interpolated_embeddings(cond_a, cond_b, weights)  # (N, L, D)
        sampling = GenerationRequest(
            guidance_scale=args.guidance_scale, num_inference_steps=args.steps, sampler=args.sampler,
            karras_sigmas=args.karras_sigmas, negative_prompt_embeds=uncond, seed=args.seed_a,
        )  # fmt: skip
        frames = []
        for start in range(0, args.frames, args.batch_size):
            batch = slice(start, start + args.batch_size)
            frames += pipe.generate(replace(sampling, prompt_embeds=embeds[batch], latents=latents[batch])).images
    except (OSError, ValueError) as err:
        raise CommandError(str(err)) from err

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = max(1, MIN_TILE // min(frames[0].size))  # as generate's grid: small samples as whole-pixel tiles
    paths = [out / "strip.png", out / "interpolation.gif", out / "interpolation.webp"]
    image_grid(frames, rows=1, scale=scale).save(paths[0])
    for path in paths[1:]:
        write_animation(ping_pong(frames), path, args.fps, scale)
    for path in paths:
        print(path)
    return 0


def frame_weights(frames: int) -> list[float]:
    """w_k = k / (N - 1) for the N = `frames` frames: 0 at the first (all A), 1 at the last (all B)."""
    if frames < 2:
        raise ValueError(f"frames: must be >= 2 (the two ends), got {frames}")
    return [k / (frames - 1) for k in range(frames)]


def ping_pong(frames: Sequence[T]) -> list[T]:
    """The frames there and back without repeating either end, so a looping animation has no jump:
    f_0 .. f_{N-1}, f_{N-2} .. f_1 (2N - 2 frames for N >= 2)."""
    return [*frames, *frames[-2:0:-1]]


def interpolated_noise(shape: tuple[int, ...], seed_a: int, seed_b: int, weights: Sequence[float]) -> Tensor:
    """x_T of every frame, (N, C, h, w): slerp between the N(0, I) draws of `seed_a` and `seed_b` (each of
    `shape`, drawn on the CPU as `ldm generate --seed` draws x_T), at each of `weights`."""
    import torch

    from ldm.diffusion import slerp

    a, b = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in (seed_a, seed_b))
    return torch.cat([slerp(a, b, w) for w in weights])


def interpolated_embeddings(cond_a: Tensor, cond_b: Tensor, weights: Sequence[float]) -> Tensor:
    """The text embedding of every frame, (N, L, D): (1 - w) c_a + w c_b for each w of `weights`, with c_a and
    c_b (1, L, D)."""
    import torch

    return torch.cat([torch.lerp(cond_a, cond_b, w) for w in weights])
