"""The `ldm` command line: one subcommand per module in `ldm.commands`.

Each command module (imported by name in `build_parser`) exposes `register(subparsers)`, which adds its
parser and sets `func` to the function that runs it. Heavy imports (torch, diffusers) happen inside those
functions, so `ldm --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

# Modules under ldm.commands, in the order `ldm --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "quickstart",
    "train",
    "distill",
    "precompute",
    "generate",
    "invert",
    "interpolate",
    "evaluate",
    "serve",
    "toy",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm",
        description="Latent diffusion: train the autoencoder and the text-conditioned diffusion model, and sample.",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Imported by name, never from a computed string: the command set is fixed code, not input.
    from ldm.commands import (
        distill,
        evaluate,
        generate,
        interpolate,
        invert,
        precompute,
        quickstart,
        serve,
        toy,
        train,
    )

    modules = {
        "quickstart": quickstart,
        "train": train,
        "distill": distill,
        "precompute": precompute,
        "generate": generate,
        "invert": invert,
        "interpolate": interpolate,
        "evaluate": evaluate,
        "serve": serve,
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
        code = int(args.func(args) or 0)
    except (ConfigError, CommandError) as err:  # bad input the user can fix: one line, no traceback
        parser.exit(2, f"ldm {args.command}: error: {err}\n")
    if launched_rank():
        leave_without_teardown(code)
    return code


def launched_rank() -> bool:
    """Whether this process is one rank of a multi-process launch (`accelerate launch`, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def leave_without_teardown(code: int) -> None:
    """End a launched rank whose command has finished (outputs written, process group destroyed) without the
    interpreter's teardown. Under 2-process gloo launches a rank was seen to abort in that teardown, after its
    work was done ("terminate called without an active exception", SIGABRT, no Python frame left; rarely,
    in CI and in repeated cluster tests), and the launcher then fails the whole job. Nothing is left to clean up
    that the operating system does not: the streams and log handlers are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
