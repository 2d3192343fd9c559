"""`ldm serve`: the web page and HTTP API for one model folder, on this machine (see `ldm.serve.app`)."""

from __future__ import annotations

import argparse
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # ldm.serve imports FastAPI and torch: after bind(), so a busy port fails at once
    from ldm.serve.security import ServeAccess

from ldm.commands import add_device_argument, add_dtype_argument, add_model_arguments

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LIMIT_FLAGS = ("max_queue", "max_batch", "max_images", "max_steps", "max_side", "max_work", "max_body_mb", "deadline")
KEY_ENV = "LDM_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `serve` to the `ldm` command line."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a model folder as a web page and an HTTP API",
        description="Load the model once and serve the generation page at / and the JSON API at /v1 "
        "(OpenAPI description at /openapi.json). Listens on this machine only unless --host says otherwise.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--lora", default=None, metavar="PATH", help="apply this U-Net LoRA adapter (as `ldm generate --lora`)"
    )
    parser.add_argument("--lora-scale", type=float, default=1.0, metavar="S", help="with --lora: its strength")
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default: {DEFAULT_HOST}, this machine only); any other (0.0.0.0: the network) "
        "needs an API key",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)"
    )
    add_access_arguments(parser)
    add_device_argument(parser)
    add_dtype_argument(parser)
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-queue", type=int, default=32, metavar="N", help="requests waiting; more get 429")
    limits.add_argument("--max-batch", type=int, default=8, metavar="N", help="images sampled in one call")
    limits.add_argument("--max-images", type=int, default=8, metavar="N", help="images per request")
    limits.add_argument("--max-steps", type=int, default=200, metavar="N", help="sampling steps per request")
    limits.add_argument(
        "--max-side", type=int, default=None, metavar="PX", help="image height and width (default: 4x the model's)"
    )
    limits.add_argument(
        "--max-work",
        type=int,
        default=None,
        metavar="N",
        help="pixels x steps x images per request (default: a full --max-batch at the model's size and --max-steps)",
    )
    limits.add_argument("--max-body-mb", type=float, default=8.0, metavar="MB", help="request body size (default: 8)")
    limits.add_argument(
        "--deadline",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds a request may wait and run; later it is cancelled and answered 504 (default: 600)",
    )
    parser.set_defaults(func=_run)


def add_access_arguments(parser: argparse.ArgumentParser) -> None:
    """The API key and the names and origins the server accepts besides its own (see ldm.serve.security)."""
    access = parser.add_argument_group("access")
    key = access.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help=f"ask every API call for this key (the file's first line) as `Authorization: Bearer KEY`; the page "
        f"asks for it once. Also: the environment variable {KEY_ENV}",
    )
    key.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"the key itself; other users of this machine can read it in `ps`: prefer --api-key-file or {KEY_ENV}",
    )
    access.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for this Host name, e.g. myhost.lan (repeatable; IP addresses always are)",
    )
    access.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let pages of this origin post, e.g. https://studio.example, besides the server's own (repeatable)",
    )


def _run(args: argparse.Namespace) -> int:
    limits = limit_values(args)
    key = api_key(args)
    listener = bind(args.host, args.port)  # before the slow imports and loading, so a busy port fails at once
    import logging

    import uvicorn

    from ldm.commands import CommandError, resolve_device, torch_dtype
    from ldm.commands.generate import apply_lora
    from ldm.generation import LatentDiffusionPipeline
    from ldm.serve import ServeLimits, create_app
    from ldm.serve.background import GracefulServer

    try:
        access = serve_access(args.host, key, args.allow_host, args.allow_origin)
        pipe = LatentDiffusionPipeline.from_pretrained(
            args.model, torch_dtype=torch_dtype(args.dtype), device=resolve_device(args.device), variant=args.variant
        )
        if args.lora is not None:
            apply_lora(pipe, args.lora, args.lora_scale)
    except (OSError, ValueError, CommandError) as err:  # a missing or corrupt component, an adapter that does not fit
        listener.close()
        raise CommandError(str(err)) from err
    app = create_app(pipe, ServeLimits(**limits), folder=args.model, access=access)
    host, port = listener.getsockname()[:2]
    if access.api_key is not None:
        logging.getLogger(__name__).info("every API call needs the key; without TLS in front it travels in clear")
    shown = "localhost" if host == "127.0.0.1" else f"[{host}]" if ":" in host else host  # IPv6 in brackets
    print(f"ldm serve: {args.model} at http://{shown}:{port}/", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    GracefulServer(config).run(sockets=[listener])  # a stop signal first answers the open requests
    return 0


def limit_values(args: argparse.Namespace) -> dict[str, float | None]:
    """The --max-* and --deadline flags as ServeLimits' fields; CommandError naming a flag that is not positive."""
    from ldm.commands import CommandError

    for name in LIMIT_FLAGS:
        value = getattr(args, name)
        if value is not None and not (0 < value < math.inf):  # nan and inf too: a deadline of nan is none
            raise CommandError(f"--{name.replace('_', '-')}: must be positive and finite, got {value}")
    if args.max_body_mb * 2**20 < 1024:
        raise CommandError(f"--max-body-mb: must allow at least 1 kB, got {args.max_body_mb}")
    counts = {name: getattr(args, name) for name in LIMIT_FLAGS if name not in ("max_body_mb", "deadline")}
    return counts | {"max_body_bytes": int(args.max_body_mb * 2**20), "deadline_s": args.deadline}


def api_key(args: argparse.Namespace) -> str | None:
    """The key of --api-key, --api-key-file (its first line, stripped) or $LDM_API_KEY; None without any.
    CommandError naming the source when it holds no key."""
    from ldm.commands import CommandError

    if args.api_key_file is not None:
        try:
            # utf-8-sig: a byte-order mark some editors write is not part of the key
            lines = Path(args.api_key_file).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise CommandError(f"--api-key-file: cannot read {args.api_key_file} ({err})") from err
        key, source = (lines[0].strip() if lines else ""), f"--api-key-file: the first line of {args.api_key_file}"
    elif args.api_key is not None:
        key, source = args.api_key.strip(), "--api-key"
    elif KEY_ENV in os.environ:
        key, source = os.environ[KEY_ENV].strip(), KEY_ENV
    else:
        return None
    if not key:
        raise CommandError(f"{source} is empty: it must hold the API key")
    return key


def serve_access(host: str, key: str | None, allow_hosts: list[str], allow_origins: list[str]) -> ServeAccess:
    """What the server accepts; CommandError when --host reaches beyond this machine without a key, or a name
    or origin is malformed."""
    from ldm.commands import CommandError
    from ldm.serve.security import ServeAccess, is_loopback, normal_host, normal_origin

    if key is None and not is_loopback(host):
        raise CommandError(
            f"--host {host}: anyone who can reach it could generate, so it needs an API key: add --api-key-file "
            f"FILE (the key on its first line) or set {KEY_ENV} (--api-key KEY works too, but shows in `ps`)"
        )
    hosts = checked("--allow-host", allow_hosts, normal_host)
    return ServeAccess.for_bind(host, key, hosts, checked("--allow-origin", allow_origins, normal_origin))


def checked(flag: str, values: list[str], normal: Callable[[str], str]) -> tuple[str, ...]:
    """`values` of a repeatable flag, each through `normal`; CommandError naming the flag for a bad one."""
    from ldm.commands import CommandError

    try:
        return tuple(normal(value) for value in values)
    except ValueError as err:
        raise CommandError(f"{flag}: {err}") from err


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; CommandError naming --host / --port when it cannot be had."""
    from ldm.commands import CommandError

    if not 0 <= port <= 65535:
        raise CommandError(f"--port: must be in 0..65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError as err:
        raise CommandError(f"--host/--port: cannot listen on {host}:{port} ({err.strerror or err})") from err
    return listener
