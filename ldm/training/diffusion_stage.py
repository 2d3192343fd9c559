"""Stage 2 on the training runtime: build, loop, export.

`train_diffusion` reads as the run: the accelerator, the networks, the (cached) data, the diffusion stage,
the loop. The stage is what stage 2 adds to the runtime: its step (the diffusion loss on fresh latents at
uniform t), the EMA of the trained weights, the validation grid, and the export of a diffusers pipeline folder.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from conditioning import TextEncoder
from conditioning.token_rows import CaptionRowEmbedding
from ldm.data import build_dataset
from ldm.data.buckets import use_buckets
from ldm.data.latent_shards import LatentShardSource
from ldm.diffusion import GaussianDiffusion, sample_timesteps, training_losses
from ldm.evaluation.text_pathway import scalar_logs, summary_line, text_pathway
from ldm.generation import GenerationRequest, LatentDiffusionPipeline
from ldm.generation.lora_weights import LORA_WEIGHT_NAME
from ldm.images import save_image_grid
from ldm.training.batches import (
    LatentBatches,
    build_train_dataset,
    cacheable,
    collate_for,
    require_captions,
    size_multiple,
    training_captions,
    use_latent_shards,
)
from ldm.training.contrastive_text import pretrain_text_encoder
from ldm.training.denoiser import Denoiser
from ldm.training.diffusion_config import DiffusionExperimentConfig, latent_grid
from ldm.training.distributed import is_sharded, prepare_loader
from ldm.training.ema import EMA
from ldm.training.latent_cache import LatentCache
from ldm.training.loaders import make_loader
from ldm.training.lora import LoRACheckpoint, add_lora, check_lora, fused_unet, parameter_counts, save_adapter
from ldm.training.parameter_groups import parameter_groups
from ldm.training.runtime import TrainLoop, Update, start_run
from ldm.unet import build_unet

EMA_FILE = "ema.safetensors"
logger = logging.getLogger(__name__)


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
    accelerator = start_run(cfg, tc, out, "diffusion")
    dataset = build_dataset(cfg.data, "train")
    require_captions(dataset)
    nets = build_networks(cfg, accelerator.device)
    dataset = use_buckets(dataset, cfg.data, size_multiple(nets.vae, cfg.unet))  # as is without data.buckets
    cache_dir = (Path(tc.cache_dir) if tc.cache_dir else out / "cache") if cacheable(cfg, dataset) else None
    dataset, unconditional, cache_seconds = build_train_dataset(
        dataset, nets.vae, nets.text_encoder, cfg.data, cache_dir, accelerator
    )
    if isinstance(dataset, LatentShardSource):
        unconditional = use_latent_shards(dataset, nets.vae, nets.text_encoder, cfg, accelerator.device)
    train_only_caption_rows(nets.text_encoder, cfg, dataset)
    if cfg.text_pretraining.steps and resume is None:  # a resumed run's encoder comes from its checkpoint
        if not isinstance(dataset, LatentCache):
            raise ValueError(
                "text_pretraining.steps: reads the latent cache of square images; set train.cache_latents: true "
                "(and data.buckets: false)"
            )
        scale = float(nets.vae.config.scaling_factor)
        pretrain_text_encoder(nets.text_encoder, dataset, scale, cfg.text_pretraining, accelerator.device)
    loader = make_loader(dataset, tc, collate_fn=collate_for(dataset))
    to_latents = LatentBatches(nets.vae, nets.text_encoder, cfg.text_encoder.p_uncond, unconditional)
    cache_report = {"cache_seconds": round(cache_seconds, 1), "latent_cache": cache_dir is not None}
    stage = DiffusionStage(cfg, accelerator, nets, to_latents, Path(pipeline_dir or out / "pipeline"), cache_report)
    return TrainLoop(accelerator, stage, prepare_loader(accelerator, loader), tc, out).run(resume)


@dataclass
class Networks:
    """Stage 2's networks: the frozen VAE, the text encoder, the U-Net, and the `Denoiser` that is trained
    (the U-Net, plus the text encoder when that trains too)."""

    vae: AutoencoderKL
    text_encoder: TextEncoder
    unet: UNet2DConditionModel
    denoiser: Denoiser


def build_networks(cfg: DiffusionExperimentConfig, device: torch.device) -> Networks:
    """The VAE from cfg.autoencoder, the text encoder and a fresh (or pretrained) U-Net sized for their outputs;
    with `unet.lora`, the U-Net frozen under a trainable adapter."""
    vae = load_vae(cfg.autoencoder, cfg.autoencoder_variant).to(device).eval().requires_grad_(False)
    text_encoder = TextEncoder.from_config(cfg.text_encoder).to(device)
    # The same random init on every process whatever its rank: DDP would broadcast rank 0's weights anyway, but
    # FSDP keeps each process's own shard, which must then come from the same draw.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        unet = build_unet(
            cfg.unet,
            in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels * cfg.noise.output_channels_factor,
            cross_attention_dim=text_encoder.hidden_size,
            sample_size=latent_size(cfg, vae),
        )
    if cfg.unet.lora is not None:
        add_lora(unet, cfg.unet.lora, cfg.train.seed)  # before compiling: peft replaces the adapted layers
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.train.compile:
        unet.compile()  # in place: the state dict keeps its names, so checkpoints and exports are unchanged
    return Networks(vae, text_encoder, unet, Denoiser(unet, None if text_encoder.frozen else text_encoder))


class DiffusionStage:
    """The text-conditioned U-Net (and a trainable text encoder) as a stage of the runtime, with its EMA."""

    name = "diffusion"
    headline = ("loss",)

    def __init__(
        self,
        cfg: DiffusionExperimentConfig,
        accelerator: Accelerator,
        nets: Networks,
        to_latents: LatentBatches,
        pipeline_dir: Path,
        cache_report: dict[str, Any],
    ) -> None:
        tc, device = cfg.train, accelerator.device
        check_lora(cfg.unet.lora, accelerator)  # before `prepare` shards anything
        self.cfg, self.accelerator, self.nets, self.to_latents = cfg, accelerator, nets, to_latents
        self.pipeline_dir, self.cache_report = pipeline_dir, cache_report  # the export reports the cache
        # Fixed by name now: sampling switches the U-Net's gradients off, and only these come back on.
        self.trainable = {name for name, p in nets.denoiser.named_parameters() if p.requires_grad}
        self.parameter_counts = parameter_counts(nets.denoiser)  # reported by the export
        self.diffusion = cfg.noise.build()
        groups = parameter_groups(cfg, nets.denoiser)
        self.schedules = [group.schedule for group in groups]
        optimizer = torch.optim.AdamW(
            [group.as_optimizer_group() for group in groups],
            betas=tc.adam_betas,
            fused=True,  # one kernel for all parameters, its step counts on the device, and the guard's skip flag
        )
        self.model, self.optimizer = accelerator.prepare(nets.denoiser, optimizer)
        self.models = [self.model]
        # After `prepare`: under FSDP the parameters are sharded in place by then, and so is the average.
        self.ema = EMA(nets.denoiser, tc.ema_decay).to(device) if tc.ema_decay > 0 else None
        self.ema_to_save: EMA | None = None  # the whole average, gathered by `gather_ema` for `save_state`
        if self.ema is not None:
            accelerator.register_save_state_pre_hook(self.gather_ema)
        if cfg.unet.lora is not None:  # checkpoints hold the adapter, not the frozen base
            LoRACheckpoint(accelerator, nets.denoiser, nets.unet)

    def updates(self, batch: Any, step: int) -> Iterator[Update]:
        """The U-Net's update on fresh latents z ~ q(z | x) and the captions after dropout."""
        latents, conditioning = self.to_latents(batch)
        loss = diffusion_loss(self.diffusion, self.model, latents, conditioning, self.cfg)
        yield Update("unet", loss, self.optimizer, self.model.parameters(), self.schedules, {"loss": loss.detach()})

    def after_step(self, applied: Mapping[str, bool | torch.Tensor]) -> None:
        """Average the weights the update produced (none after a skipped update)."""
        if self.ema is not None and "unet" in applied:
            self.ema.update(self.nets.denoiser, applied["unet"])  # a device flag is read on the device

    def write_samples(self, path: Path) -> dict[str, float]:
        """The validation grid from the EMA weights and, on shapes data, the text-pathway diagnostic of the
        (averaged) text encoder, returned for the tracker. Under FSDP every process calls this (the weights are
        gathered) and the main process samples and writes."""
        scalars: dict[str, float] = {}
        with self.averaged_denoiser() as denoiser:
            if denoiser is not None:
                pipeline = self.pipeline(denoiser)
                write_validation_grid(pipeline, self.cfg, path)
                if self.cfg.data.source == "shapes":
                    pathway = text_pathway(pipeline.text_encoder)
                    logger.info("step %s: %s", path.stem, summary_line(pathway))
                    scalars = scalar_logs(pathway)
        self.restore_training_mode()  # the pipeline put the U-Net in inference mode
        return scalars

    def restore_training_mode(self) -> None:
        """The denoiser in train mode, with gradients for exactly the weights that train (not a frozen base)."""
        for name, parameter in self.nets.denoiser.train().named_parameters():
            parameter.requires_grad_(name in self.trainable)

    def gather_ema(self, *_: Any) -> None:
        """accelerate's save_state pre-hook, run on every process: the EMA made whole for `save_state`, which the
        runtime calls on the main process alone (under FSDP, gathering the shards is a collective)."""
        gathered = self.ema.gathered()
        self.ema_to_save = gathered if self.accelerator.is_main_process else None

    def save_state(self, folder: Path) -> None:
        """The EMA weights, whole (as `gather_ema` gathered them), beside accelerate's state."""
        if self.ema is not None:
            (self.ema_to_save or self.ema).save(folder / EMA_FILE)
            self.ema_to_save = None

    def load_state(self, folder: Path) -> None:
        """Restore the EMA weights (under FSDP each process keeps its shard of them)."""
        if self.ema is not None:
            self.ema.load(folder / EMA_FILE)

    def export(self, output_dir: Path) -> dict[str, Any]:
        """The model folder with the EMA weights, and a last grid drawn from them. Under FSDP every process calls
        this (the weights are gathered) and the main process writes.

        With `unet.lora`, also the adapter alone, as OUTPUT_DIR/lora/pytorch_lora_weights.safetensors (diffusers'
        format: `StableDiffusionPipeline.load_lora_weights` and `LatentDiffusionPipeline.load_lora_weights` read
        it); the model folder's U-Net is then a plain one with the adapter merged into its weights."""
        lora_dir, diagnostics = output_dir / "lora", {}
        with self.averaged_denoiser() as denoiser:
            if denoiser is not None:
                if self.cfg.unet.lora is not None:
                    save_adapter(denoiser.unet, lora_dir)
                    denoiser = Denoiser(fused_unet(denoiser.unet))  # the text encoder is frozen under LoRA
                pipeline = self.pipeline(denoiser)
                pipeline.text_encoder.set_frozen(True)  # trained or not, the exported encoder is for inference
                pipeline.save_pretrained(self.pipeline_dir)
                write_validation_grid(pipeline, self.cfg, output_dir / "samples" / "final.png")
                if self.cfg.data.source == "shapes":  # what the exported encoder tells the U-Net
                    diagnostics["text_pathway"] = text_pathway(pipeline.text_encoder)
        ema_updates = self.ema.num_updates if self.ema is not None else 0
        exported = {"ema_updates": ema_updates, **self.cache_report, "pipeline": str(self.pipeline_dir)}
        if self.cfg.unet.lora is not None:
            exported["lora"] = str(lora_dir / LORA_WEIGHT_NAME)
        return exported | self.parameter_counts | diagnostics

    @contextlib.contextmanager
    def averaged_denoiser(self) -> Iterator[Denoiser | None]:
        """The denoiser with the EMA weights (its own without an EMA), whole, on the main process; None elsewhere.

        Unsharded, it is the training model itself, holding the average for the block. Under FSDP every process
        must enter: the shards, with the average swapped in, are gathered to the main process's CPU and it
        samples from an unsharded copy on its device (a sharded model samples only with every process in step).
        """
        denoiser, main = self.nets.denoiser, self.accelerator.is_main_process
        averaged = self.ema.averaged(denoiser) if self.ema is not None else contextlib.nullcontext()
        if not is_sharded(denoiser):
            with averaged:
                yield denoiser if main else None
            return
        with averaged:
            state = self.accelerator.get_state_dict(denoiser)  # a collective; empty except on the main process
        yield unsharded_copy(denoiser, state).to(self.accelerator.device) if main else None

    def pipeline(self, denoiser: Denoiser | None = None) -> LatentDiffusionPipeline:
        """The text-to-image pipeline over `denoiser` (by default the training one) and the frozen networks, with
        the validation settings as its defaults."""
        nets = self.nets
        denoiser = nets.denoiser if denoiser is None else denoiser
        text_encoder = nets.text_encoder if denoiser.text_encoder is None else denoiser.text_encoder  # trained?
        defaults = self.cfg.validation.sampling_defaults()
        return LatentDiffusionPipeline(nets.vae, text_encoder, denoiser.unet, self.cfg.noise, defaults)


def train_only_caption_rows(text_encoder: TextEncoder, cfg: DiffusionExperimentConfig, dataset: Any) -> None:
    """Make only the token rows of the training captions trainable, where `text_encoder.token_rows` says so."""
    te = cfg.text_encoder
    if not te.frozen and te.train_token_embedding and te.token_rows == "captions":
        text_encoder.train_caption_rows(training_captions(dataset))


def unsharded_copy(denoiser: Denoiser, state: Mapping[str, torch.Tensor]) -> Denoiser:
    """A plain Denoiser of `denoiser`'s architecture holding `state` (its whole state dict, e.g. gathered from
    FSDP shards); no weight is initialized only to be overwritten."""
    with init_empty_weights():  # parameters on the meta device until `state` is assigned
        unet = UNet2DConditionModel.from_config(denoiser.unet.config)
        encoder = denoiser.text_encoder
        if encoder is not None:
            rows = encoder.model.get_input_embeddings()
            encoder = TextEncoder(CLIPTextModel(encoder.model.config), encoder.tokenizer, encoder.config)
            if isinstance(rows, CaptionRowEmbedding):  # the same trainable rows, so the state dict fits
                table = encoder.model.get_input_embeddings()
                encoder.model.set_input_embeddings(CaptionRowEmbedding(table, rows.ids))
    copy = Denoiser(unet, encoder)
    copy.load_state_dict(state, assign=True)  # strict: every weight of the copy comes from `state`
    return copy


def diffusion_loss(
    diffusion: GaussianDiffusion,
    model: Any,
    latents: torch.Tensor,
    conditioning: dict[str, Any],
    cfg: DiffusionExperimentConfig,
) -> torch.Tensor:
    """The batch mean of the configured objective at t drawn as loss.timestep_sampling says, with fresh noise."""
    lc = cfg.loss
    t = sample_timesteps(
        latents.shape[0], diffusion.num_timesteps, lc.timestep_sampling,  # type: ignore[arg-type]
        logit_mean=lc.logit_mean, logit_std=lc.logit_std, device=latents.device,
    )  # fmt: skip
    losses = training_losses(
        diffusion,
        model,
        latents,
        t,
        torch.randn_like(latents),
        conditioning,
        min_snr_gamma=cfg.loss.min_snr_gamma,
        min_snr_of=cfg.loss.min_snr_of,  # type: ignore[arg-type]
        vlb_weight=cfg.loss.vlb_weight,
    )
    return losses["loss"].mean()


@torch.no_grad()
def write_validation_grid(pipeline: LatentDiffusionPipeline, cfg: DiffusionExperimentConfig, path: Path) -> None:
    """A PNG grid, one row per validation prompt, sampled from `pipeline` with a fixed seed."""
    vc = cfg.validation
    generator = torch.Generator(pipeline.device).manual_seed(vc.seed)
    grid = GenerationRequest(vc.prompts, num_images_per_prompt=vc.images_per_prompt, generator=generator)
    images = pipeline.generate(grid).images
    save_image_grid(images, path, rows=len(vc.prompts), scale=max(1, 64 // images[0].size[0]))  # small tiles enlarged


def load_vae(path: str, variant: str | None = None) -> AutoencoderKL:
    """A diffusers AutoencoderKL from a VAE folder (config.json at the top), a folder with vae/, or a hub id;
    `variant` picks weights such as diffusion_pytorch_model.fp16.safetensors."""
    folder = Path(path)
    if folder.is_dir():
        if (folder / "config.json").is_file():
            return AutoencoderKL.from_pretrained(folder, variant=variant, use_safetensors=True)
        if (folder / "vae" / "config.json").is_file():
            return AutoencoderKL.from_pretrained(folder, subfolder="vae", variant=variant, use_safetensors=True)
        raise FileNotFoundError(f"autoencoder: {path} holds neither config.json nor vae/config.json")
    if path.startswith((".", "/")) or path.count("/") != 1:  # a local path, not an "owner/name" hub id
        raise FileNotFoundError(f"autoencoder: {path} does not exist; train stage 1 first (ldm train-autoencoder)")
    # A bare VAE repository (e.g. stabilityai/sd-vae-ft-mse), else a whole pipeline repository.
    try:
        return AutoencoderKL.from_pretrained(path, variant=variant, use_safetensors=True)
    except OSError:
        return AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, use_safetensors=True)


def latent_size(cfg: DiffusionExperimentConfig, vae: AutoencoderKL) -> int:
    """The side of the latent grid, checked against the VAE's and the U-Net's downsampling."""
    return latent_grid(cfg.data.resolution, 2 ** (len(vae.config.block_out_channels) - 1), cfg.unet)
