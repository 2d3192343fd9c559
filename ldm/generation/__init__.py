"""Generation: the pipeline, the one request type every caller builds, and the model folder it loads.

    pipeline.py        LatentDiffusionPipeline: load / save a folder, LoRA, encoders, inversion, __call__
    request.py         GenerationRequest: every setting of one generation, and its one `resolve`
    checks.py          the checks `resolve` runs, one per field or group (ValueError naming the field)
    run.py             running a resolved request: conditioning, x_T, the chain, decoding; PipelineOutput
    inputs.py          tensor inputs checked and converted: images, masks, latents, prompt embeddings
    scheduler_loop.py  the loop for any diffusers scheduler object
    model_folder.py    the folder on disk (a diffusers SD folder) and its SamplingDefaults
    noise_schedule.py  NoiseScheduleConfig: the noise process, and its diffusers scheduler config
    lora_weights.py    diffusers-format U-Net LoRA files, read and written

`from ldm.generation import LatentDiffusionPipeline` imports the pipeline on first use only (PEP 562), so the
light modules (the folder's JSON files, the noise schedule's config) do not load the networks' code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["GenerationRequest", "LatentDiffusionPipeline", "PipelineOutput", "SamplingDefaults"]
_HOMES = {
    "GenerationRequest": "ldm.generation.request",
    "LatentDiffusionPipeline": "ldm.generation.pipeline",
    "PipelineOutput": "ldm.generation.run",
    "SamplingDefaults": "ldm.generation.model_folder",
}

if TYPE_CHECKING:
    from ldm.generation.model_folder import SamplingDefaults
    from ldm.generation.pipeline import LatentDiffusionPipeline
    from ldm.generation.request import GenerationRequest
    from ldm.generation.run import PipelineOutput


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'ldm.generation' has no attribute {name!r}")
