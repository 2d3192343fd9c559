"""Stage-2 training throughput and memory: our trainer vs the loop diffusers' text-to-image example runs.

The reference does, every step, what `examples/text_to_image/train_text_to_image.py` does: VAE encode +
latent sample, text encode, add noise, U-Net forward/backward, grad clip, AdamW, EMA. Ours runs
`ldm.training.train_diffusion` with the latent + text cache (the default for a fixed dataset) and with the
cache off. All variants train the same U-Net (the CPU quickstart's), VAE and frozen text encoder on the
same shapes data, batch 64, fp32, plain eps MSE; each runs in its own subprocess so its peak resident
memory is its own. Images/s counts the timed steps only; the cache build is reported beside it.

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

VARIANTS = ("reference", "ours_cached", "ours_uncached")
LABELS = {
    "reference": "reference loop (diffusers example: encode every step)",
    "ours_cached": "ours: train_diffusion, latent + text cache",
    "ours_uncached": "ours: train_diffusion, cache off",
}


def experiment(vae_dir: Path, steps: int, cached: bool):
    """The quickstart's stage-2 config with a frozen text encoder and the plain eps objective."""
    from ldm.training import DiffusionExperimentConfig

    cfg = DiffusionExperimentConfig(autoencoder=str(vae_dir))
    cfg.text_encoder.frozen = True
    cfg.text_encoder.p_uncond = 0.0  # the example has no caption dropout
    cfg.loss.min_snr_gamma = None
    cfg.train.steps = steps
    cfg.train.warmup_steps = 0
    cfg.train.cache_latents = cached
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


def run_ours(vae_dir: Path, steps: int, cached: bool, workdir: Path) -> dict[str, float]:
    from ldm.training import train_diffusion

    metrics = train_diffusion(experiment(vae_dir, steps, cached), workdir / "run")
    return {"images_per_second": metrics["images_per_second"], "cache_seconds": metrics["cache_seconds"]}


def run_reference(vae_dir: Path, steps: int) -> dict[str, float]:
    """train_text_to_image.py's step, on our data pipeline's images and captions."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from conditioning import TextEncoder
    from ldm.data import build_dataset, collate_examples
    from ldm.training.trainer import load_vae
    from ldm.unet import build_unet

    cfg = experiment(vae_dir, steps, cached=False)
    torch.manual_seed(cfg.train.seed)
    vae = load_vae(cfg.autoencoder).eval().requires_grad_(False)
    text_encoder = TextEncoder.from_config(cfg.text_encoder)  # frozen, eval
    unet = build_unet(
        cfg.unet,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        cross_attention_dim=text_encoder.hidden_size,
        sample_size=cfg.data.resolution // 2 ** (len(vae.config.block_out_channels) - 1),
    ).train()
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
            latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            input_ids = text_encoder.tokenize(batch["captions"]).input_ids
            encoder_hidden_states = text_encoder.model(input_ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
    seconds = time.perf_counter() - start
    return {"images_per_second": steps * cfg.train.batch_size / seconds, "cache_seconds": 0.0}


def worker(variant: str, vae_dir: Path, steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        if variant == "reference":
            result = run_reference(vae_dir, steps)
        else:
            result = run_ours(vae_dir, steps, variant == "ours_cached", Path(folder))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--vae", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.vae, args.steps, args.threads)
        return

    from ldm.evaluation.machine import describe_machine

    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        vae_dir = write_random_vae(Path(folder) / "vae")
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--worker", variant, "--vae", str(vae_dir)]
            command += ["--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant] = json.loads(lines[-1][len("RESULT ") :])

    reference = results["reference"]["images_per_second"]
    print(f"machine: {describe_machine()}")
    print(f"{args.steps} steps per variant, batch 64, fp32, shapes 32x32 -> latents 4x8x8, frozen text encoder\n")
    print("| variant | images/s | vs reference | cache build (s) | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for variant in VARIANTS:
        r = results[variant]
        ratio = r["images_per_second"] / reference
        print(
            f"| {LABELS[variant]} | {r['images_per_second']:.1f} | {ratio:.2f}x | "
            f"{r['cache_seconds']:.1f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
