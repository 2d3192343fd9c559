"""`ldm precompute-latents`: a stage-2 config's training images as WebDataset shards of VAE latents.

Parse -> load the diffusion config (file + --set) -> `ldm.training.precompute.precompute_latents`. Runs
the same under `accelerate launch` (each process writes its share of the shards); run it again after an
interruption and it resumes. Train on the result with `--set data.source=latents --set data.train_path=DIR`.
"""

from __future__ import annotations

import argparse

from ldm.commands import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `precompute-latents` to the `ldm` command line."""
    parser = subparsers.add_parser(
        "precompute-latents",
        help="encode a stage-2 config's training images into WebDataset shards of latents (and caption embeddings)",
        description="Encode data.* of a diffusion config with its autoencoder (and its text encoder when frozen) "
        "into OUTPUT_DIR/latents-NNNNNN.tar + manifest.json. Then train with --set data.source=latents "
        "--set data.train_path=OUTPUT_DIR.",
    )
    add_config_arguments(parser, default_config=None)
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="images per output shard (default 1000)")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded at once (default 64)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ldm.config import load_config
    from ldm.training import DiffusionExperimentConfig
    from ldm.training.precompute import precompute_latents

    cfg = load_config(DiffusionExperimentConfig, args.config, args.overrides)
    output_dir = args.output_dir or "runs/latents"
    manifest = precompute_latents(cfg, output_dir, args.samples_per_shard, args.batch_size)
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards at {output_dir}")
    return 0
