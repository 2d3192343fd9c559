"""Subcommands of the `ldm` command line; each module has `register(subparsers)`."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # PIL and torch are imported where they are used, so `ldm --help` stays instant
    import torch
    from PIL.Image import Image


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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --variant, for commands that load a model folder."""
    parser.add_argument("--model", required=True, metavar="DIR", help="model folder (diffusers SD pipeline folder)")
    parser.add_argument(
        "--variant", default=None, metavar="NAME", help="weight files of this variant, e.g. fp16 (*.fp16.safetensors)"
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """--device, for commands that run a model."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: cuda if available)")


DTYPES = ("float32", "float16", "bfloat16")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """--dtype, for commands that run a model: the weights' and sampling's precision."""
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="load the weights in this precision (default: as stored); float16 / bfloat16 halve the memory on a GPU",
    )


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype a --dtype names (None: as stored)."""
    import torch

    return None if name is None else getattr(torch, name)


class SamplerChoices:
    """The sampler names (`ldm.diffusion.SAMPLER_NAMES`) as argparse `choices`, read only when argparse checks a
    --sampler or prints a usage: the table's module imports torch, which would make registering the option (and
    so `ldm --help`) take seconds."""

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    @staticmethod
    def _names() -> tuple[str, ...]:
        from ldm.diffusion.sampler_table import SAMPLER_NAMES

        return SAMPLER_NAMES


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling options of commands that run the pipeline: --guidance-scale, --steps, --sampler, --karras.
    Unset, each is None: the model folder's default."""
    parser.add_argument("--guidance-scale", type=float, default=None, help="w; 1 = no guidance (default: folder's)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: folder's)")
    # A metavar, so that argparse does not list the choices (importing them) when it adds the option.
    parser.add_argument(
        "--sampler", choices=SamplerChoices(), default=None, metavar="NAME", help="%(choices)s (default: folder's)"
    )
    parser.add_argument(
        "--karras",
        dest="karras_sigmas",
        action="store_const",
        const=True,
        default=None,
        help="step through Karras et al.'s noise levels (default: folder's)",
    )


def open_image(path: str, flag: str, mode: str) -> Image:
    """The image file `path` given to `flag`, converted to PIL `mode` ("RGB", "L"); CommandError naming the flag
    and the path when it is missing or not an image PIL can read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, Image.DecompressionBombError) as err:  # missing, a folder, not an image, truncated
        raise CommandError(f"{flag}: cannot read {path!r} as an image ({type(err).__name__}: {err})") from err


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
    teacher = ["--model", args.model] if getattr(args, "model", None) else []  # ldm distill's teacher
    line = ["ldm", args.command, *teacher]
    line += [*(["--config", args.config] if args.config else []), "--output-dir", output_dir]
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
