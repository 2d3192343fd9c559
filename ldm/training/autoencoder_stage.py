"""Train the KL autoencoder with Accelerate: a short loop of named steps, the details in small functions."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from autoencoder.config import AutoencoderConfig, TrainConfig
from autoencoder.discriminator import PatchDiscriminator
from autoencoder.distributed import log_rank_step, prepare_loader, reduce_mean
from autoencoder.evaluate import (
    batch_images,
    evaluate_reconstruction,
    latent_scaling_factor,
    save_reconstruction_grid,
)
from autoencoder.faults import NonFiniteGuard, StopSignal
from autoencoder.loss import AutoencoderLoss
from autoencoder.model import KLAutoencoder, build_vae
from autoencoder.perceptual import build_lpips, lpips_backbone_available
from autoencoder.posterior import DiagonalGaussian
from autoencoder.training_state import (
    DataStream,
    load_training_state,
    save_training_state,
    seed_shuffle,
    stopped_early,
)

logger = logging.getLogger(__name__)


def train_autoencoder(
    cfg: AutoencoderConfig,
    train_loader: Iterable,
    eval_loader: Iterable,
    output_dir: str | Path,
    resume: str | None = None,
    perceptual: nn.Module | None = None,
) -> dict[str, Any]:
    """Train, evaluate on held-out data, and export OUTPUT_DIR/vae/ (diffusers format, with scaling_factor).

    `train_loader` yields batches of images (B, 3, H, W) in [-1, 1] (or dicts with "pixel_values");
    `resume` is "latest" or a checkpoint folder. `perceptual` overrides the LPIPS network (tests only);
    by default it is built from the config and start-up fails if its pretrained backbone is missing.
    Returns the metrics also written to OUTPUT_DIR/metrics.json.
    """
    out, tc = Path(output_dir), cfg.train
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(tc.seed)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if perceptual is None and cfg.loss.lpips_weight > 0:
        perceptual = build_lpips(cfg.loss.lpips_net)  # fails fast, before any work, without the backbone
    model = KLAutoencoder(build_vae(cfg.model), cfg.loss.logvar_init)
    criterion = AutoencoderLoss(cfg.loss, perceptual).to(accelerator.device)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tc.adam_betas)
    seed_shuffle(train_loader, tc.seed)
    model, opt = accelerator.prepare(model, opt)
    scale_loader, train_loader = train_loader, prepare_loader(accelerator, train_loader)
    disc, opt_d = None, None
    if cfg.loss.use_discriminator:
        disc = PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers)
        opt_d = torch.optim.Adam(disc.parameters(), lr=tc.disc_lr, betas=tc.adam_betas)
        disc, opt_d = accelerator.prepare(disc, opt_d)

    accelerator.init_trackers("autoencoder")
    preview = next(iter(eval_loader))
    preview = batch_images(preview)[:8].to(accelerator.device)
    batches, guard = DataStream(train_loader), NonFiniteGuard(tc.max_nonfinite_steps)
    step = load_training_state(accelerator, out, resume, batches, guard)[0] if resume else 0  # sets the RNGs: last
    progress = tqdm(total=tc.steps, initial=step, desc="autoencoder", disable=not accelerator.is_main_process)
    start = time.perf_counter()

    with StopSignal() as signals:
        while step < tc.steps:
            batch = next(batches)
            x = batch_images(batch).to(accelerator.device)  # a stream is not placed by Accelerate (prepare_loader)
            set_learning_rate(opt, step, tc, tc.lr)
            if opt_d is not None:
                set_learning_rate(opt_d, step, tc, tc.disc_lr)
            with accelerator.accumulate(*(m for m in (model, disc) if m is not None)), accelerator.autocast():
                logs = train_step(accelerator, model, disc, criterion, opt, opt_d, x, step, guard)
            log_rank_step(accelerator, step + 1, logs, batch)
            if not accelerator.sync_gradients:
                continue  # a micro-batch of gradient accumulation; the optimizers have not stepped
            step += 1
            guard.end_step(step)  # raises after train.max_nonfinite_steps skipped updates in a row
            progress.update(1)
            progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("rec", "kl", "g_loss", "d_loss")})
            if step % tc.log_every == 0:  # every process takes part in the mean; only the main one writes it
                logged = {f"train/{k}": v for k, v in reduce_mean(accelerator, logs).items()}
                extra = {"train/lr": opt.param_groups[0]["lr"], "train/nonfinite_steps": guard.total}
                accelerator.log(logged | extra, step)
            if step % tc.sample_every == 0 and accelerator.is_main_process:
                write_samples(accelerator.unwrap_model(model), preview, out / "samples" / f"step_{step:07d}.png")
            stop = signals.requested(accelerator)
            if stop or (guard.healthy and (step % tc.checkpoint_every == 0 or step == tc.steps)):
                save_training_state(accelerator, out, step, batches, guard, tc.keep_checkpoints)
            if stop:
                progress.close()
                return stopped_early(accelerator, out, step, signals.received)
    progress.close()
    train_seconds = time.perf_counter() - start

    accelerator.wait_for_everyone()
    result: dict[str, Any] = {}
    if accelerator.is_main_process:
        # The unprepared loader: the prepared one broadcasts its shuffle seed, which would wait for the others.
        result = finish(accelerator.unwrap_model(model), eval_loader, scale_loader, cfg, out, step)
        result["train_seconds"] = round(train_seconds, 1)
        result["nonfinite_steps"] = guard.total
        (out / "metrics.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        logger.info("held-out metrics: %s", json.dumps(result))
    accelerator.end_training()
    return result


def train_step(
    accelerator: Accelerator,
    model: nn.Module,
    disc: nn.Module | None,
    criterion: AutoencoderLoss,
    opt: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer | None,
    x: Tensor,
    step: int,
    guard: NonFiniteGuard,
) -> dict[str, float]:
    """One micro-batch: the autoencoder's update, then (once the GAN is on) the discriminator's.

    Each update happens where gradients sync, and only if its loss and gradients are finite (`guard`).
    """
    raw = accelerator.unwrap_model(model)
    x_rec, moments = model(x)
    raw_disc = accelerator.unwrap_model(disc) if disc is not None else None
    terms = criterion.generator_loss(x, x_rec, DiagonalGaussian(moments), raw.logvar, step, raw_disc, raw.last_layer)
    accelerator.backward(terms.loss)
    guard.watch("autoencoder", terms.loss)
    if accelerator.sync_gradients:
        guard.apply(accelerator, "autoencoder", opt, model.parameters())
    logs = terms.logs
    if disc is not None and opt_d is not None and criterion.disc_factor(step) > 0:
        d_terms = criterion.discriminator_loss(x, x_rec, disc, step)
        accelerator.backward(d_terms.loss)
        guard.watch("discriminator", d_terms.loss)
        if accelerator.sync_gradients:
            guard.apply(accelerator, "discriminator", opt_d, disc.parameters())
        logs = logs | d_terms.logs
    return logs


def learning_rate(step: int, tc: TrainConfig, base_lr: float) -> float:
    """Linear warm-up over warmup_steps, then constant or a cosine from base_lr down to base_lr / 10."""
    if step < tc.warmup_steps:
        return base_lr * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return base_lr
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def set_learning_rate(opt: torch.optim.Optimizer, step: int, tc: TrainConfig, base_lr: float) -> None:
    """Apply `learning_rate` to every parameter group of `opt`."""
    for group in opt.param_groups:
        group["lr"] = learning_rate(step, tc, base_lr)


@torch.no_grad()
def write_samples(model: KLAutoencoder, x: Tensor, path: Path) -> None:
    """A PNG grid of held-out inputs (top) and their reconstructions from the posterior mean (bottom)."""
    x_rec = model.decode(model.encode(x).mode())
    save_reconstruction_grid(x, x_rec, path, upscale=max(1, 128 // x.shape[-1]))


def finish(
    model: KLAutoencoder,
    eval_loader: Iterable,
    scale_loader: Iterable,
    cfg: AutoencoderConfig,
    out: Path,
    step: int,
) -> dict[str, Any]:
    """Held-out metrics, the latent scaling factor, a last sample grid and the exported OUTPUT_DIR/vae/."""
    model.eval()
    device = next(model.parameters()).device
    model.float()
    # LPIPS is reported only with the pretrained network (never the one a test may have handed the loss).
    net = cfg.loss.lpips_net
    lpips_net = build_lpips(net).to(device) if lpips_backbone_available(net) else None
    metrics = evaluate_reconstruction(model, eval_loader, cfg.train.eval_samples, device, lpips_net)
    scale = latent_scaling_factor(model, scale_loader, cfg.train.scale_samples, device)
    preview = batch_images(next(iter(eval_loader)))[:8].to(device)
    write_samples(model, preview, out / "samples" / "final.png")
    model.vae.register_to_config(scaling_factor=scale)
    model.vae.save_pretrained(out / "vae", safe_serialization=True)
    return {"step": step, **metrics, "scaling_factor": scale}
