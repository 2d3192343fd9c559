"""Stage-2 training throughput and memory: our trainer vs the loop diffusers' text-to-image example runs.

The reference does, every step, what `examples/text_to_image/train_text_to_image.py` does: VAE encode +
latent sample, text encode, add noise, U-Net forward/backward, grad clip, AdamW (torch's defaults), EMA
(diffusers' EMAModel). Its trainable-text-encoder twin extends it as diffusers' dreambooth / LoRA scripts do
with `--train_text_encoder`: the encoder in train mode, its forward with gradients, its parameters in the same
AdamW and in the grad clip; the EMA stays the U-Net's. Ours runs `ldm.training.train_diffusion` with the
latent + text cache, with the cache off, and with `text_encoder.frozen = False` (the quickstart's setting:
the latent cache still applies, the encoder runs with gradients every step). Every "ours" variant is compared
with the reference of the same text-encoder setting. All train the quickstart's U-Net, VAE (random weights)
and text encoder (its token table fixed, as in the quickstart) on the same shapes data, batch 64, fp32,
plain eps MSE, no caption dropout.

Each variant runs `--repeats` times, each run in a fresh subprocess (so its peak resident memory, VmHWM, is
its own), the variants interleaved and their order rotated every round, so slow drift hits all alike.
Images/s counts the steps after `--warmup` (the first steps build oneDNN kernels; a compiled U-Net compiles
there); the cache build is reported beside it. The table gives min / median / max images/s, the spread
(max - min) / median as the noise level, the ratio of medians to the matching reference, and the ratios of
runs paired by round (min / median / max; pairing cancels drift). `--json` keeps every run; `--table-from`
prints the table again from it. With the U-Net's FLOPs per image (forward + backward, counted once with
FlopCounterMode) it gives the achieved FLOP/s and, on a GPU whose peak is known (or --peak-tflops), the MFU.

Where the time goes is `benchmarks/train_profile.py`'s job (a profile per phase, and each suspected cause
timed alone).

    PYTHONPATH=. python benchmarks/train_throughput.py --steps 60 --repeats 5 --json runs.json  (15 min, 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from ldm.evaluation.machine import peak_resident_mb


@dataclass(frozen=True)
class Variant:
    """One configuration the table times: a reference loop (no baseline) or our trainer against one."""

    label: str
    baseline: str | None = None  # the reference it is compared with; None: it is a reference
    cached: bool = False
    trains_text_encoder: bool = False
    compiled: bool = False


VARIANTS = {
    "reference": Variant("reference: diffusers example loop, frozen text encoder"),
    "ours_cached": Variant("ours: latent + text cache, frozen text encoder", "reference", cached=True),
    "ours_uncached": Variant("ours: cache off, frozen text encoder", "reference"),
    "reference_te": Variant("reference + trainable text encoder", trains_text_encoder=True),
    "ours_te": Variant(
        "ours: latent cache, trainable text encoder (quickstart)", "reference_te", cached=True, trains_text_encoder=True
    ),
    "ours_te_uncached": Variant("ours: cache off, trainable text encoder", "reference_te", trains_text_encoder=True),
    "ours_compiled": Variant("ours: cache + train.compile", "reference", cached=True, compiled=True),
}
DEFAULT_VARIANTS = [name for name in VARIANTS if name != "ours_compiled"]


def experiment(vae_dir: Path, steps: int, variant: Variant):
    """The quickstart's stage-2 config with the plain eps objective and no caption dropout (as the example)."""
    from ldm.generation.noise_schedule import NoiseScheduleConfig
    from ldm.training import DiffusionExperimentConfig

    cfg = DiffusionExperimentConfig(autoencoder=str(vae_dir), noise=NoiseScheduleConfig())  # eps, as the example
    cfg.text_encoder.frozen = not variant.trains_text_encoder
    cfg.text_encoder.p_uncond = 0.0
    cfg.loss.min_snr_gamma = None
    cfg.train.steps = steps
    cfg.train.warmup_steps = 0
    cfg.train.cache_latents = variant.cached
    cfg.train.compile = variant.compiled
    cfg.train.sample_every = cfg.train.checkpoint_every = 10**9  # only the final checkpoint and grid
    cfg.validation.prompts = cfg.validation.prompts[:1]
    cfg.validation.images_per_prompt = 1
    cfg.validation.num_inference_steps = 2
    return cfg


def write_random_vae(folder: Path) -> Path:
    """The quickstart's autoencoder architecture with random weights (speed does not depend on them), with the
    4 latent channels the published tables were measured on."""
    from autoencoder.config import ModelConfig
    from autoencoder.model import build_vae

    torch.manual_seed(0)
    build_vae(ModelConfig(latent_channels=4)).save_pretrained(folder, safe_serialization=True)
    return folder


def bench_device() -> torch.device:
    """The GPU when there is one (as Accelerate chooses for our trainer), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def benchmark_unet(cfg, vae):
    """The U-Net `train_diffusion` builds for `cfg` on `vae` (eps prediction: as many channels out as in)."""
    from ldm.training.diffusion_stage import latent_size
    from ldm.unet import build_unet

    channels = vae.config.latent_channels
    return build_unet(
        cfg.unet,
        in_channels=channels,
        out_channels=channels,
        cross_attention_dim=cfg.text_encoder.hidden_size,
        sample_size=latent_size(cfg, vae),
    )


def no_phase(name: str) -> contextlib.AbstractContextManager:
    """No profiler label (timed runs); `--profile` passes `torch.profiler.record_function` instead."""
    return contextlib.nullcontext()


def run_ours(variant: Variant, vae_dir: Path, steps: int, after_step: Callable[[], None], workdir: Path) -> dict:
    """`train_diffusion`, calling `after_step` after each optimizer step (the step loop is otherwise untouched)."""
    from ldm.training import train_diffusion
    from ldm.training.runtime import TrainLoop

    run_step = TrainLoop.run_step

    def counted(loop: TrainLoop) -> bool:
        with torch.profiler.record_function("step") if PROFILING else contextlib.nullcontext():
            done = run_step(loop)
        if done:
            after_step()
        return done

    with mock.patch.object(TrainLoop, "run_step", counted):
        metrics = train_diffusion(experiment(vae_dir, steps, variant), workdir / "run")
    return {"cache_seconds": metrics["cache_seconds"], "trainer_images_per_second": metrics["images_per_second"]}


def run_reference(
    variant: Variant, vae_dir: Path, steps: int, after_step: Callable[[], None], phase: Callable = no_phase
) -> dict:
    """train_text_to_image.py's step on our data pipeline's images and captions; with a trainable text encoder,
    the dreambooth scripts' `--train_text_encoder` additions."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from conditioning import TextEncoder
    from ldm.data import build_dataset, collate_examples
    from ldm.training.diffusion_stage import load_vae

    cfg = experiment(vae_dir, steps, variant)
    torch.manual_seed(cfg.train.seed)
    device = bench_device()  # where Accelerate puts our trainer
    vae = load_vae(cfg.autoencoder).to(device).eval().requires_grad_(False)
    text_encoder = TextEncoder.from_config(cfg.text_encoder).to(device)  # frozen: eval; else train mode
    unet = benchmark_unet(cfg, vae).to(device).train()
    trained = [p for p in itertools.chain(unet.parameters(), text_encoder.parameters()) if p.requires_grad]
    scheduler = DDPMScheduler.from_config(cfg.noise.to_scheduler_config())
    optimizer = torch.optim.AdamW(trained, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)  # as the example
    ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay)  # the example's: foreach=False
    loader = DataLoader(
        build_dataset(cfg.data, "train"), batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate_examples
    )
    batches = iter(loader)
    for _ in range(steps):
        with phase("step"):
            with phase("data"):
                batch = next(batches)
            with phase("latents + conditioning"), torch.no_grad():
                pixels = batch["pixel_values"].to(device)
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                input_ids = text_encoder.tokenize(batch["captions"]).input_ids.to(device)
                if text_encoder.frozen:
                    encoder_hidden_states = text_encoder.model(input_ids, return_dict=False)[0]
            if not text_encoder.frozen:
                encoder_hidden_states = text_encoder.model(input_ids, return_dict=False)[0]  # with gradients
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy_latents = scheduler.add_noise(latents, noise, timesteps)
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            with phase("backward"):
                loss.backward()
            with phase("clip_grad_norm_"):
                torch.nn.utils.clip_grad_norm_(trained, cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(unet.parameters())
        after_step()
    return {"cache_seconds": 0.0}


class StepClock:
    """The time at the end of every optimizer step; images/s over the steps after the warm-up."""

    def __init__(self, steps: int, warmup: int, batch: int) -> None:
        self.steps, self.warmup, self.batch = steps, warmup, batch
        self.times: list[float] = []
        self.threads = torch.get_num_threads()

    def tick(self) -> None:
        if torch.cuda.is_available() and len(self.times) + 1 in (self.warmup, self.steps):
            torch.cuda.synchronize()  # only at the window's ends: the steps between run as they would
        self.times.append(time.perf_counter())
        self.threads = torch.get_num_threads()  # as the step ran (our trainer may set train.num_threads)

    def images_per_second(self) -> float:
        return (len(self.times) - self.warmup) * self.batch / (self.times[-1] - self.times[self.warmup - 1])


def worker(name: str, vae_dir: Path, steps: int, warmup: int, threads: int) -> None:
    """One timed run of one variant; prints its result as a RESULT json line."""
    torch.set_num_threads(threads)
    variant = VARIANTS[name]
    clock = StepClock(steps, warmup, batch=64)
    with tempfile.TemporaryDirectory() as folder:
        if variant.baseline is None:
            result = run_reference(variant, vae_dir, steps, clock.tick)
        else:
            result = run_ours(variant, vae_dir, steps, clock.tick, Path(folder))
    result |= {"images_per_second": clock.images_per_second(), "threads": clock.threads}
    result["peak_rss_mb"] = peak_resident_mb()
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


# Dense peak TFLOP/s by GPU name fragment: bf16 / fp16 tensor cores, and TF32 for fp32 (PyTorch runs fp32
# convolutions in TF32 by default). From the vendors' data sheets (SXM parts; PCIe parts are lower: use --peak-tflops).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp32": 494.7},
    "H100": {"bf16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.1, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp32": 35.0},
}


def peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    """The device's dense peak FLOP/s for `precision`: --peak-tflops, else the table for known GPUs, else None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in name:
            return peaks["fp32" if precision == "no" else "bf16"] * 1e12
    return None


def unet_training_flops_per_image(vae_dir: Path, batch: int = 4) -> float:
    """FLOPs of one U-Net forward + backward per image at the benchmark's settings (counted on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.training.diffusion_stage import load_vae

    cfg = experiment(vae_dir, 1, VARIANTS["reference"])
    unet = benchmark_unet(cfg, load_vae(cfg.autoencoder))
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size)
    context = torch.randn(batch, cfg.text_encoder.max_length, cfg.text_encoder.hidden_size)
    with FlopCounterMode(display=False) as counter:
        unet(latents, torch.randint(0, 1000, (batch,)), context).sample.square().mean().backward()
    return counter.get_total_flops() / batch


def benchmark(args: argparse.Namespace, vae_dir: Path) -> dict:
    """The interleaved repeats: {"meta": the settings and machine, "runs": {variant: [one result per round]}}."""
    from ldm.evaluation.machine import describe_machine

    names = args.variants or DEFAULT_VARIANTS + (["ours_compiled"] if args.compile else [])
    for name in list(names):  # a comparison needs its reference
        baseline = VARIANTS[name].baseline
        if baseline and baseline not in names:
            names.insert(0, baseline)
    flops_per_image = unet_training_flops_per_image(vae_dir)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    start = time.perf_counter()
    for round_ in range(args.repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            command = [sys.executable, __file__, "--worker", name, "--vae", str(vae_dir), "--steps", str(args.steps)]
            command += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(lines[-1][len("RESULT ") :]))
            speed = runs[name][-1]["images_per_second"]
            print(f"round {round_ + 1}/{args.repeats} {name}: {speed:.1f} images/s", file=sys.stderr, flush=True)
    device = bench_device()
    meta = {
        "machine": describe_machine(device),
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "flops_per_image": flops_per_image,
        "peak_flops": peak_flops(device, "no", args.peak_tflops),
        "gpu": device.type == "cuda",
    }
    return {"meta": meta, "runs": runs}


def spread(values: list[float]) -> tuple[float, float, float]:
    """min, median, max."""
    return min(values), statistics.median(values), max(values)


def print_table(meta: dict, runs: dict[str, list[dict]]) -> None:
    """The table: images/s min / median / max per variant, the spread, and the ratios to the matching reference."""
    peak, gpu = meta["peak_flops"], meta["gpu"]
    print(f"machine: {meta['machine']}")
    print(
        f"{meta['steps']} steps per run ({meta['steps'] - meta['warmup']} timed after {meta['warmup']} warm-up), "
        f"{meta['repeats']} runs per variant, each in its own process, interleaved; batch 64, fp32, shapes 32x32 -> "
        f"latents 4x8x8; {meta['minutes']} min in all"
    )
    print(f"U-Net forward + backward: {meta['flops_per_image'] / 1e9:.2f} GFLOP per image (torch FlopCounterMode)")
    print("MFU: " + ("achieved / peak, below" if peak else "n/a: no peak FLOP/s we can state honestly here") + "\n")
    columns = ["variant", "images/s min / median / max", "spread", "vs reference: ratio of medians"]
    columns += ["same-round ratios min / median / max", "U-Net TFLOP/s", *(["MFU"] if peak else [])]
    columns += ["cache build (s)", "peak RSS (MB)", "threads", *(["peak GPU (MB)"] if gpu else [])]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for name, results in runs.items():
        low, median, high = spread([r["images_per_second"] for r in results])
        baseline = VARIANTS[name].baseline
        ratio, paired = "-", "-"
        if baseline:
            reference = [r["images_per_second"] for r in runs[baseline]]
            ratio = f"{median / statistics.median(reference):.3f}x ({baseline})"
            pairs = [r["images_per_second"] / ref for r, ref in zip(results, reference, strict=True)]
            paired = " / ".join(f"{x:.3f}" for x in spread(pairs))
        achieved = median * meta["flops_per_image"]
        cells = [
            VARIANTS[name].label,
            f"{low:.1f} / {median:.1f} / {high:.1f}",
            f"{(high - low) / median:.1%}",
            ratio,
            paired,
            f"{achieved / 1e12:.3f}",
            *([f"{achieved / peak:.1%}"] if peak else []),
            f"{statistics.median(r['cache_seconds'] for r in results):.1f}",
            f"{max(r['peak_rss_mb'] for r in results):.0f}",
            "/".join(sorted({str(r["threads"]) for r in results})),
            *([f"{max(r['peak_gpu_mb'] for r in results):.0f}"] if gpu else []),
        ]
        print("| " + " | ".join(cells) + " |")
    print(
        "\nspread = (max - min) / median of a variant's runs, the noise level. Same-round ratios pair each run with "
        "its reference's run of the same round (run minutes apart), which cancels slow drift."
    )


PROFILING = False  # set by benchmarks/train_profile.py: label each step for the profiler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, each in its own process")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="a subset (default: all but ours_compiled)")
    parser.add_argument("--compile", action="store_true", help="also time train.compile (slow to compile on a CPU)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak, for the MFU (known GPUs: a table)")
    parser.add_argument("--json", type=Path, help="also write every run's result here")
    parser.add_argument("--table-from", type=Path, help="print the table of a --json file instead of running")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--vae", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup: must be at least 1 and less than --steps")
    if args.worker:
        worker(args.worker, args.vae, args.steps, args.warmup, args.threads)
        return
    if args.table_from:
        saved = json.loads(args.table_from.read_text(encoding="utf-8"))
        print_table(saved["meta"], saved["runs"])
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        vae_dir = write_random_vae(Path(folder) / "vae")
        saved = benchmark(args, vae_dir)
        if args.json:
            args.json.write_text(json.dumps(saved, indent=2), encoding="utf-8")
        print_table(saved["meta"], saved["runs"])


if __name__ == "__main__":
    main()
