"""Train the latent diffusion U-Net with Accelerate: a short loop of named steps, the details beside it."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm

from autoencoder.distributed import log_rank_step, prepare_loader
from autoencoder.faults import NonFiniteGuard, StopSignal
from autoencoder.training_state import DataStream, load_training_state, save_training_state, stopped_early
from conditioning import TextEncoder
from ldm.config import save_config
from ldm.data import build_dataset
from ldm.diffusion import GaussianDiffusion, training_losses
from ldm.images import save_image_grid
from ldm.pipeline import LatentDiffusionPipeline, SamplingDefaults
from ldm.training.batches import LatentBatches, build_train_dataset, make_loader
from ldm.training.config import DiffusionExperimentConfig, DiffusionTrainConfig, latent_grid
from ldm.training.denoiser import Denoiser
from ldm.training.ema import EMA
from ldm.unet import build_unet

logger = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"


def train_diffusion(
    cfg: DiffusionExperimentConfig,
    output_dir: str | Path,
    resume: str | None = None,
    pipeline_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train the U-Net on the frozen autoencoder's latents; returns the metrics.

    Writes OUTPUT_DIR/{config.yaml, cache/, checkpoints/, samples/, logs/, metrics.json} and the model
    folder (a diffusers Stable Diffusion folder with the EMA weights) at `pipeline_dir`, by default
    OUTPUT_DIR/pipeline.
    """
    out, tc = Path(output_dir), cfg.train
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(tc.seed, device_specific=True)  # each rank draws its own noise and timesteps
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
    device = accelerator.device

    vae = load_vae(cfg.autoencoder).to(device).eval().requires_grad_(False)
    text_encoder = TextEncoder.from_config(cfg.text_encoder).to(device)
    diffusion = cfg.noise.build()
    unet = build_unet(
        cfg.unet,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels * cfg.noise.output_channels_factor,
        cross_attention_dim=text_encoder.hidden_size,
        sample_size=latent_size(cfg, vae),
    )
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if tc.compile:
        unet.compile()  # in place: the state dict keeps its names, so checkpoints and exports are unchanged
    denoiser = Denoiser(unet, None if text_encoder.frozen else text_encoder)

    dataset = build_dataset(cfg.data, "train")
    cache_dir = Path(tc.cache_dir) if tc.cache_dir else out / "cache"
    use_cache = cacheable(cfg, dataset)
    dataset, text_cache, cache_seconds = build_train_dataset(
        dataset, vae, text_encoder, cfg.data, cache_dir if use_cache else None, device, accelerator.main_process_first
    )
    to_latents = LatentBatches(vae, text_encoder, cfg.text_encoder.p_uncond, text_cache)
    loader = make_loader(dataset, tc.batch_size, tc.num_workers, tc.seed)

    opt = torch.optim.AdamW(
        [p for p in denoiser.parameters() if p.requires_grad],
        lr=tc.lr,
        betas=tc.adam_betas,
        weight_decay=tc.weight_decay,
        fused=device.type == "cuda",  # one kernel for all parameters; the CPU keeps the foreach default
    )
    model, opt = accelerator.prepare(denoiser, opt)
    loader = prepare_loader(accelerator, loader)  # a stream splits itself across ranks and workers
    ema = EMA(denoiser, tc.ema_decay).to(device) if tc.ema_decay > 0 else None

    accelerator.init_trackers("diffusion")
    batches, guard = DataStream(loader), NonFiniteGuard(tc.max_nonfinite_steps)
    step = 0
    if resume:  # last before the loop: it sets the RNGs
        step, checkpoint = load_training_state(accelerator, out, resume, batches, guard)
        if ema is not None:
            ema.load(checkpoint / EMA_FILE)
    progress = tqdm(total=tc.steps, initial=step, desc="diffusion", disable=not accelerator.is_main_process)
    recent: list[float] = []
    start = time.perf_counter()
    first_step = step
    save_ema = _ema_saver(ema, accelerator)

    with StopSignal() as signals:  # SIGTERM / SIGINT: stop after the step, with a checkpoint
        while step < tc.steps:
            set_learning_rate(opt, learning_rate(step, tc))
            batch = next(batches)
            with accelerator.accumulate(model), accelerator.autocast():
                latents, conditioning = to_latents(batch)
                loss = diffusion_loss(diffusion, model, latents, conditioning, cfg)
                log_rank_step(accelerator, step + 1, {"loss": loss}, batch)
                accelerator.backward(loss)
                guard.watch("unet", loss)
                if accelerator.sync_gradients:  # the update: skipped if the loss or gradients are not finite
                    updated = guard.apply(accelerator, "unet", opt, model.parameters(), tc.grad_clip)
            if not accelerator.sync_gradients:
                continue  # a micro-batch of gradient accumulation; the optimizer has not stepped
            step += 1
            guard.end_step(step)  # raises after train.max_nonfinite_steps skipped updates in a row
            if ema is not None and updated:
                ema.update(denoiser)
            mean_loss = accelerator.reduce(loss.detach(), "mean").item()  # averaged over ranks
            recent = [*recent, mean_loss][-100:]
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            if step % tc.log_every == 0:
                accelerator.log({"train/loss": mean_loss, "train/lr": opt.param_groups[0]["lr"]}, step=step)
            if step % tc.sample_every == 0 and accelerator.is_main_process:
                pipeline = make_pipeline(vae, text_encoder, unet, cfg)
                write_validation_grid(pipeline, ema, denoiser, cfg, out / "samples" / f"step_{step:07d}.png")
                denoiser.train().unet.requires_grad_(True)  # the pipeline put the U-Net in inference mode
            stop = signals.requested(accelerator)
            if stop or (guard.healthy and (step % tc.checkpoint_every == 0 or step == tc.steps)):
                save_training_state(accelerator, out, step, batches, guard, tc.keep_checkpoints, save_ema)
            if stop:
                progress.close()
                return stopped_early(accelerator, out, step, signals.received)
    progress.close()
    train_seconds = time.perf_counter() - start

    accelerator.wait_for_everyone()
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        pipeline = make_pipeline(vae, text_encoder, unet, cfg)
        if ema is not None:
            ema.copy_to(denoiser)  # the exported model carries the averaged weights
        text_encoder.set_frozen(True)  # trained or not, the exported encoder is for inference
        pipeline_dir = Path(pipeline_dir) if pipeline_dir is not None else out / "pipeline"
        pipeline.save_pretrained(pipeline_dir)
        write_validation_grid(pipeline, None, denoiser, cfg, out / "samples" / "final.png")
        images = (step - first_step) * tc.batch_size * tc.grad_accum * accelerator.num_processes
        metrics = {
            "step": step,
            "steps_this_run": step - first_step,
            "lr": opt.param_groups[0]["lr"],
            "ema_updates": ema.num_updates if ema is not None else 0,
            "nonfinite_steps": guard.total,
            "loss_last_100_steps": sum(recent) / max(1, len(recent)),
            "train_seconds": round(train_seconds, 1),
            "images_per_second": round(images / train_seconds, 1) if train_seconds > 0 else None,
            "cache_seconds": round(cache_seconds, 1),
            "latent_cache": use_cache,
            "pipeline": str(pipeline_dir),
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        logger.info("stage 2 done: %s", json.dumps(metrics))
    accelerator.end_training()
    return metrics


def diffusion_loss(
    diffusion: GaussianDiffusion,
    model: Any,
    latents: torch.Tensor,
    conditioning: dict[str, Any],
    cfg: DiffusionExperimentConfig,
) -> torch.Tensor:
    """The batch mean of the configured objective at uniform t ~ U{0, T-1} with fresh noise."""
    t = torch.randint(0, diffusion.num_timesteps, (latents.shape[0],), device=latents.device)
    losses = training_losses(
        diffusion,
        model,
        latents,
        t,
        torch.randn_like(latents),
        conditioning,
        min_snr_gamma=cfg.loss.min_snr_gamma,
        vlb_weight=cfg.loss.vlb_weight,
    )
    return losses["loss"].mean()


def load_vae(path: str) -> AutoencoderKL:
    """A diffusers AutoencoderKL from a VAE folder (config.json at the top), a folder with vae/, or a hub id."""
    folder = Path(path)
    if folder.is_dir():
        if (folder / "config.json").is_file():
            return AutoencoderKL.from_pretrained(folder, use_safetensors=True)
        if (folder / "vae" / "config.json").is_file():
            return AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
        raise FileNotFoundError(f"autoencoder: {path} holds neither config.json nor vae/config.json")
    if path.startswith((".", "/")) or path.count("/") != 1:  # a local path, not an "owner/name" hub id
        raise FileNotFoundError(f"autoencoder: {path} does not exist; train stage 1 first (ldm train-autoencoder)")
    # A bare VAE repository (e.g. stabilityai/sd-vae-ft-mse), else a whole pipeline repository.
    try:
        return AutoencoderKL.from_pretrained(path, use_safetensors=True)
    except OSError:
        return AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)


def latent_size(cfg: DiffusionExperimentConfig, vae: AutoencoderKL) -> int:
    """The side of the latent grid, checked against the VAE's and the U-Net's downsampling."""
    return latent_grid(cfg.data.resolution, 2 ** (len(vae.config.block_out_channels) - 1), cfg.unet)


def cacheable(cfg: DiffusionExperimentConfig, dataset: Any) -> bool:
    """Whether the run uses the latent + text caches: asked for, and the data is a fixed, unaugmented set."""
    if not cfg.train.cache_latents:
        return False
    if isinstance(dataset, IterableDataset):
        logger.info("train.cache_latents: streaming data (%s) is encoded on every step", cfg.data.source)
        return False
    if cfg.data.random_flip or not cfg.data.center_crop:
        raise ValueError(
            "train.cache_latents: the cache stores one view per image, but data.random_flip / a random crop "
            "make a new view every epoch; set train.cache_latents=false or turn the augmentation off"
        )
    return True


def learning_rate(step: int, tc: DiffusionTrainConfig) -> float:
    """Linear warmup over warmup_steps, then constant or a cosine from lr down to 0 at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return tc.lr
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_learning_rate(opt: torch.optim.Optimizer, lr: float) -> None:
    """The LR is a function of the step alone, so a resumed run continues the schedule exactly."""
    for group in opt.param_groups:
        group["lr"] = lr


def make_pipeline(
    vae: AutoencoderKL, text_encoder: TextEncoder, unet: UNet2DConditionModel, cfg: DiffusionExperimentConfig
) -> LatentDiffusionPipeline:
    """The text-to-image pipeline over the current models, with the validation settings as its defaults."""
    vc = cfg.validation
    defaults = SamplingDefaults(
        guidance_scale=vc.guidance_scale, num_inference_steps=vc.num_inference_steps, sampler=vc.sampler
    )
    return LatentDiffusionPipeline(vae, text_encoder, unet, cfg.noise, defaults)


@torch.no_grad()
def write_validation_grid(
    pipeline: LatentDiffusionPipeline, ema: EMA | None, denoiser: Denoiser, cfg: DiffusionExperimentConfig, path: Path
) -> None:
    """A PNG grid, one row per validation prompt, sampled with the EMA weights (of the pipeline's U-Net and
    trained text encoder, which `denoiser` holds) and a fixed seed."""
    vc = cfg.validation
    generator = torch.Generator(pipeline.device).manual_seed(vc.seed)
    with ema.averaged(denoiser) if ema is not None else contextlib.nullcontext():
        images = pipeline(vc.prompts, num_images_per_prompt=vc.images_per_prompt, generator=generator).images
    save_image_grid(images, path, rows=len(vc.prompts), scale=max(1, 64 // images[0].size[0]))  # small tiles enlarged


def _ema_saver(ema: EMA | None, accelerator: Accelerator) -> Any:
    def save(path: Path) -> None:
        if ema is not None and accelerator.is_main_process:
            ema.save(path / EMA_FILE)

    return save
