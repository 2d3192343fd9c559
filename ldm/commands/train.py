"""`ldm train-autoencoder`: stage 1, the KL autoencoder, from a YAML config and a data source."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoencoder.config import AutoencoderConfig
from ldm.commands import add_config_arguments, report_stop
from ldm.data import DataConfig

DEFAULT_OUTPUT_DIR = "runs/autoencoder"


@dataclass
class AutoencoderExperimentConfig(AutoencoderConfig):
    """A whole stage-1 run: the autoencoder's model / loss / train sections plus the `data:` section."""

    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        # Checked when the config is read: the decoder of an f-times downsampling VAE returns sides that are
        # multiples of f, so any other resolution would only fail at the first loss, after start-up.
        levels = len(self.model.block_out_channels)
        factor, where = self.model.downsampling_factor, f"model.block_out_channels has {levels} levels"
        if self.model.pretrained is not None:  # then the folder's own config decides (None: a hub id)
            from ldm.model_folder import vae_downsampling_factor

            factor, where = vae_downsampling_factor(self.model.pretrained), f"model.pretrained {self.model.pretrained}"
        if factor is not None and self.data.resolution % factor:
            raise ValueError(
                f"data.resolution: {self.data.resolution} is not a multiple of the autoencoder's downsampling "
                f"factor f={factor} ({where}); use a multiple of {factor}"
            )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train-autoencoder` to the `ldm` command line."""
    parser = subparsers.add_parser(
        "train-autoencoder",
        help="train the KL autoencoder (stage 1) and export it as a diffusers VAE folder",
        description="Train the KL autoencoder; writes OUTPUT_DIR/{config.yaml, checkpoints/, samples/, logs/, "
        "metrics.json, vae/}. Without --config, the CPU quickstart defaults (shapes at 32x32, f=4).",
    )
    add_config_arguments(parser, default_config=None)
    parser.add_argument("--resume", default=None, metavar="latest|PATH", help="continue from a checkpoint")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ldm.config import load_config

    cfg = load_config(AutoencoderExperimentConfig, args.config, args.overrides)
    output_dir = args.output_dir or DEFAULT_OUTPUT_DIR
    report_stop(run_autoencoder_training(cfg, output_dir, resume=args.resume), args, output_dir)
    return 0


def run_autoencoder_training(
    cfg: AutoencoderExperimentConfig, output_dir: str | Path, resume: str | None = None
) -> dict[str, Any]:
    """Build the train / held-out loaders from `cfg.data`, record the config, train; returns the metrics."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from autoencoder import train_autoencoder
    from ldm.config import save_config
    from ldm.data import build_dataset, collate_examples

    torch.manual_seed(cfg.train.seed)  # the training loader's shuffle order
    train_set, heldout_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "heldout")
    shuffle = not isinstance(train_set, IterableDataset)  # streams shuffle themselves
    # A stream's workers must copy it anew each epoch to see its set_epoch (its shard order); see DataStream.
    persistent = cfg.train.num_workers > 0 and shuffle
    loader_args = {"batch_size": cfg.train.batch_size, "num_workers": cfg.train.num_workers}
    loader_args |= {"collate_fn": collate_examples, "persistent_workers": persistent}
    train_loader = DataLoader(train_set, shuffle=shuffle, drop_last=shuffle, **loader_args)
    heldout_loader = DataLoader(heldout_set, shuffle=False, **loader_args)
    # Recorded up front (first process only), so even an interrupted run says what it ran with.
    if int(os.environ.get("RANK", "0")) == 0:
        save_config(cfg, Path(output_dir) / "config.yaml")
    return train_autoencoder(cfg, train_loader, heldout_loader, output_dir, resume=resume)
