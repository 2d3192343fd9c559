"""`ldm evaluate`: a model folder measured on the built-in shapes data (the autoencoder's metrics, prompt fidelity
with guidance and step sweeps, the bound; a distilled model beside its --teacher) or, with --data CONFIG, on the
held-out split of the user's own data."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.commands import add_device_argument, add_model_arguments

DEFAULT_NUM_PROMPTS = 96
DEFAULT_NUM_SAMPLES = 1000
SHAPES_OUTPUTS = ("metrics.json", "report.md", "fidelity_vs_guidance.png", "fidelity_vs_steps.png", "samples.png")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `evaluate` to the `ldm` command line."""
    parser = subparsers.add_parser(
        "evaluate",
        help="measure a model folder: autoencoder metrics, prompt fidelity sweeps, variational bound, FID / KID",
        description="Without --data: writes OUT/metrics.json (every number with its settings), OUT/report.md "
        "(the tables), OUT/fidelity_vs_guidance.png, OUT/fidelity_vs_steps.png and OUT/samples.png, on the "
        "built-in shapes data; prompt fidelity is read by an attribute probe trained on rendered shapes (saved "
        "in OUT/probe/ and reused). With --data CONFIG (a training config, e.g. the config.yaml a run writes, or "
        "its data section): the held-out split of that data (data.heldout_path) - autoencoder PSNR / SSIM, the "
        "bound, FID / KID and the CLIP score of images drawn for the held-out captions (with --inception-weights "
        "/ --clip-model) and OUT/heldout_grid.png (real images beside generations), at data.resolution with the "
        "folder's default sampling settings. A distilled --model (its U-Net takes the guidance scale) is swept "
        "with sampler lcm at 1, 2, 4 and 8 steps, and its bound is not applicable; --teacher adds the teacher's "
        "rows beside it.",
    )
    add = parser.add_argument
    add_model_arguments(parser)
    add("--data", default=None, metavar="CONFIG", help="evaluate on the held-out split of this data config (YAML)")
    add("--output-dir", default=None, metavar="OUT", help="default: DIR/../evaluation (with --data: evaluation-data)")
    add(
        "--num-prompts", type=int, default=None,
        help=f"without --data: held-out captions per sweep setting (default: {DEFAULT_NUM_PROMPTS})",
    )  # fmt: skip
    add(
        "--num-samples", type=int, default=None,
        help=f"with --data: held-out images measured, and captions drawn for (default: {DEFAULT_NUM_SAMPLES})",
    )  # fmt: skip
    add(
        "--teacher", default=None, metavar="DIR",
        help="with a distilled --model, without --data: the model folder it was distilled from; adds the "
        "teacher's DDIM 50 and DPM-Solver++(2M) 15 rows on the same prompts, probe and guidance scale, with "
        "U-Net evaluations and seconds per image from this run",
    )  # fmt: skip
    add("--bound-latents", type=int, default=64, help="held-out latents for the bound (default: 64)")
    add("--seed", type=int, default=0)
    add("--clip-model", default=None, metavar="PATH", help="local CLIPModel folder: adds the CLIP score")
    add(
        "--inception-weights", default=None, metavar="PATH",
        help="torch-fidelity Inception weights: adds FID / rFID (and KID with --data)",
    )  # fmt: skip
    add_device_argument(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ldm.commands import CommandError, resolve_device
    from ldm.generation.model_folder import check_model_folder

    model, device = Path(args.model), resolve_device(args.device)
    try:  # before any work: a missing component would otherwise surface deep inside the evaluation
        check_model_folder(model)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(f"--model: {err}") from err
    if args.teacher is not None:
        _check_teacher(args, model)
    if args.data is None:
        if args.num_samples is not None:
            raise CommandError("--num-samples: only with --data (without it, --num-prompts sets the sweeps' size)")
        return _evaluate_shapes(args, model, device)
    if args.num_prompts is not None:
        raise CommandError("--num-prompts: only without --data (with it, --num-samples sets the number of images)")
    return _evaluate_data(args, model, device)


def _check_teacher(args: argparse.Namespace, model: Path) -> None:
    """CommandError naming --teacher unless it is a complete, undistilled folder beside a distilled --model, on
    the shapes report."""
    from ldm.commands import CommandError
    from ldm.evaluation.distilled import teacher_problem
    from ldm.generation.model_folder import check_model_folder

    if args.data is not None:
        raise CommandError("--teacher: only without --data (the comparison is read on the shapes data's probe)")
    try:
        check_model_folder(args.teacher)
        problem = teacher_problem(model, args.teacher)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(f"--teacher: {err}") from err
    if problem is not None:
        raise CommandError(f"--teacher: {problem}")


def _evaluate_shapes(args: argparse.Namespace, model: Path, device: str) -> int:
    """The built-in shapes report: `ldm.evaluation.evaluate_model`."""
    from ldm.commands import CommandError
    from ldm.evaluation import EvaluationConfig, evaluate_model

    try:
        cfg = EvaluationConfig(
            num_prompts=DEFAULT_NUM_PROMPTS if args.num_prompts is None else args.num_prompts,
            bound_latents=args.bound_latents,
            seed=args.seed,
            clip_model=args.clip_model,
            inception_weights=args.inception_weights,
            variant=args.variant,
            teacher=args.teacher,
        )
    except ValueError as err:
        raise CommandError(str(err)) from err
    out = Path(args.output_dir) if args.output_dir else model.parent / "evaluation"
    evaluate_model(model, out, cfg, device=device)
    for name in SHAPES_OUTPUTS:
        print(out / name)
    return 0


def _evaluate_data(args: argparse.Namespace, model: Path, device: str) -> int:
    """The own-data report: `ldm.evaluation.evaluate_on_data` on the held-out split --data names. Every input
    is checked (config, held-out split, model folder, image size) before the evaluation starts."""
    from ldm.commands import CommandError
    from ldm.config import ConfigError
    from ldm.evaluation import DataEvaluationConfig, evaluate_on_data, open_heldout
    from ldm.evaluation.heldout import check_resolution
    from ldm.generation import LatentDiffusionPipeline

    num_samples = DEFAULT_NUM_SAMPLES if args.num_samples is None else args.num_samples
    for flag, value in (("--num-samples", num_samples), ("--bound-latents", args.bound_latents)):
        if value < 1:
            raise CommandError(f"{flag}: must be >= 1, got {value}")
    cfg = DataEvaluationConfig(
        num_samples=num_samples,
        bound_latents=args.bound_latents,
        seed=args.seed,
        variant=args.variant,
        clip_model=args.clip_model,
        inception_weights=args.inception_weights,
    )
    try:
        heldout = open_heldout(args.data)
    except (ConfigError, ValueError, FileNotFoundError) as err:  # each message names the file and the key
        raise CommandError(f"--data: {err}") from err
    try:  # a bad folder or variant is the user's to fix: one line, no traceback
        pipeline = LatentDiffusionPipeline.from_pretrained(model, device=device, variant=args.variant)
    except (OSError, ValueError) as err:
        raise CommandError(str(err)) from err
    try:
        check_resolution(heldout.config.resolution, pipeline.size_multiple, heldout.source)
    except ValueError as err:
        raise CommandError(f"--data: {err}") from err
    out = Path(args.output_dir) if args.output_dir else model.parent / "evaluation-data"
    evaluate_on_data(pipeline, heldout, out, cfg, model=str(model))
    for name in ("metrics.json", "report.md", "heldout_grid.png", "heldout_grid_captions.txt"):
        print(out / name)
    return 0
