"""`ldm evaluate`: the autoencoder's metrics, prompt fidelity with guidance and step sweeps, and the bound."""

from __future__ import annotations

import argparse

from ldm.commands import add_device_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `evaluate` to the `ldm` command line."""
    parser = subparsers.add_parser(
        "evaluate",
        help="measure a model folder: autoencoder metrics, prompt fidelity sweeps, variational bound",
        description="Writes OUT/metrics.json (every number with its settings), OUT/report.md (the tables), "
        "OUT/fidelity_vs_guidance.png, OUT/fidelity_vs_steps.png and OUT/samples.png. Prompt fidelity is read "
        "by an attribute probe trained on rendered shapes (saved in OUT/probe/ and reused).",
    )
    add = parser.add_argument
    add("--model", required=True, metavar="DIR", help="model folder (diffusers SD pipeline folder)")
    add("--output-dir", default=None, metavar="OUT", help="default: DIR/../evaluation")
    add("--num-prompts", type=int, default=96, help="held-out captions per sweep setting (default: 96)")
    add("--bound-latents", type=int, default=64, help="held-out latents for the bound (default: 64)")
    add("--seed", type=int, default=0)
    add("--clip-model", default=None, metavar="PATH", help="local CLIPModel folder: adds the CLIP score")
    add("--inception-weights", default=None, metavar="PATH", help="torch-fidelity Inception weights: adds FID/rFID")
    add_device_argument(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ldm.commands import CommandError, resolve_device
    from ldm.evaluation import EvaluationConfig, evaluate_model
    from ldm.model_folder import check_model_folder

    model, device = Path(args.model), resolve_device(args.device)
    try:  # before any work: a missing component would otherwise surface deep inside the evaluation
        check_model_folder(model)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(f"--model: {err}") from err
    try:
        cfg = EvaluationConfig(
            num_prompts=args.num_prompts,
            bound_latents=args.bound_latents,
            seed=args.seed,
            clip_model=args.clip_model,
            inception_weights=args.inception_weights,
        )
    except ValueError as err:
        raise CommandError(str(err)) from err
    out = Path(args.output_dir) if args.output_dir else model.parent / "evaluation"
    evaluate_model(model, out, cfg, device=device)
    for name in ("metrics.json", "report.md", "fidelity_vs_guidance.png", "fidelity_vs_steps.png", "samples.png"):
        print(out / name)
    return 0
