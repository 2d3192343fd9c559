"""Cost of conditioning a batch of prompts: running the default small text encoder vs looking up the cache.

Prints a table of ms per batch (median over repeats) for tokenizing only, encoding (tokenize + encoder
forward, what training pays every step without a cache) and a cache lookup (what it pays with one),
and the machine it ran on. Run from the repository root:

    PYTHONPATH=. python benchmarks/encode_prompts.py --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from conditioning import TextEmbeddingCache, TextEncoder, TextEncoderConfig
from ldm.evaluation.machine import describe_machine

SUBJECTS = ["a cat", "two dogs", "an old man", "a red bicycle", "a lighthouse", "a bowl of ramen", "a fox", "a robot"]
SCENES = ["on a beach at sunset", "in a snowy forest", "on a busy street, rainy night", "in a sunlit kitchen"]
STYLES = ["photo, 35mm", "watercolor painting"]


def prompts(n: int) -> list[str]:
    """n distinct captions of typical length (10-20 tokens)."""
    combos = itertools.product(SUBJECTS, SCENES, STYLES)
    return [f"{subject} {scene}, {style}" for subject, scene, style in itertools.islice(combos, n)]


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    """Build the default encoder and its cache, time both, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="prompts per batch")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of the encoder (the cache runs 10x more)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = TextEncoderConfig()
    encoder = TextEncoder.from_config(config)
    batch = prompts(args.batch)
    with tempfile.TemporaryDirectory() as folder:
        cache = TextEmbeddingCache.build(encoder, batch, Path(folder) / "captions")

    with torch.no_grad():
        tokenize_ms = median_ms(lambda: encoder.tokenize(batch), args.repeats)
        encode_ms = median_ms(lambda: encoder.encode(batch), args.repeats)
        cached_ms = median_ms(lambda: cache.encode(batch), args.repeats * 10)

    params = sum(p.numel() for p in encoder.parameters())
    print(f"machine: {describe_machine()}")
    print(f"transformers {transformers.__version__}, load average {os.getloadavg()[0]:.2f}")
    print(
        f"encoder: CLIPTextModel hidden {config.hidden_size}, {config.num_layers} layers, {config.num_heads} heads, "
        f"{params / 1e6:.1f} M parameters; {args.batch} prompts x {config.max_length} tokens\n"
    )
    print(f"| {'path':<36} | {'ms / ' + str(args.batch) + ' prompts':>18} |")
    print(f"| {'-' * 36} | {'-' * 18} |")
    print(f"| {'tokenize only':<36} | {tokenize_ms:>18.2f} |")
    print(f"| {'uncached: tokenize + encoder forward':<36} | {encode_ms:>18.2f} |")
    print(f"| {'cached: TextEmbeddingCache lookup':<36} | {cached_ms:>18.3f} |")
    print(f"\nuncached / cached = {encode_ms / cached_ms:.0f}x (same run)")


if __name__ == "__main__":
    main()
