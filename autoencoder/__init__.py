"""Stage 1: the KL-regularized autoencoder (posterior, losses, trainer)."""
