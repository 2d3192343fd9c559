"""Metrics that need pretrained networks (Inception for FID, CLIP for the CLIP score), via torchmetrics.

Their weights cannot be downloaded at run time here, so they run only when the user passes local paths;
otherwise each is reported as unavailable with the reason, never as a number.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from autoencoder.model import KLAutoencoder


def fid_unavailable_reason(weights: str | None) -> str | None:
    """Why FID cannot be computed with these settings, or None when it can."""
    if weights is None:
        return (
            "no Inception weights given (--inception-weights PATH: torch-fidelity's "
            "pt_inception-2015-12-05-6726825d.pth; it cannot be downloaded on this machine)"
        )
    if not Path(weights).is_file():
        return f"--inception-weights: {weights} is not a file"
    if importlib.util.find_spec("torch_fidelity") is None:
        return "torch-fidelity is not installed (pip install 'latent-diffusion-lab[metrics]')"
    return None


def clip_unavailable_reason(folder: str | None) -> str | None:
    """Why the CLIP score cannot be computed from `folder`, or None when it can."""
    if folder is None:
        return "no CLIP model given (--clip-model PATH to a local transformers CLIPModel folder)"
    if not Path(folder).is_dir():
        return f"--clip-model: {folder} is not a folder"
    # torchmetrics loads it with from_pretrained, which would fall back to a pickled pytorch_model.bin.
    if not any(Path(folder).glob("*.safetensors")):
        return f"--clip-model: {folder} has no .safetensors weights (pickled .bin weights are not loaded)"
    return None


def _fid(weights: str, device: torch.device) -> Any:
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=weights).to(device)


@torch.no_grad()
def reconstruction_fid(
    autoencoder: KLAutoencoder, loader: Iterable, weights: str | None, device: torch.device
) -> dict[str, Any]:
    """rFID between held-out images and their reconstructions, or why it is unavailable."""
    reason = fid_unavailable_reason(weights)
    if reason is not None:
        return {"rfid": None, "unavailable": {"rFID": reason}}
    fid = _fid(weights, device)
    for batch in loader:
        x = batch["pixel_values"].to(device)
        reconstruction = autoencoder.decode(autoencoder.encode(x).mode()).clamp(-1, 1)
        fid.update((x + 1) / 2, real=True)
        fid.update((reconstruction + 1) / 2, real=False)
    return {"rfid": fid.compute().item()}


@torch.no_grad()
def pretrained_scores(pipeline: Any, prompts: Any, heldout: Any, cfg: Any, guidance_scale: float) -> dict[str, Any]:
    """CLIP score of generated images against their prompts and FID against held-out images, when the user
    supplied the weights; both on one image per prompt at the model's default sampling settings."""
    unavailable: dict[str, str] = {}
    clip_reason = clip_unavailable_reason(cfg.clip_model)
    if clip_reason is not None:
        unavailable["CLIP score"] = clip_reason
    fid_reason = fid_unavailable_reason(cfg.inception_weights)
    if fid_reason is not None:
        unavailable["FID"] = fid_reason
    scores: dict[str, Any] = {"clip_score": None, "fid": None, "unavailable": unavailable}
    if len(unavailable) == 2:
        return scores
    generator = torch.Generator(pipeline.device).manual_seed(cfg.seed)
    images = pipeline(
        prompts.captions, guidance_scale=guidance_scale, generator=generator, output_type="np", progress=False
    ).images
    generated = torch.from_numpy(images).permute(0, 3, 1, 2).float()  # [0, 1]
    if clip_reason is None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        metric = CLIPScore(model_name_or_path=cfg.clip_model)
        scores["clip_score"] = metric((generated * 255).round(), prompts.captions).item()
    if fid_reason is None:
        fid = _fid(cfg.inception_weights, pipeline.device)
        reals = torch.stack([heldout[i]["pixel_values"] for i in range(len(heldout))])
        fid.update((reals + 1) / 2, real=True)
        fid.update(generated, real=False)
        scores["fid"] = fid.compute().item()
    return scores
