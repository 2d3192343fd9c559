"""`ldm train-autoencoder` and `ldm train-diffusion`: one stage from a YAML config, on the training runtime.

Each command is parse -> load the config (file + --set) -> call the stage's training function.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass

from ldm.commands import add_config_arguments, report_stop


@dataclass(frozen=True)
class TrainingCommand:
    """A training subcommand: its name, which stage it trains, and what `ldm --help` says of it."""

    name: str
    stage: str  # "autoencoder" or "diffusion"
    help: str
    description: str
    default_output_dir: str


COMMANDS = (
    TrainingCommand(
        "train-autoencoder",
        "autoencoder",
        help="train the KL autoencoder (stage 1) and export it as a diffusers VAE folder",
        description="Train the KL autoencoder; writes OUTPUT_DIR/{config.yaml, checkpoints/, samples/, logs/, "
        "metrics.json, vae/}. Without --config, the CPU quickstart defaults (shapes at 32x32, f=4).",
        default_output_dir="runs/autoencoder",
    ),
    TrainingCommand(
        "train-diffusion",
        "diffusion",
        help="train the latent diffusion U-Net (stage 2) and export a diffusers pipeline folder",
        description="Train the text-conditioned U-Net on a trained autoencoder's latents; writes OUTPUT_DIR/"
        "{config.yaml, cache/, checkpoints/, samples/, logs/, metrics.json, pipeline/}. Without --config, the "
        "CPU quickstart defaults (shapes at 32x32 on runs/autoencoder/vae).",
        default_output_dir="runs/diffusion",
    ),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train-autoencoder` and `train-diffusion` to the `ldm` command line."""
    for command in COMMANDS:
        parser = subparsers.add_parser(command.name, help=command.help, description=command.description)
        add_config_arguments(parser, default_config=None)
        parser.add_argument("--resume", default=None, metavar="latest|PATH", help="continue from a checkpoint")
        parser.set_defaults(func=functools.partial(_run, command))


def _run(command: TrainingCommand, args: argparse.Namespace) -> int:
    from ldm.config import load_config
    from ldm.training import AutoencoderExperimentConfig, DiffusionExperimentConfig, train_autoencoder, train_diffusion

    stages = {
        "autoencoder": (AutoencoderExperimentConfig, train_autoencoder),
        "diffusion": (DiffusionExperimentConfig, train_diffusion),
    }
    config_class, train = stages[command.stage]
    cfg = load_config(config_class, args.config, args.overrides)
    output_dir = args.output_dir or command.default_output_dir
    report_stop(train(cfg, output_dir, resume=args.resume), args, output_dir)
    return 0
