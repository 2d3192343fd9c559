"""The `ldm` command line: one subcommand per module in `ldm.commands`.

Each command module (imported by name in `build_parser`) exposes `register(subparsers)`, which adds its
parser and sets `func` to the function that runs it. Heavy imports (torch, diffusers) happen inside those
functions, so `ldm --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

# Modules under ldm.commands, in the order `ldm --help` lists them.
COMMAND_MODULES: tuple[str, ...] = ("quickstart", "train", "precompute", "generate", "evaluate", "toy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm",
        description="Latent diffusion: train the autoencoder and the text-conditioned diffusion model, and sample.",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Imported by name, never from a computed string: the command set is fixed code, not input.
    from ldm.commands import evaluate, generate, precompute, quickstart, toy, train

    modules = {
        "quickstart": quickstart,
        "train": train,
        "precompute": precompute,
        "generate": generate,
        "evaluate": evaluate,
        "toy": toy,
    }
    for name in COMMAND_MODULES:
        modules[name].register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    from ldm.commands import CommandError
    from ldm.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, CommandError) as err:  # bad input the user can fix: one line, no traceback
        parser.exit(2, f"ldm {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
