"""`ldm generate`: text to images with a model folder; writes one PNG per image, a grid and optional strips."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm.commands import add_device_argument, add_dtype_argument, add_model_arguments, add_sampler_arguments

if TYPE_CHECKING:  # heavy imports stay inside the functions, so `ldm --help` is instant
    from PIL.Image import Image
    from torch import Tensor

    from ldm.diffusion.thresholding import Threshold
    from ldm.generation import GenerationRequest, LatentDiffusionPipeline

DEFAULT_OUT = "outputs/generate"
STRIP_COLUMNS = 10  # denoising-strip frames, x_T .. x_0 evenly spaced
MIN_TILE = 64  # grid and strip tiles smaller than this are enlarged by whole-pixel repetition
# The options of our samplers (with their argparse destinations), which a diffusers --scheduler does not have.
OUR_SAMPLER_FLAGS = {
    "--sampler": "sampler",
    "--karras": "karras_sigmas",
    "--eta": "eta",
    "--static-threshold": "static_threshold",
    "--dynamic-threshold": "dynamic_threshold",
    "--resample": "resample",
    "--trajectory": "trajectory",
}
# The request fields whose flag has another name; the rest are --field-with-dashes.
FLAGS = {
    "num_inference_steps": "--steps",
    "num_images_per_prompt": "--num-images",
    "karras_sigmas": "--karras",
    "image": "--init-image",
    "mask_image": "--mask",
    "paste_unmasked": "--no-paste",
    "return_trajectory": "--trajectory",
    "prompt": "PROMPT",
} | {name: "--" + name.replace("_", "-") for name in (
    "negative_prompt", "guidance_scale", "guidance_rescale", "sampler", "eta", "scheduler", "height", "width",
    "seed", "latents", "prompt_embeds", "strength", "resample")}  # fmt: skip
# Named when --scheduler is given no scheduler class and nothing close to its name.
SCHEDULER_EXAMPLES = (
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerDiscreteScheduler",
    "UniPCMultistepScheduler",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `generate` to the `ldm` command line."""
    parser = subparsers.add_parser(
        "generate",
        help="generate images from text prompts with a trained model folder",
        description="Sample images for each prompt with classifier-free guidance. Writes OUT/NNN-<prompt>.png per "
        "image, OUT/grid.png (one row per prompt) and, with --trajectory, OUT/trajectory-PP-<prompt>.png; "
        "prints the paths. Unset sampling options fall back to the folder's ldm_sampling.json. With --init-image "
        "it turns an image into another (img2img), with --mask too it repaints the mask's white region.",
    )
    parser.add_argument(
        "prompts", nargs="*", metavar="PROMPT", help="text prompt(s); with --prompt-embeds they only name the files"
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--lora",
        default=None,
        metavar="PATH",
        help="apply this U-Net LoRA adapter: pytorch_lora_weights.safetensors (diffusers' format) or its folder",
    )
    parser.add_argument(
        "--lora-scale", type=float, default=None, metavar="S", help="with --lora: its strength (default: 1)"
    )
    parser.add_argument("--negative-prompt", default=None, help="guide away from this text instead of ''")
    add_sampler_arguments(parser)
    parser.add_argument("--eta", type=float, default=None, help="DDIM noise, 0 = deterministic (default: folder's)")
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="NAME",
        help="sample with this diffusers scheduler class instead of our samplers, built from the folder's "
        "scheduler config (e.g. UniPCMultistepScheduler); not with --sampler, --karras or --eta",
    )
    parser.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        metavar="PHI",
        help="rescale the guided prediction's std towards the conditional one's (Lin et al. 2023), in [0, 1] "
        "(default: 0, off)",
    )
    thresholds = parser.add_mutually_exclusive_group()
    thresholds.add_argument(
        "--static-threshold", type=float, default=None, metavar="LIMIT", help="clamp the predicted x_0 to +-LIMIT"
    )
    thresholds.add_argument(
        "--dynamic-threshold",
        type=float,
        default=None,
        metavar="PERCENTILE",
        help="Imagen's dynamic thresholding of the predicted x_0 at this percentile of |x_0|, in (0, 1]",
    )
    parser.add_argument(
        "--threshold-max",
        type=float,
        default=None,
        metavar="VALUE",
        help="with --dynamic-threshold: the largest threshold (default: no limit)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt (default: 1)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's size, or the image's)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the model's size, or the image's)")
    parser.add_argument(
        "--latents",
        default=None,
        metavar="FILE",
        help="start from this x_T: a .safetensors file with a (B, C, h, w) tensor 'latents', B = prompts x "
        "--num-images (e.g. written by `ldm invert`)",
    )
    parser.add_argument(
        "--prompt-embeds",
        default=None,
        metavar="FILE",
        help="condition on these text embeddings instead of PROMPTs: a .safetensors file with 'prompt_embeds' "
        "(P, L, D) and optionally 'negative_prompt_embeds'",
    )
    parser.add_argument("--init-image", default=None, metavar="PATH", help="img2img: start from this image")
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        metavar="S",
        help="with --init-image: how much of the chain to run, in (0, 1] (default: 0.8, or 1 with --mask)",
    )
    parser.add_argument(
        "--mask", default=None, metavar="PATH", help="with --init-image: repaint where this image is white"
    )
    parser.add_argument(
        "--resample",
        type=int,
        default=None,
        metavar="N",
        help="with --mask: RePaint's resampling passes per step (default: 1, none)",
    )
    parser.add_argument(
        "--no-paste",
        dest="paste_unmasked",
        action="store_false",
        help="with --mask: keep the decoder's pixels outside the mask instead of the input image's",
    )
    add_device_argument(parser)
    add_dtype_argument(parser)
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--trajectory", action="store_true", help="also write the x_T -> x_0 strip per prompt")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ldm.commands import CommandError, resolve_device, torch_dtype
    from ldm.generation import LatentDiffusionPipeline

    check_options(args)
    scheduler_class = diffusers_scheduler(args.scheduler) if args.scheduler is not None else None
    # The input files are read before the model loads, so a mistyped path fails at once.
    request = generation_request(args, scheduler_class)
    prompts = prompt_names(args.prompts, request.prompt_embeds, args.prompt_embeds)
    device = resolve_device(args.device)
    try:  # a bad folder is the user's to fix: one line, no traceback
        pipe = LatentDiffusionPipeline.from_pretrained(
            args.model, torch_dtype=torch_dtype(args.dtype), device=device, variant=args.variant
        )
    except (OSError, ValueError) as err:  # a missing or corrupt component
        raise CommandError(str(err)) from err
    if args.lora is not None:
        apply_lora(pipe, args.lora, 1.0 if args.lora_scale is None else args.lora_scale)
    for path in generate_images(pipe, request, prompts, Path(args.out)):
        print(path)
    return 0


def check_options(args: argparse.Namespace) -> None:
    """CommandError naming the flag for options that do not go together or need another (before any loading)."""
    from ldm.commands import CommandError

    if not args.prompts and args.prompt_embeds is None:
        raise CommandError("PROMPT: give at least one prompt, or --prompt-embeds FILE")
    if args.lora_scale is not None and args.lora is None:
        raise CommandError("--lora-scale: needs --lora (the adapter it scales)")
    if args.lora is not None and not Path(args.lora).exists():
        raise CommandError(f"--lora: {args.lora} does not exist")
    if args.prompt_embeds is not None and args.negative_prompt is not None:
        raise CommandError("--negative-prompt: not with --prompt-embeds; put 'negative_prompt_embeds' in its file")
    if args.scheduler is not None:
        values = {flag: getattr(args, dest) for flag, dest in OUR_SAMPLER_FLAGS.items()}
        # Unset is None, or False for --trajectory; compared by identity, as --eta 0 is set though 0 == False.
        given = [flag for flag, value in values.items() if value is not None and value is not False]
        if given:
            raise CommandError(
                f"--scheduler: replaces our samplers, so it does not go with {', '.join(given)} "
                "(a diffusers scheduler takes its settings from the folder's scheduler config)"
            )
    for flag, value in (("--mask", args.mask), ("--strength", args.strength)):
        if value is not None and args.init_image is None:
            raise CommandError(f"{flag}: needs --init-image (the image to start from)")
    if args.resample is not None and args.mask is None:
        raise CommandError("--resample: needs --mask (it resamples the repainted region)")
    if not args.paste_unmasked and args.mask is None:
        raise CommandError("--no-paste: needs --mask (it is about the pixels outside the mask)")
    if args.threshold_max is not None and args.dynamic_threshold is None:
        raise CommandError("--threshold-max: needs --dynamic-threshold (it bounds the dynamic threshold)")


def apply_lora(pipe: LatentDiffusionPipeline, path: str, scale: float) -> None:
    """Load the --lora adapter into `pipe`'s U-Net at `scale`; CommandError naming the flag when it does not fit."""
    from ldm.commands import CommandError

    try:
        pipe.load_lora_weights(path, scale=scale)
    except (OSError, ValueError, RuntimeError) as err:  # no adapter file, not safetensors, not this U-Net's layers
        raise CommandError(f"--lora: {err}") from err


def generation_request(args: argparse.Namespace, scheduler: type | None) -> GenerationRequest:
    """The request the flags ask for, with the files given to --latents, --prompt-embeds, --init-image and --mask
    read (CommandError naming the flag when one cannot be); unset flags stay None (the folder's defaults)."""
    from ldm.commands import open_image
    from ldm.generation import GenerationRequest

    files: dict[str, Any] = {}
    if args.latents is not None:
        files["latents"] = read_tensors(args.latents, "--latents", ("latents",))["latents"]
    if args.prompt_embeds is not None:
        files |= read_tensors(args.prompt_embeds, "--prompt-embeds", ("prompt_embeds",), ("negative_prompt_embeds",))
    if args.init_image is not None:
        files["image"] = open_image(args.init_image, "--init-image", "RGB")
    if args.mask is not None:
        files["mask_image"] = open_image(args.mask, "--mask", "L")
    return GenerationRequest(
        prompt=None if args.prompt_embeds is not None else args.prompts,
        negative_prompt=args.negative_prompt,
        guidance_scale=args.guidance_scale,
        guidance_rescale=args.guidance_rescale,
        num_inference_steps=args.steps,
        sampler=args.sampler,
        eta=args.eta,
        karras_sigmas=args.karras_sigmas,
        threshold=threshold_of(args),
        scheduler=scheduler,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        seed=args.seed,
        strength=args.strength,
        resample=1 if args.resample is None else args.resample,
        paste_unmasked=args.paste_unmasked,
        return_trajectory=args.trajectory,
        **files,
    )


def threshold_of(args: argparse.Namespace) -> Threshold | None:
    """The x0 clipping --static-threshold or --dynamic-threshold (with --threshold-max) asks for."""
    from ldm.commands import CommandError
    from ldm.diffusion import DynamicThreshold, StaticThreshold

    try:
        if args.static_threshold is not None:
            return StaticThreshold(args.static_threshold)
        if args.dynamic_threshold is not None:
            limit = float("inf") if args.threshold_max is None else args.threshold_max
            return DynamicThreshold(args.dynamic_threshold, limit)
    except ValueError as err:  # "limit: ..." / "percentile: ...": named here by the flag
        flag = "--static-threshold" if args.static_threshold is not None else "--dynamic-threshold"
        raise CommandError(f"{flag}: {str(err).split(': ', 1)[-1]}") from err
    return None


def read_tensors(path: str, flag: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The tensors `required` (and those of `optional` that are there) from the safetensors file `path` given
    to `flag`; CommandError naming the flag and the file when it is missing, unreadable or lacks a key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ldm.commands import CommandError

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as err:
        raise CommandError(f"{flag}: cannot read {path!r} as safetensors ({type(err).__name__}: {err})") from err
    missing = [key for key in required if key not in tensors]
    if missing:
        raise CommandError(
            f"{flag}: {path!r} has no tensor {missing[0]!r} (it holds: {', '.join(sorted(tensors)) or 'nothing'})"
        )
    return {key: tensors[key] for key in (*required, *optional) if key in tensors}


def prompt_names(prompts: list[str], prompt_embeds: Tensor | None, embeds_file: str | None) -> list[str]:
    """The prompts that name the output files: the PROMPTs, or with --prompt-embeds and no PROMPT one
    placeholder per embedded prompt (CommandError when their counts differ)."""
    from ldm.commands import CommandError

    if prompt_embeds is None:
        return prompts
    if prompt_embeds.ndim != 3:
        raise CommandError(
            f"--prompt-embeds: 'prompt_embeds' in {embeds_file!r} must be (prompts, tokens, width), "
            f"got shape {tuple(prompt_embeds.shape)}"
        )
    count = prompt_embeds.shape[0]
    if not prompts:
        return [f"prompt embeds {p}" for p in range(count)]
    if len(prompts) != count:
        raise CommandError(
            f"--prompt-embeds: {embeds_file!r} holds {count} prompts but {len(prompts)} PROMPTs name them"
        )
    return prompts


def diffusers_scheduler(name: str) -> type:
    """The diffusers scheduler class called `name`: only names diffusers exports whose object is a subclass of
    `diffusers.SchedulerMixin`, so the flag cannot reach any other class; else CommandError with valid names."""
    import difflib
    import importlib.util

    import diffusers

    from ldm.commands import CommandError

    names = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax"))
    cls = getattr(diffusers, name) if name in names else None
    if cls is not None and getattr(cls, "_backends", None) and not issubclass(cls, diffusers.SchedulerMixin):
        # diffusers exports a placeholder for a scheduler whose optional dependency is missing.
        missing = [backend for backend in cls._backends if importlib.util.find_spec(backend) is None]
        raise CommandError(f"--scheduler: {name} needs {', '.join(missing or cls._backends)}, which is not installed")
    if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin):
        return cls
    examples = difflib.get_close_matches(name, names, n=3, cutoff=0.5) or [n for n in SCHEDULER_EXAMPLES if n in names]
    raise CommandError(
        f"--scheduler: {name!r} is not a diffusers scheduler class; valid names include {', '.join(examples)} "
        f"({len(names)} in all)"
    )


def generate_images(
    pipe: LatentDiffusionPipeline, request: GenerationRequest, names: list[str], out: Path
) -> list[Path]:
    """Draw `request`, then write each image (named after `names`, one per prompt), the grid (one row per prompt)
    and, when it returns its trajectory, one strip per prompt; returns the paths written. The pipeline's
    ValueErrors (an invalid field, named by the message) become CommandErrors."""
    from ldm.commands import CommandError
    from ldm.images import evenly_spaced, image_grid

    try:
        result = pipe.generate(request)
    except ValueError as err:  # an invalid setting (named by the message) is the user's to fix
        raise CommandError(flag_message(err)) from err
    images, per_prompt = result.images, request.num_images_per_prompt
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(out / f"{i:03d}-{slug(names[i // per_prompt])}.png")
        image.save(paths[-1])
    scale = max(1, MIN_TILE // min(images[0].size))
    paths.append(out / "grid.png")
    image_grid(images, rows=len(names), scale=scale).save(paths[-1])
    if result.trajectory is not None:
        frames = evenly_spaced(result.trajectory.shape[0], STRIP_COLUMNS)
        for p, name in enumerate(names):
            rows = range(p * per_prompt, (p + 1) * per_prompt)
            tiles = [t for b in rows for t in denoising_strip(pipe, result.trajectory, result.trajectory_x0, frames, b)]
            paths.append(out / f"trajectory-{p:02d}-{slug(name)}.png")
            image_grid(tiles, rows=2 * per_prompt, scale=scale).save(paths[-1])
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


def flag_message(err: ValueError) -> str:
    """A request's error ("field: what is wrong") in the command line's words ("--flag: what is wrong")."""
    field, sep, rest = str(err).partition(": ")
    return f"{FLAGS[field]}: {rest}" if sep and field in FLAGS else str(err)


def slug(prompt: str, max_length: int = 40) -> str:
    """A file-name-safe form of a prompt: lowercase words joined by '-', at most `max_length` characters."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:max_length].rstrip("-") or "unconditional"
