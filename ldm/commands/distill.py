"""`ldm distill`: latent consistency distillation of a model folder into a student that draws in 1-8 steps.

parse -> load the config (file + --set, with --model as its `teacher`) -> `ldm.training.train_distill`.
"""

from __future__ import annotations

import argparse

from ldm.commands import add_config_arguments, report_stop

DEFAULT_OUTPUT_DIR = "runs/distill"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `distill` to the `ldm` command line."""
    parser = subparsers.add_parser(
        "distill",
        help="distil a model folder into a few-step student (latent consistency distillation, sampler lcm)",
        description="Latent consistency distillation (Luo et al. 2023) of a trained model folder: a student U-Net "
        "that takes the guidance scale as an input and draws in 1-8 steps with sampler lcm. Writes OUTPUT_DIR/"
        "{config.yaml, cache/, checkpoints/, samples/, logs/, metrics.json, pipeline/}. Without --config, the CPU "
        "recipe (the quickstart model on its shapes).",
    )
    parser.add_argument("--model", default=None, metavar="DIR", help="the teacher model folder (the config's teacher)")
    add_config_arguments(parser, default_config=None)
    parser.add_argument("--resume", default=None, metavar="latest|PATH", help="continue from a checkpoint")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ldm.config import load_config
    from ldm.training.distill_config import DistillExperimentConfig
    from ldm.training.distill_stage import train_distill

    overrides = [*args.overrides, *([f"teacher={args.model}"] if args.model else [])]
    cfg = load_config(DistillExperimentConfig, args.config, overrides)
    output_dir = args.output_dir or DEFAULT_OUTPUT_DIR
    report_stop(train_distill(cfg, output_dir, resume=args.resume), args, output_dir)
    return 0
