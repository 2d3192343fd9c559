"""Latent diffusion: a KL autoencoder, a text-conditioned diffusion U-Net, and the math in between.

`from ldm import LatentDiffusionPipeline` loads the pipeline (and torch, diffusers) on first use only,
so `import ldm` and `ldm --help` stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["GenerationRequest", "LatentDiffusionPipeline", "PipelineOutput", "SamplingDefaults"]

if TYPE_CHECKING:
    from ldm.generation import GenerationRequest, LatentDiffusionPipeline, PipelineOutput, SamplingDefaults


def __getattr__(name: str) -> Any:
    """PEP 562: import the pipeline module when one of its names is first asked for."""
    if name in __all__:
        import ldm.generation

        return getattr(ldm.generation, name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
