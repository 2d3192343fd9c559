"""LoRA against full fine-tuning of the U-Net: trainable parameters, training-state memory, peak memory, step time.

Both fine-tune the quickstart's model with configs/finetune_shapes_new.yaml (LoRA: `--set unet.lora.rank=R`),
the same data, batch and steps, from a latent cache built once and shared. Each run is a fresh subprocess (its
peak resident memory, VmHWM, is its own); the two modes alternate, their order rotated every round, so drift
hits both alike. The step time is the median over the steps after `--warmup` (the first build oneDNN kernels).

Training state is what the optimizer side holds per trainable parameter, counted from the tensors: float32
gradients, AdamW's two moments and the EMA. The frozen weights and activations are the same in both modes.

    PYTHONPATH=. python3 benchmarks/lora_vs_full.py --steps 40 --repeats 3   (about 10 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "finetune_shapes_new.yaml"
QUIET = ["train.log_with=none", "train.sample_every=100000", "train.checkpoint_every=100000", "train.log_every=1"]


def overrides(mode: str, rank: int, steps: int, cache: Path) -> list[str]:
    common = [f"train.steps={steps}", f"train.cache_dir={cache}", "train.warmup_steps=1", *QUIET]
    return common + ([f"unet.lora.rank={rank}", "train.lr=1e-3"] if mode == "lora" else [])


def worker(mode: str, rank: int, steps: int, warmup: int, cache: Path) -> dict[str, float]:
    """One fine-tune in this process; its step times, parameter counts and memory."""
    import torch

    from ldm.config import load_config
    from ldm.evaluation.machine import peak_resident_mb
    from ldm.training import DiffusionExperimentConfig, train_diffusion
    from ldm.training.runtime import TrainLoop

    torch.set_num_threads(2)
    cfg = load_config(DiffusionExperimentConfig, CONFIG, overrides(mode, rank, steps, cache))
    times: list[float] = []
    original = TrainLoop.run_step

    def timed_step(self: TrainLoop) -> bool:
        began = time.perf_counter()
        done = original(self)
        times.append(time.perf_counter() - began)
        return done

    TrainLoop.run_step = timed_step  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as out:
        metrics = train_diffusion(cfg, out)
    trainable = metrics["trainable_parameters"]
    ema = 1 if cfg.train.ema_decay > 0 else 0
    return {
        "mode": mode,
        "trainable_parameters": trainable,
        "unet_parameters": metrics["unet_parameters"],
        "training_state_mb": trainable * 4 * (3 + ema) / 2**20,  # gradient, 2 AdamW moments, EMA; float32
        "peak_resident_mb": peak_resident_mb(),
        "step_seconds": statistics.median(times[warmup:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "finetune_bench" / "cache")
    parser.add_argument("--worker", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.rank, args.steps, args.warmup, args.cache)))
        return
    runs: dict[str, list[dict[str, float]]] = {"full": [], "lora": []}
    for round_ in range(args.repeats):
        for mode in ("full", "lora") if round_ % 2 == 0 else ("lora", "full"):
            command = [sys.executable, __file__, "--worker", mode, "--steps", str(args.steps)]
            command += ["--warmup", str(args.warmup), "--rank", str(args.rank), "--cache", str(args.cache)]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            runs[mode].append(json.loads(line.removeprefix("RESULT ")))
            print(mode, runs[mode][-1], flush=True)
    print(f"\n{args.steps} steps of batch 64; median step after the first {args.warmup}; {args.repeats} runs each")
    print("(min / median / max over runs; the ratio pairs the runs of one round)")
    print("| mode | trainable parameters | training state (MB) | peak resident (MB) | s / step | step time vs full |")
    print("| --- | --- | --- | --- | --- | --- |")
    full_steps = [r["step_seconds"] for r in runs["full"]]
    for mode, rows in runs.items():
        steps = [r["step_seconds"] for r in rows]
        rss = [r["peak_resident_mb"] for r in rows]
        ratios = sorted(s / f for s, f in zip(steps, full_steps, strict=True))  # paired by round
        print(
            f"| {mode} | {rows[0]['trainable_parameters']:,} of {rows[0]['unet_parameters']:,} "
            f"| {rows[0]['training_state_mb']:.1f} | {min(rss):.0f} / {statistics.median(rss):.0f} / {max(rss):.0f} "
            f"| {min(steps):.3f} / {statistics.median(steps):.3f} / {max(steps):.3f} "
            f"| {ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f} |"
        )


if __name__ == "__main__":
    main()
