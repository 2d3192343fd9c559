"""`ldm invert`: an image to the x_T that regenerates it (deterministic DDIM inversion), saved as safetensors."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.commands import add_device_argument, add_model_arguments

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 1.0  # inversion is exact only without guidance: DDIM's ODE is the conditional model's


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `invert` to the `ldm` command line."""
    parser = subparsers.add_parser(
        "invert",
        help="find the x_T from which DDIM regenerates an image (for editing with `ldm generate --latents`)",
        description="Encode IMAGE with the VAE and run DDIM (eta 0) backwards from it to x_T; writes OUT with the "
        "tensor 'latents' (1, C, h, w) and prints its path. `ldm generate PROMPT --latents OUT --sampler ddim "
        "--eta 0` with the same --steps and --guidance-scale draws the image again.",
    )
    parser.add_argument("image", metavar="IMAGE", help="the image to invert (its size must suit the model)")
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the text the image is conditioned on")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps (default: {DEFAULT_STEPS})")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"w during inversion; 1 = no guidance, the only exact choice (default: {DEFAULT_GUIDANCE:g})",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the latents (.safetensors)")
    add_device_argument(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from ldm.commands import CommandError, open_image, resolve_device
    from ldm.generation import LatentDiffusionPipeline

    image = open_image(args.image, "IMAGE", "RGB")
    device = resolve_device(args.device)
    try:  # a bad folder, prompt, step count or image size is the user's to fix: one line, no traceback
        pipe = LatentDiffusionPipeline.from_pretrained(args.model, device=device, variant=args.variant)
        x_T = pipe.invert(image, args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    except (OSError, ValueError) as err:
        raise CommandError(str(err)) from err
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": x_T.float().cpu().contiguous()}, out)  # (1, C, h, w)
    print(out)
    return 0
