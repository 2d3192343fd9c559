"""The variational bound of a trained pipeline on held-out latents, in bits per latent dimension."""

from __future__ import annotations

import torch

from autoencoder.posterior import DiagonalGaussian
from ldm.diffusion.vlb import bits_per_dim
from ldm.generation import LatentDiffusionPipeline


def bound_not_applicable(pipeline: LatentDiffusionPipeline) -> str | None:
    """Why the variational bound says nothing about this pipeline's U-Net, or None when it applies."""
    if pipeline.guidance_in_unet:
        return (
            "the U-Net is a consistency-distilled student (unet/config.json sets time_cond_proj_dim): it maps x_t "
            "to the end of the teacher's guided ODE, not to a denoising posterior of the training chain, so the "
            "bound's terms are no likelihood of it"
        )
    return None


@torch.no_grad()
def heldout_latent_bound(
    pipeline: LatentDiffusionPipeline,
    images: torch.Tensor,
    captions: list[str],
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """-log p(z0 | caption) <= L_VLB, averaged over held-out images, in bits per latent dimension.

    z0 = scaling_factor * a sample of q(z | x) (the distribution stage 2 was trained on); the decoder term
    L_0 is a continuous Gaussian likelihood (latents are not 8-bit data), so the numbers are differential
    bits and can be negative. The bound runs every one of the T timesteps, one U-Net pass each, conditioned
    on the image's caption without guidance.
    """
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    scale = float(pipeline.vae.config.scaling_factor)
    totals = {"bits_per_dim": 0.0, "prior_bits_per_dim": 0.0}
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(pipeline.device, pipeline.vae.dtype)
        moments = pipeline.vae.encode(x).latent_dist.parameters
        z0 = DiagonalGaussian(moments.float()).sample(generator) * scale
        context = pipeline.text_encoder.encode(captions[start : start + batch_size]).to(z0.dtype)

        def model(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor = context) -> torch.Tensor:
            return pipeline.unet(x_t, t, encoder_hidden_states=context).sample

        terms = bits_per_dim(pipeline.diffusion, model, z0, decoder="gaussian", generator=generator, progress=True)
        totals["bits_per_dim"] += terms.total.sum().item()
        totals["prior_bits_per_dim"] += terms.prior.sum().item()
    return {k: v / images.shape[0] for k, v in totals.items()} | {"num_latents": images.shape[0]}
