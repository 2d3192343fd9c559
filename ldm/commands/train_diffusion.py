"""`ldm train-diffusion`: stage 2, the text-conditioned latent diffusion U-Net, from a YAML config."""

from __future__ import annotations

import argparse

DEFAULT_OUTPUT_DIR = "runs/diffusion"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train-diffusion` to the `ldm` command line."""
    parser = subparsers.add_parser(
        "train-diffusion",
        help="train the latent diffusion U-Net (stage 2) and export a diffusers pipeline folder",
        description="Train the text-conditioned U-Net on a trained autoencoder's latents; writes OUTPUT_DIR/"
        "{config.yaml, cache/, checkpoints/, samples/, logs/, metrics.json, pipeline/}. Without --config, the "
        "CPU quickstart defaults (shapes at 32x32 on runs/autoencoder/vae).",
    )
    add = parser.add_argument
    from ldm.commands import add_config_arguments

    add_config_arguments(parser, default_config=None)
    add("--resume", default=None, metavar="latest|PATH", help="continue from a checkpoint")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ldm.commands import report_stop
    from ldm.config import load_config
    from ldm.training import DiffusionExperimentConfig, train_diffusion

    cfg = load_config(DiffusionExperimentConfig, args.config, args.overrides)
    output_dir = args.output_dir or DEFAULT_OUTPUT_DIR
    report_stop(train_diffusion(cfg, output_dir, resume=args.resume), args, output_dir)
    return 0
