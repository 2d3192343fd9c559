"""The autoencoder's training objective, after CompVis latent-diffusion's LPIPSWithDiscriminator.

Generator (autoencoder) loss, with sums over pixels / latent dims and means over the batch:
    rec   = pixel_weight * |x - x_rec|^p + lpips_weight * LPIPS(x, x_rec)        (per pixel; p = 1 or 2)
    nll   = sum(rec / exp(s) + s)                                                 (s: learned log-variance)
    L_G   = -E[D(x_rec)]                                                          (hinge, generator side)
    loss  = nll + kl_weight * KL(q(z|x) || N(0, I)) + disc_weight * lambda * c(step) * L_G
with lambda the adaptive weight at the decoder's last layer and c(step) = disc_factor once
step >= disc_start, else 0. The discriminator minimizes c(step) * hinge(D(x), D(x_rec)).
With lpips_weight = 0 and pixel_weight = 1, nll is the negative log-likelihood of a Laplace decoder with
scale exp(s) (p = 1), or twice that of a Gaussian decoder with variance exp(s) (p = 2), up to constants.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from autoencoder.config import LossConfig
from autoencoder.discriminator import adaptive_weight, hinge_d_loss, hinge_g_loss
from autoencoder.posterior import DiagonalGaussian


@dataclass
class LossTerms:
    """The total loss to backpropagate and its parts for logging: detached 0-dim tensors, so that a step
    never waits for the device (the training runtime converts them to numbers only at its log steps)."""

    loss: Tensor
    logs: dict[str, Tensor]


class AutoencoderLoss(nn.Module):
    """L1 or L2 + LPIPS through a learned log-variance, + KL, + an adaptive-weighted PatchGAN term.

    `perceptual` is the LPIPS network (None when lpips_weight is 0); it is frozen here. Build it with
    `autoencoder.perceptual.build_lpips`, which refuses to run without the pretrained backbone.
    """

    def __init__(self, cfg: LossConfig, perceptual: nn.Module | None = None) -> None:
        super().__init__()
        if cfg.lpips_weight > 0 and perceptual is None:
            raise ValueError("loss.lpips_weight > 0 needs an LPIPS network (autoencoder.perceptual.build_lpips)")
        self.cfg = cfg
        self.perceptual = perceptual.eval().requires_grad_(False) if perceptual is not None else None

    def disc_factor(self, step: int) -> float:
        """c(step): the adversarial terms' switch, disc_factor from disc_start on and 0 before."""
        return self.cfg.disc_factor if step >= self.cfg.disc_start else 0.0

    def reconstruction(self, x: Tensor, x_rec: Tensor) -> Tensor:
        """Per-pixel reconstruction loss (B, 3, H, W): pixel_weight * L1 or L2 + lpips_weight * LPIPS (broadcast)."""
        error = x - x_rec
        rec = self.cfg.pixel_weight * (error.square() if self.cfg.pixel_loss == "l2" else error.abs())
        if self.perceptual is not None and self.cfg.lpips_weight > 0:
            rec = rec + self.cfg.lpips_weight * self.perceptual(x, x_rec)  # (B, 1, 1, 1)
        return rec

    def generator_loss(
        self,
        x: Tensor,
        x_rec: Tensor,
        posterior: DiagonalGaussian,
        logvar: Tensor,
        step: int,
        discriminator: nn.Module | None = None,
        last_layer: Tensor | None = None,
    ) -> LossTerms:
        """The autoencoder's loss at optimizer step `step`; the discriminator's parameters get no gradient."""
        batch = x.shape[0]
        rec = self.reconstruction(x.float(), x_rec.float())
        nll = (rec / torch.exp(logvar) + logvar).sum() / batch
        kl = posterior.kl().float().mean()
        loss = nll + self.cfg.kl_weight * kl
        # logvar is the parameter itself: cloned, or the optimizer's in-place update would rewrite the logged value.
        logs = {"rec": rec.detach().mean(), "nll": nll.detach(), "kl": kl.detach(), "logvar": logvar.detach().clone()}

        factor = self.disc_factor(step)
        if discriminator is not None and factor > 0:
            with frozen(discriminator):
                g_loss = hinge_g_loss(discriminator(x_rec).float())
            if last_layer is None:
                raise ValueError("generator_loss: the adaptive weight needs the decoder's last layer")
            max_weight, fp16 = self.cfg.adaptive_weight_max, runs_in_fp16(x_rec)
            weight = self.cfg.disc_weight * adaptive_weight(nll, g_loss, last_layer, max_weight, fp16)
            loss = loss + weight * factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=weight)
        return LossTerms(loss, logs)

    def discriminator_loss(self, x: Tensor, x_rec: Tensor, discriminator: nn.Module, step: int) -> LossTerms:
        """c(step) * hinge(D(x), D(x_rec)), with x_rec detached so the autoencoder gets no gradient."""
        logits_real = discriminator(x.detach()).float()
        logits_fake = discriminator(x_rec.detach()).float()
        d_loss = self.disc_factor(step) * hinge_d_loss(logits_real, logits_fake)
        logs = {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean()}
        logs["logits_fake"] = logits_fake.detach().mean()
        return LossTerms(d_loss, logs)


def runs_in_fp16(x_rec: Tensor) -> bool:
    """Whether the decoder's output, or the discriminator run on it under autocast, is float16."""
    device = x_rec.device.type
    autocast_fp16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    return x_rec.dtype == torch.float16 or autocast_fp16


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Inside the block `module`'s parameters get no gradient (gradients still flow through it to its input)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
