"""Latent diffusion: a KL autoencoder, a text-conditioned diffusion U-Net, and the math in between."""

__version__ = "0.1.0"
