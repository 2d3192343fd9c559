"""Peak memory of one stage-2 training process against the size of its caches.

Writes a latent cache and a text-embedding cache of N items each (SD-1.x text shape: 77 x 768 fp16, 118 KB
an item; random values, made with the fingerprints the trainer checks, so it reuses them instead of
encoding N images), then trains `--steps` steps reading them, in a fresh process per N, and prints its
peak resident memory (VmHWM). Run from the repository root:

    PYTHONPATH=. python benchmarks/cache_memory.py --sizes 10000 100000 --folder /tmp/cache-bench

The 100k text cache is 11.8 GB on disk; the folder is kept for reruns (pass --clean to delete it after).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ldm.evaluation.machine import peak_resident_mb

TEXT_SHAPE = (77, 768)
PART_SIZE = 4096


def experiment(folder: Path, size: int, steps: int):
    """The stage-2 config of the run: a tiny f=2 VAE and U-Net, a 1-layer frozen 768-wide CLIP, N shapes."""
    from conditioning import TextEncoderConfig
    from ldm.data import DataConfig
    from ldm.training import DiffusionExperimentConfig
    from ldm.training.diffusion_config import DiffusionTrainConfig, UNetConfig, ValidationConfig

    return DiffusionExperimentConfig(
        autoencoder=str(folder / "vae"),
        data=DataConfig(resolution=16, num_samples=size, heldout_samples=8),
        text_encoder=TextEncoderConfig(hidden_size=768, num_layers=1, num_heads=12, intermediate_size=256),
        unet=UNetConfig(block_out_channels=(32, 32), cross_attention=(True, True), attention_head_dim=16),
        train=DiffusionTrainConfig(
            steps=steps, batch_size=32, log_every=50, sample_every=10**9, checkpoint_every=10**9, num_threads=2
        ),
        validation=ValidationConfig(prompts=["caption 1"], images_per_prompt=1, num_inference_steps=2),
    )


def write_caches(folder: Path, size: int) -> Path:
    """The run folder with valid caches of `size` items (random rows), built once."""
    from diffusers import AutoencoderKL

    from conditioning import TextEncoder
    from conditioning.cache import CACHE_FORMAT as TEXT_FORMAT
    from conditioning.cache import _digest
    from conditioning.fingerprint import weights_fingerprint
    from conditioning.sharded_cache import build_sharded, num_parts_for, read_manifest
    from ldm.training.diffusion_stage import load_vae
    from ldm.training.latent_cache import CACHE_FORMAT as LATENT_FORMAT

    if not (folder / "vae").is_dir():
        torch.manual_seed(0)
        vae = AutoencoderKL(
            block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
            sample_size=16,
        )  # fmt: skip
        vae.save_pretrained(folder / "vae", safe_serialization=True)
    cfg = experiment(folder, size, 1)
    run = folder / f"run-{size}"
    captions = [f"caption {i}" for i in range(size)]
    latent_fp = weights_fingerprint(load_vae(cfg.autoencoder), {"data": asdict(cfg.data), "size": size})
    if (read_manifest(run / "cache" / "latents", LATENT_FORMAT) or {}).get("fingerprint") != latent_fp:
        parts = num_parts_for(size, PART_SIZE)

        def latent_part(p: int):
            rows = captions[p * PART_SIZE : (p + 1) * PART_SIZE]
            return {"moments": torch.randn(len(rows), 8, 8, 8) * 0.1}, rows

        build_sharded(run / "cache" / "latents", LATENT_FORMAT, latent_fp, parts, latent_part, desc="latents")
    encoder = TextEncoder.from_config(cfg.text_encoder)
    unique = ["", *captions]
    text_fp = encoder.fingerprint()
    if (read_manifest(run / "cache" / "captions", TEXT_FORMAT) or {}).get("fingerprint") != text_fp:
        parts, content = num_parts_for(len(unique), PART_SIZE), _digest(unique, torch.float16)

        def text_part(p: int):
            rows = unique[p * PART_SIZE : (p + 1) * PART_SIZE]
            hidden = torch.randn(len(rows), *TEXT_SHAPE, dtype=torch.float16)
            return {"hidden_states": hidden, "pooled": hidden[:, 0].clone()}, rows

        build_sharded(run / "cache" / "captions", TEXT_FORMAT, text_fp, parts, text_part, content, desc="captions")
    return run


def child(folder: Path, size: int, steps: int) -> None:
    """One training process: train, then print its peak RSS as JSON."""
    from ldm.training import train_diffusion

    start = time.perf_counter()
    metrics = train_diffusion(experiment(folder, size, steps), folder / f"run-{size}")
    peak_mb = peak_resident_mb()
    seconds = time.perf_counter() - start
    report = {"peak_rss_mb": peak_mb, "seconds": seconds, "cache_seconds": metrics["cache_seconds"]}
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=300, help="training steps of batch 32 per measurement")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/ldm-cache-bench"))
    parser.add_argument("--clean", action="store_true", help="delete the caches afterwards")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.folder, args.child, args.steps)
        return

    rows = []
    for size in args.sizes:
        run = write_caches(args.folder, size)
        for stale in ("checkpoints", "pipeline", "samples", "logs"):
            shutil.rmtree(run / stale, ignore_errors=True)  # every measurement trains from step 0
        disk_gb = sum(p.stat().st_size for p in (run / "cache").rglob("*.safetensors")) / 1e9
        command = [
            sys.executable,
            __file__,
            "--child",
            str(size),
            "--steps",
            str(args.steps),
            "--folder",
            str(args.folder),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        report = json.loads(out.strip().splitlines()[-1])
        rows.append((size, disk_gb, report))
    base = rows[0][2]["peak_rss_mb"]
    header = (
        f"{'cached items':>12} | {'caches on disk':>14} | {'items read':>10} | {'cache open':>10} | {'peak RSS':>10}"
    )
    print(f"\n{header} | vs first")
    print(f"{'-' * 12}-+-{'-' * 14}-+-{'-' * 10}-+-{'-' * 10}-+-{'-' * 10}-+-{'-' * 8}")
    for size, disk_gb, report in rows:
        read, ratio = args.steps * 32, report["peak_rss_mb"] / base
        opened = f"{report['cache_seconds']:.1f} s"  # a rebuild would take minutes: the caches were reused
        print(
            f"{size:>12,} | {disk_gb:>11.2f} GB | {read:>10,} | {opened:>10} | {report['peak_rss_mb']:>7.0f} MB | "
            f"{ratio:>7.3f}x"
        )
    print(f"\ntorch {torch.__version__}, one process, num_workers 0 (the reads happen in the training process)")
    if args.clean:
        shutil.rmtree(args.folder)


if __name__ == "__main__":
    main()
