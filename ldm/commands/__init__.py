"""Subcommands of the `ldm` command line; each module has `register(subparsers)`."""

import argparse


class CommandError(Exception):
    """Input the user can fix (a missing model folder, an invalid option): `ldm` prints it on one line, exit 2."""


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """The options every config-driven command shares: --config, --output-dir, --set."""
    parser.add_argument("--config", default=default_config, help=f"YAML config file (default: {default_config})")
    parser.add_argument("--output-dir", default=None, help="where the run writes its outputs")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)",
    )
