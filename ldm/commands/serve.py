"""`ldm serve`: the web page and HTTP API for one model folder, on this machine (see `ldm.serve.app`)."""

from __future__ import annotations

import argparse
import socket

from ldm.commands import add_device_argument, add_dtype_argument, add_model_arguments

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LIMIT_FLAGS = ("max_queue", "max_batch", "max_images", "max_steps", "max_side", "max_body_mb")


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
        help=f"address to listen on (default: {DEFAULT_HOST}, this machine only; 0.0.0.0 opens it to the network, "
        "with no authentication)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)"
    )
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
    limits.add_argument("--max-body-mb", type=float, default=8.0, metavar="MB", help="request body size (default: 8)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    limits = limit_values(args)
    listener = bind(args.host, args.port)  # before the slow imports and loading, so a busy port fails at once
    import logging

    import uvicorn

    from ldm.commands import CommandError, resolve_device, torch_dtype
    from ldm.commands.generate import apply_lora
    from ldm.generation import LatentDiffusionPipeline
    from ldm.serve import ServeLimits, create_app

    try:
        pipe = LatentDiffusionPipeline.from_pretrained(
            args.model, torch_dtype=torch_dtype(args.dtype), device=resolve_device(args.device), variant=args.variant
        )
        if args.lora is not None:
            apply_lora(pipe, args.lora, args.lora_scale)
    except (OSError, ValueError, CommandError) as err:  # a missing or corrupt component, an adapter that does not fit
        listener.close()
        raise CommandError(str(err)) from err
    app = create_app(pipe, ServeLimits(**limits), folder=args.model)
    host, port = listener.getsockname()[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning("listening on %s: anyone who can reach it can generate", args.host)
    print(f"ldm serve: {args.model} at http://{'localhost' if host == '127.0.0.1' else host}:{port}/", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[listener])
    return 0


def limit_values(args: argparse.Namespace) -> dict[str, int | None]:
    """The --max-* flags as ServeLimits' fields; CommandError naming a flag that is not positive."""
    from ldm.commands import CommandError

    for name in LIMIT_FLAGS:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CommandError(f"--{name.replace('_', '-')}: must be positive, got {value}")
    counts = {name: getattr(args, name) for name in LIMIT_FLAGS if name != "max_body_mb"}
    return counts | {"max_body_bytes": int(args.max_body_mb * 2**20)}


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
