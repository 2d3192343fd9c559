"""Where stage-2 training time goes, for the variants of `benchmarks/train_throughput.py`.

`--profile VARIANT` runs one variant in this process and, after the warm-up, profiles a few steps (CPU
activities): the per-step time of each phase (data, encoding, U-Net forward, backward, clip, optimizer, EMA)
and the top ops by self CPU time. `--components` times each suspected cause of a difference between our
trainer and the reference loop alone (min / median / max over repeats).

    PYTHONPATH=. python benchmarks/train_profile.py --profile reference --profile-steps 10
    PYTHONPATH=. python benchmarks/train_profile.py --components
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling is importable
import train_throughput as throughput
from train_throughput import (
    VARIANTS,
    benchmark_unet,
    experiment,
    run_ours,
    run_reference,
    write_random_vae,
)


def label_phases() -> None:
    """Wrap the methods both loops call (and our trainer's steps) in profiler labels, for `--profile` only."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel

    from ldm.training.batches import LatentBatches
    from ldm.training.ema import EMA
    from ldm.training.training_state import DataStream

    def labelled(method: Callable, label: str) -> Callable:
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(label):
                return method(*args, **kwargs)

        return wrapper

    for owner, method, label in [
        (DataStream, "__next__", "data"),
        (LatentBatches, "__call__", "latents + conditioning"),
        (Accelerator, "backward", "backward"),
        (Accelerator, "clip_grad_norm_", "clip_grad_norm_"),
        (EMA, "update", "ema"),
        (EMAModel, "step", "ema"),
        (AutoencoderKL, "encode", "vae encode"),
        (CLIPTextModel, "forward", "text encoder forward"),
        (UNet2DConditionModel, "forward", "unet forward"),
    ]:
        setattr(owner, method, labelled(getattr(owner, method), label))


PHASES = ("step", "data", "latents + conditioning", "vae encode", "text encoder forward", "unet forward")
PHASES += ("backward", "clip_grad_norm_", "ema")


def profile(name: str, vae_dir: Path, warmup: int, steps: int, threads: int, rows: int) -> None:
    """Profile `steps` steps of variant `name` after `warmup` steps: time per phase and the top ops."""
    from torch.profiler import ProfilerActivity, record_function

    throughput.PROFILING = True
    torch.set_num_threads(threads)
    label_phases()
    variant, profiler, done = VARIANTS[name], torch.profiler.profile(activities=[ProfilerActivity.CPU]), []

    def after_step() -> None:
        done.append(1)
        if len(done) == warmup:
            profiler.start()
        elif len(done) == warmup + steps:
            profiler.stop()

    with tempfile.TemporaryDirectory() as folder:
        if variant.baseline is None:
            run_reference(variant, vae_dir, warmup + steps, after_step, phase=record_function)
        else:
            run_ours(variant, vae_dir, warmup + steps, after_step, Path(folder))
    events = profiler.key_averages()
    print(f"{variant.label}: {steps} steps profiled after {warmup}, {torch.get_num_threads()} threads\n")
    print("| phase | ms per step (CPU total, nested phases included) | calls per step |\n| --- | --- | --- |")
    phases = [e for e in events if e.key in PHASES or e.key.startswith(("Optimizer.step#", "Optimizer.zero_grad#"))]
    for e in sorted(phases, key=lambda e: -e.cpu_time_total):
        print(f"| {e.key} | {e.cpu_time_total / 1e3 / steps:.1f} | {e.count / steps:g} |")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def adamw_kind(optimizer: torch.optim.Optimizer) -> str:
    """The implementation `optimizer.step` runs, as torch decides it (its defaults depend on the device)."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    group = optimizer.param_groups[0]
    if group["fused"]:
        return "fused"
    foreach = group["foreach"]
    if foreach is None:
        foreach = _default_to_fused_or_foreach(group["params"], differentiable=False, use_fused=False)[1]
    return "foreach" if foreach else "for-loop"


def components(vae_dir: Path, repeats: int, threads: int) -> None:
    """Time each suspected cause of a difference alone, for both loops: min / median / max ms over repeats."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel
    from torch.utils.data import DataLoader

    from conditioning import TextEncoder
    from ldm.data import build_dataset, collate_examples
    from ldm.training.diffusion_stage import load_vae
    from ldm.training.distributed import prepare_loader
    from ldm.training.ema import EMA
    from ldm.training.faults import NonFiniteGuard
    from ldm.training.loaders import make_loader
    from ldm.training.training_state import DataStream

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = experiment(vae_dir, 1, VARIANTS["reference"])
    vae = load_vae(cfg.autoencoder).eval().requires_grad_(False)
    unet = benchmark_unet(cfg, vae).train()
    frozen = TextEncoder.from_config(cfg.text_encoder)
    trainable = TextEncoder.from_config(experiment(vae_dir, 1, VARIANTS["reference_te"]).text_encoder)
    accelerator = Accelerator()
    print(f"{repeats} timed calls each after 3 untimed, {torch.get_num_threads()} threads\n")
    print("| component | ms min / median / max |\n| --- | --- |")

    def measure(label: str, call: Callable[[], object], setup: Callable[[], object] = lambda: None) -> None:
        times = []
        for i in range(repeats + 3):
            setup()
            start = time.perf_counter()
            call()
            if i >= 3:
                times.append((time.perf_counter() - start) * 1e3)
        print(f"| {label} | {min(times):.2f} / {statistics.median(times):.2f} / {max(times):.2f} |", flush=True)

    params = {"U-Net": list(unet.parameters())}
    params["U-Net + text encoder"] = params["U-Net"] + [p for p in trainable.parameters() if p.requires_grad]
    grads = {id(p): torch.randn_like(p) * 1e-3 for p in params["U-Net + text encoder"]}

    def fill(ps: list[torch.nn.Parameter]) -> Callable[[], None]:
        def setup() -> None:
            for p in ps:
                p.grad = grads[id(p)].clone()

        return setup

    for what, ps in params.items():
        n = f"{len(ps)} tensors, {sum(p.numel() for p in ps) / 1e6:.2f}M"
        for kind, options in [("defaults (reference)", {}), ("fused=True (ours)", {"fused": True})]:
            optimizer = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, **options)
            measure(f"AdamW.step, {what} ({n}), {kind}: {adamw_kind(optimizer)}", optimizer.step, fill(ps))
        optimizer = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, foreach=True)
        measure(f"AdamW.step, {what}, foreach=True (the default on CUDA, not here)", optimizer.step, fill(ps))

    ps = params["U-Net"]
    default, fused = torch.optim.AdamW(ps, lr=1e-4), torch.optim.AdamW(ps, lr=1e-4, fused=True)
    guard = NonFiniteGuard(10)

    def reference_update() -> None:
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        default.step()
        default.zero_grad(set_to_none=True)

    def our_update() -> None:
        guard.apply(accelerator, "unet", fused, ps, 1.0)
        guard.end_step()

    measure("reference update: clip_grad_norm_ + AdamW (for-loop) + zero_grad, U-Net", reference_update, fill(ps))
    measure("ours: NonFiniteGuard.apply (clip + finite check + fused AdamW + zero_grad), U-Net", our_update, fill(ps))
    measure("clip_grad_norm_ alone, U-Net (both)", lambda: torch.nn.utils.clip_grad_norm_(ps, 1.0), fill(ps))

    theirs, ours, flag = EMAModel(unet.parameters(), decay=0.999), EMA(unet, 0.999), torch.tensor(True)
    measure("EMA: diffusers EMAModel.step (the example's foreach=False: a Python loop)", lambda: theirs.step(ps))
    measure("EMA: ours, EMA.update with a device flag (torch._foreach_lerp_)", lambda: ours.update(unet, flag))

    reference_batches = iter(
        DataLoader(build_dataset(cfg.data, "train"), batch_size=64, shuffle=True, collate_fn=collate_examples)
    )
    our_batches = DataStream(prepare_loader(accelerator, make_loader(build_dataset(cfg.data, "train"), cfg.train)))
    measure("data, reference: DataLoader batch of 64, first epoch (renders)", lambda: next(reference_batches))
    measure("data, ours: DataStream over the prepared loader, first epoch (renders)", lambda: next(our_batches))

    batch = next(reference_batches)
    pixels, captions = batch["pixel_values"], batch["captions"]

    def encode_pixels(context: Callable) -> Callable[[], object]:
        def call() -> object:
            with context():
                return vae.encode(pixels).latent_dist.sample()

        return call

    measure("VAE encode + sample, batch 64, torch.no_grad (both)", encode_pixels(torch.no_grad))
    measure("VAE encode + sample, batch 64, torch.inference_mode", encode_pixels(torch.inference_mode))
    measure("frozen text encode, 64 captions (tokenize + CLIP forward, no_grad; both)", lambda: frozen.encode(captions))

    size = unet.config.sample_size
    latents = torch.randn(64, unet.config.in_channels, size, size)
    context = torch.randn(64, cfg.text_encoder.max_length, cfg.text_encoder.hidden_size)

    def unet_step() -> None:
        unet(latents, torch.randint(0, 1000, (64,)), context).sample.square().mean().backward()

    measure("U-Net forward + backward, batch 64 (both; for scale)", unet_step, lambda: unet.zero_grad())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=VARIANTS, help="profile this variant's steps")
    parser.add_argument("--warmup", type=int, default=5, help="unprofiled first steps")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps profiled after the warm-up")
    parser.add_argument("--rows", type=int, default=25, help="ops listed by --profile")
    parser.add_argument("--components", action="store_true", help="time the suspected causes alone")
    parser.add_argument("--component-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    if not (args.profile or args.components):
        parser.error("choose --profile VARIANT or --components")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        vae_dir = write_random_vae(Path(folder) / "vae")
        if args.profile:
            profile(args.profile, vae_dir, args.warmup, args.profile_steps, args.threads, args.rows)
        else:
            components(vae_dir, args.component_repeats, args.threads)


if __name__ == "__main__":
    main()
