"""Stage-2 training throughput and memory: our trainer vs the loop diffusers' text-to-image example runs.

The reference does, every step, what `examples/text_to_image/train_text_to_image.py` does: VAE encode +
latent sample, text encode, add noise, U-Net forward/backward, grad clip, AdamW, EMA. Ours runs
`ldm.training.train_diffusion` with the latent + text cache (the default for a fixed dataset) and with the
cache off. All variants train the same U-Net (the CPU quickstart's), VAE and frozen text encoder on the
same shapes data, batch 64, fp32, plain eps MSE; each runs in its own subprocess so its peak resident
memory is its own. Images/s counts the timed steps only; the cache build is reported beside it.

Every table also gives the U-Net training step's achieved FLOP/s (forward + backward FLOPs per image,
counted once with torch's FlopCounterMode, times images/s) and, on a GPU whose peak is known (or given
with --peak-tflops), the model FLOPs utilization MFU = achieved / peak. A CPU has no peak we can state
honestly, so there the MFU column says so.

    PYTHONPATH=. python benchmarks/train_throughput.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("reference", "ours_cached", "ours_uncached", "ours_compiled")
LABELS = {
    "reference": "reference loop (diffusers example: encode every step)",
    "ours_cached": "ours: train_diffusion, latent + text cache",
    "ours_uncached": "ours: train_diffusion, cache off",
    "ours_compiled": "ours: cache + train.compile (images/s include the compilation)",
}


def experiment(vae_dir: Path, steps: int, cached: bool, compiled: bool = False):
    """The quickstart's stage-2 config with a frozen text encoder and the plain eps objective."""
    from ldm.training import DiffusionExperimentConfig

    cfg = DiffusionExperimentConfig(autoencoder=str(vae_dir))
    cfg.text_encoder.frozen = True
    cfg.text_encoder.p_uncond = 0.0  # the example has no caption dropout
    cfg.loss.min_snr_gamma = None
    cfg.train.steps = steps
    cfg.train.warmup_steps = 0
    cfg.train.cache_latents = cached
    cfg.train.compile = compiled
    cfg.train.sample_every = cfg.train.checkpoint_every = 10**9  # only the final checkpoint and grid
    cfg.validation.prompts = cfg.validation.prompts[:1]
    cfg.validation.images_per_prompt = 1
    cfg.validation.num_inference_steps = 2
    return cfg


def write_random_vae(folder: Path) -> Path:
    """The quickstart's autoencoder architecture with random weights (speed does not depend on them)."""
    from autoencoder.config import ModelConfig
    from autoencoder.model import build_vae

    torch.manual_seed(0)
    build_vae(ModelConfig()).save_pretrained(folder, safe_serialization=True)
    return folder


def run_ours(vae_dir: Path, steps: int, cached: bool, compiled: bool, workdir: Path) -> dict[str, float]:
    from ldm.training import train_diffusion

    metrics = train_diffusion(experiment(vae_dir, steps, cached, compiled), workdir / "run")
    return {"images_per_second": metrics["images_per_second"], "cache_seconds": metrics["cache_seconds"]}


# Dense peak TFLOP/s by GPU name fragment: bf16 / fp16 tensor cores, and TF32 for fp32 (PyTorch runs fp32
# convolutions in TF32 by default). From the vendors' data sheets (SXM parts; PCIe parts are lower: use --peak-tflops).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp32": 494.7},
    "H100": {"bf16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.1, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp32": 35.0},
}


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


def unet_training_flops_per_image(vae_dir: Path, batch: int = 4) -> float:
    """FLOPs of one U-Net forward + backward per image at the benchmark's settings (counted on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.training.diffusion_stage import load_vae

    cfg = experiment(vae_dir, steps=1, cached=True)
    vae = load_vae(cfg.autoencoder)
    unet = benchmark_unet(cfg, vae)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size)
    context = torch.randn(batch, cfg.text_encoder.max_length, cfg.text_encoder.hidden_size)
    with FlopCounterMode(display=False) as counter:
        unet(latents, torch.randint(0, 1000, (batch,)), context).sample.square().mean().backward()
    return counter.get_total_flops() / batch


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


def bench_device() -> torch.device:
    """The GPU when there is one (as Accelerate chooses for our trainer), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_reference(vae_dir: Path, steps: int) -> dict[str, float]:
    """train_text_to_image.py's step, on our data pipeline's images and captions."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from conditioning import TextEncoder
    from ldm.data import build_dataset, collate_examples
    from ldm.training.diffusion_stage import load_vae

    cfg = experiment(vae_dir, steps, cached=False)
    torch.manual_seed(cfg.train.seed)
    device = bench_device()  # where Accelerate puts our trainer
    vae = load_vae(cfg.autoencoder).to(device).eval().requires_grad_(False)
    text_encoder = TextEncoder.from_config(cfg.text_encoder).to(device)  # frozen, eval
    unet = benchmark_unet(cfg, vae).to(device).train()
    scheduler = DDPMScheduler.from_config(cfg.noise.to_scheduler_config())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay)
    loader = DataLoader(
        build_dataset(cfg.data, "train"), batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate_examples
    )
    batches = iter(loader)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device)
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            input_ids = text_encoder.tokenize(batch["captions"]).input_ids.to(device)
            encoder_hidden_states = text_encoder.model(input_ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images_per_second": steps * cfg.train.batch_size / seconds, "cache_seconds": 0.0}


def worker(variant: str, vae_dir: Path, steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        if variant == "reference":
            result = run_reference(vae_dir, steps)
        else:
            result = run_ours(vae_dir, steps, variant != "ours_uncached", variant == "ours_compiled", Path(folder))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--compile", action="store_true", help="also time train.compile (slow to compile on a CPU)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak, for the MFU (known GPUs: a table)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--vae", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.vae, args.steps, args.threads)
        return

    from ldm.evaluation.machine import describe_machine

    torch.set_num_threads(args.threads)
    variants = [v for v in VARIANTS if args.compile or v != "ours_compiled"]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        vae_dir = write_random_vae(Path(folder) / "vae")
        flops_per_image = unet_training_flops_per_image(vae_dir)
        for variant in variants:
            command = [sys.executable, __file__, "--worker", variant, "--vae", str(vae_dir)]
            command += ["--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant] = json.loads(lines[-1][len("RESULT ") :])

    device = bench_device()
    peak = peak_flops(device, "no", args.peak_tflops)
    reference = results["reference"]["images_per_second"]
    print(f"machine: {describe_machine(device)}")
    print(f"{args.steps} steps per variant, batch 64, fp32, shapes 32x32 -> latents 4x8x8, frozen text encoder")
    print(f"U-Net forward + backward: {flops_per_image / 1e9:.2f} GFLOP per image (torch FlopCounterMode)\n")
    columns = ["variant", "images/s", "vs reference", "U-Net TFLOP/s", "MFU", "cache build (s)", "peak RSS (MB)"]
    print("| " + " | ".join([*columns, "peak GPU (MB)"]) + " |")
    print("|" + " --- |" * (len(columns) + 1))
    for variant in variants:
        r = results[variant]
        ratio = r["images_per_second"] / reference
        achieved = r["images_per_second"] * flops_per_image
        mfu = f"{achieved / peak:.1%}" if peak else "n/a (no known peak)"
        gpu = f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else "-"
        print(
            f"| {LABELS[variant]} | {r['images_per_second']:.1f} | {ratio:.2f}x | {achieved / 1e12:.3f} | {mfu} | "
            f"{r['cache_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {gpu} |"
        )


if __name__ == "__main__":
    main()
