"""Stage 1 on the training runtime: build, loop, export.

`train_autoencoder` reads as the run: the accelerator, the data, the autoencoder stage, the loop. The stage
is what stage 1 adds to the runtime: its step (the autoencoder's update, then the discriminator's), its
reconstruction grid, and its export (held-out metrics, the latent scaling factor, the diffusers VAE folder).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from autoencoder.discriminator import PatchDiscriminator
from autoencoder.evaluate import batch_images, evaluate_reconstruction, latent_scaling_factor, save_reconstruction_grid
from autoencoder.loss import AutoencoderLoss
from autoencoder.model import KLAutoencoder, build_vae
from autoencoder.perceptual import build_lpips, lpips_backbone_available
from autoencoder.posterior import DiagonalGaussian
from ldm.data import build_dataset
from ldm.training.autoencoder_config import AutoencoderExperimentConfig
from ldm.training.distributed import prepare_loader
from ldm.training.loaders import make_loader
from ldm.training.runtime import TrainLoop, Update, start_run, train_schedule


def train_autoencoder(
    cfg: AutoencoderExperimentConfig, output_dir: str | Path, resume: str | None = None
) -> dict[str, Any]:
    """Train on `cfg.data`, evaluate on its held-out split, and export OUTPUT_DIR/vae/ (diffusers, with
    scaling_factor); returns the metrics also written to OUTPUT_DIR/metrics.json. `resume` is "latest" or a
    checkpoint folder."""
    out = Path(output_dir)
    # Built first: without its pretrained backbone, LPIPS stops the run before any work.
    perceptual = build_lpips(cfg.loss.lpips_net) if cfg.loss.lpips_weight > 0 else None
    accelerator = start_run(cfg, cfg.train, out, "autoencoder")
    train_loader = make_loader(build_dataset(cfg.data, "train"), cfg.train)
    heldout_loader = make_loader(build_dataset(cfg.data, "heldout"), cfg.train, shuffle=False)
    stage = AutoencoderStage(cfg, accelerator, perceptual, heldout_loader, scale_loader=train_loader)
    return TrainLoop(accelerator, stage, prepare_loader(accelerator, train_loader), cfg.train, out).run(resume)


class AutoencoderStage:
    """The KL autoencoder (and, when configured, its patch discriminator) as a stage of the runtime."""

    name = "autoencoder"
    headline = ("rec", "kl", "g_loss", "d_loss")

    def __init__(
        self,
        cfg: AutoencoderExperimentConfig,
        accelerator: Accelerator,
        perceptual: nn.Module | None,
        heldout_loader: Iterable,
        scale_loader: Iterable,
    ) -> None:
        tc = cfg.train
        self.cfg, self.accelerator = cfg, accelerator
        # Unprepared loaders, read by the main process alone at the end: a prepared one would wait for the others.
        self.heldout_loader, self.scale_loader = heldout_loader, scale_loader
        model = KLAutoencoder(build_vae(cfg.model), cfg.loss.logvar_init, cfg.loss.latent_noise)
        self.criterion = AutoencoderLoss(cfg.loss, perceptual).to(accelerator.device)
        # fused: one kernel, step counts on the device, and the guard's skip flag honoured there (no host sync)
        optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tc.adam_betas, fused=True)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.disc, self.disc_optimizer = None, None
        if cfg.loss.use_discriminator:
            disc = PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers)
            disc_optimizer = torch.optim.Adam(disc.parameters(), lr=tc.disc_lr, betas=tc.adam_betas, fused=True)
            self.disc, self.disc_optimizer = accelerator.prepare(disc, disc_optimizer)
        self.models = [m for m in (self.model, self.disc) if m is not None]
        self.preview = batch_images(next(iter(heldout_loader)))[:8].to(accelerator.device)

    def updates(self, batch: Any, step: int) -> Iterator[Update]:
        """The autoencoder's update, then (once the GAN is on) the discriminator's on the same reconstructions."""
        x = batch_images(batch).to(self.accelerator.device)  # a stream is not placed by Accelerate
        raw = self.accelerator.unwrap_model(self.model)
        raw_disc = self.accelerator.unwrap_model(self.disc) if self.disc is not None else None
        x_rec, moments = self.model(x)
        posterior = DiagonalGaussian(moments)
        terms = self.criterion.generator_loss(x, x_rec, posterior, raw.logvar, step, raw_disc, raw.last_layer)
        tc = self.cfg.train
        schedule = [train_schedule(tc)]
        yield Update("autoencoder", terms.loss, self.optimizer, self.model.parameters(), schedule, terms.logs)
        if self.disc is not None and self.criterion.disc_factor(step) > 0:
            d_terms = self.criterion.discriminator_loss(x, x_rec, self.disc, step)
            disc_lr = [train_schedule(tc, tc.disc_lr)]
            yield Update(
                "discriminator", d_terms.loss, self.disc_optimizer, self.disc.parameters(), disc_lr, d_terms.logs
            )

    def after_step(self, applied: Mapping[str, bool | torch.Tensor]) -> None:
        """Nothing: stage 1 keeps no running averages."""

    def write_samples(self, path: Path) -> None:
        """Held-out inputs over their reconstructions."""
        write_reconstructions(self.accelerator.unwrap_model(self.model), self.preview, path)

    def save_state(self, folder: Path) -> None:
        """Nothing beyond what accelerate saves (both networks and optimizers)."""

    def load_state(self, folder: Path) -> None:
        """Nothing beyond what accelerate restores."""

    def export(self, output_dir: Path) -> dict[str, Any]:
        """Held-out metrics, the latent scaling factor, a last grid and OUTPUT_DIR/vae/."""
        model = self.accelerator.unwrap_model(self.model)
        return export_vae(model, self.heldout_loader, self.scale_loader, self.cfg, output_dir)


@torch.no_grad()
def write_reconstructions(model: KLAutoencoder, x: Tensor, path: Path) -> None:
    """A PNG grid of held-out inputs (top) and their reconstructions from the posterior mean (bottom)."""
    x_rec = model.decode(model.encode(x).mode())
    save_reconstruction_grid(x, x_rec, path, upscale=max(1, 128 // x.shape[-1]))


def export_vae(
    model: KLAutoencoder,
    heldout_loader: Iterable,
    scale_loader: Iterable,
    cfg: AutoencoderExperimentConfig,
    out: Path,
) -> dict[str, Any]:
    """Evaluate on held-out data, set the scaling factor, draw a final grid and save OUTPUT_DIR/vae/."""
    model.eval()
    device = next(model.parameters()).device
    model.float()
    # LPIPS is reported only with the pretrained network (never the one a test may have handed the loss).
    net = cfg.loss.lpips_net
    lpips_net = build_lpips(net).to(device) if lpips_backbone_available(net) else None
    metrics = evaluate_reconstruction(model, heldout_loader, cfg.train.eval_samples, device, lpips_net)
    scale = latent_scaling_factor(model, scale_loader, cfg.train.scale_samples, device)
    preview = batch_images(next(iter(heldout_loader)))[:8].to(device)
    write_reconstructions(model, preview, out / "samples" / "final.png")
    model.vae.register_to_config(scaling_factor=scale)
    model.vae.save_pretrained(out / "vae", safe_serialization=True)
    return {**metrics, "scaling_factor": scale}
