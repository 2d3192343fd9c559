"""Subcommands of the `ldm` command line; each module has `register(subparsers)`."""

import argparse
import shlex


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


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """--device, for commands that run a model."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: cuda if available)")


def resolve_device(name: str | None) -> str:
    """The --device to run on: `name` if torch knows it, else CommandError; None means cuda if available."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError as err:
        raise CommandError(f"--device: {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps): {err}") from err
    return name


def resume_command(args: argparse.Namespace, output_dir: str) -> str:
    """The `ldm` command line that continues the run `args` started from its latest checkpoint."""
    line = ["ldm", args.command, *(["--config", args.config] if args.config else []), "--output-dir", output_dir]
    for override in args.overrides:
        line += ["--set", override]
    return shlex.join([*line, "--resume", "latest"])


def report_stop(metrics: dict, args: argparse.Namespace, output_dir: str) -> None:
    """After a run stopped by a signal: say where its checkpoint is and the exact command that resumes it."""
    if metrics.get("stopped_by"):
        print(
            f"{metrics['stopped_by']}: stopped at step {metrics['step']}, checkpoint {metrics['checkpoint']}\n"
            f"resume with: {resume_command(args, output_dir)}",
            flush=True,
        )
