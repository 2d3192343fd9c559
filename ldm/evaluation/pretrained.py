"""Metrics that need pretrained networks: FID and KID (Inception, via torchmetrics and torch-fidelity), the CLIP
score (a transformers CLIPModel) and LPIPS (a torchvision backbone).

Their weights cannot be downloaded at run time here, so they run only when the user passes local paths (or,
for LPIPS, has the backbone in torch hub's cache); otherwise each is reported as unavailable with the reason,
never as a number, and never from a random network.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from autoencoder.model import KLAutoencoder

INCEPTION_FEATURES = 2048  # the pool3 features FID and KID are defined on


def fid_unavailable_reason(weights: str | None) -> str | None:
    """Why FID (and KID, on the same network) cannot be computed with these settings, or None when it can."""
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
    # from_pretrained would fall back to a pickled pytorch_model.bin; ClipScore loads safetensors only.
    if not any(Path(folder).glob("*.safetensors")):
        return f"--clip-model: {folder} has no .safetensors weights (pickled .bin weights are not loaded)"
    return None


def lpips_unavailable_reason(net: str = "vgg") -> str | None:
    """Why LPIPS with backbone `net` cannot be computed here, or None when its pretrained backbone is on disk."""
    from autoencoder.perceptual import backbone_weight_path, lpips_backbone_available

    if lpips_backbone_available(net):
        return None
    return (
        f"the pretrained {net} backbone LPIPS needs is not at {backbone_weight_path(net)} (torchvision's "
        "ImageNet weights; it cannot be downloaded on this machine, TORCH_HOME moves the cache)"
    )


def load_inception(weights: str, device: torch.device | str) -> nn.Module:
    """torch-fidelity's Inception-v3 (the network FID is defined with), returning (B, 2048) pool3 features of
    uint8 images (B, 3, H, W) resized to 299. ValueError naming --inception-weights if the file is not a plain
    state dict of that network.

    torch-fidelity reads the file with `torch.load(weights_only=False)`, which would run any code pickled
    into it; so the file is read here weights-only (tensors and plain containers, nothing else) and what
    torch-fidelity opens is a copy of those tensors written by us.
    """
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... for files it refuses
        raise ValueError(f"--inception-weights: {weights} is not a weights-only state dict ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"--inception-weights: {weights} does not hold a state dict of tensors")
    from torchmetrics.image.fid import NoTrainInceptionV3  # needs torch-fidelity

    with tempfile.TemporaryDirectory() as tmp:
        checked = Path(tmp) / "inception.pth"
        torch.save(state, checked)
        try:
            net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
                feature_extractor_weights_path=str(checked),
            )  # fmt: skip
        except RuntimeError as err:  # load_state_dict: missing, unexpected or misshapen tensors
            raise ValueError(f"--inception-weights: {weights} is not torch-fidelity's Inception-v3 ({err})") from err
    return net.to(device)


class _Precomputed(nn.Module):
    """The identity on (B, 2048) features: torchmetrics' FID and KID take a feature network, and both are fed
    the features of one Inception pass instead of running Inception twice."""

    num_features = INCEPTION_FEATURES

    def forward(self, features: Tensor) -> Tensor:
        return features


class InceptionDistances:
    """FID (Heusel et al. 2017: |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) of Inception pool3
    features) and KID (Binkowski et al. 2018: the unbiased MMD^2 with the kernel (x.y / d + 1)^3, mean and std
    over `kid_subsets` random subsets of `kid_subset_size` images of each kind), via torchmetrics."""

    def __init__(
        self, inception: nn.Module, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0
    ) -> None:
        import warnings

        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.inception = inception
        self.device = next(inception.parameters()).device
        self.fid = FrechetInceptionDistance(feature=_Precomputed()).to(self.device)
        with warnings.catch_warnings():  # that KID keeps every feature vector: 8 KB per image, by design
            warnings.simplefilter("ignore", UserWarning)
            self.kid = KernelInceptionDistance(feature=_Precomputed(), subsets=kid_subsets, subset_size=kid_subset_size)
        self.kid.to(self.device)
        self.counts = {"real": 0, "generated": 0}
        self.seed = seed

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        """Add images (B, 3, H, W) in [0, 1] to the real or the generated set."""
        # Quantized as torchmetrics' FID quantizes with normalize=True, so rFID is what it always was.
        pixels = (images.to(self.device) * 255).byte()
        features = self.inception(pixels)  # (B, 2048)
        self.fid.update(features, real=real)
        self.kid.update(features, real=real)
        self.counts["real" if real else "generated"] += images.shape[0]

    def compute(self, kid: bool = True) -> dict[str, Any]:
        """{"fid", "kid_mean", "kid_std", "kid_subset_size"} (KID's subsets: at most as many images as each set
        has); None with the reason under "unavailable" when a set has fewer than 2 images."""
        n = min(self.counts.values())
        if n < 2:
            reason = f"needs at least 2 real and 2 generated images, got {self.counts}"
            missing: dict[str, Any] = {"fid": None, "unavailable": {"FID": reason}}
            if kid:
                missing |= {"kid_mean": None, "kid_std": None}
                missing["unavailable"]["KID"] = reason
            return missing
        scores: dict[str, Any] = {"fid": self.fid.compute().item()}
        if kid:
            self.kid.subset_size = min(self.kid.subset_size, n)
            with torch.random.fork_rng(devices=[]):  # KID draws its subsets with the global generator
                torch.manual_seed(self.seed)
                mean, std = self.kid.compute()
            scores |= {"kid_mean": mean.item(), "kid_std": std.item(), "kid_subset_size": self.kid.subset_size}
        return scores


class ClipScore:
    """The CLIP score of images against their captions, as torchmetrics defines it: max(100 * mean_i
    cos(E_I(x_i), E_T(c_i)), 0), with a local transformers CLIPModel folder (safetensors weights only).
    Captions longer than the model's text positions are truncated to them."""

    def __init__(self, folder: str, device: torch.device | str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval().to(device)
        self.processor = CLIPProcessor.from_pretrained(folder)
        self.device = device
        self.total, self.count = 0.0, 0

    @torch.no_grad()
    def update(self, images: Tensor, captions: list[str]) -> None:
        """Add images (B, 3, H, W) in [0, 1] and their B captions."""
        if images.shape[0] != len(captions):
            raise ValueError(f"ClipScore: {images.shape[0]} images but {len(captions)} captions")
        pixels = (rearrange(images.float().cpu(), "b c h w -> b h w c") * 255).round().to(torch.uint8).numpy()
        inputs = self.processor(
            text=captions,
            images=list(np.ascontiguousarray(pixels)),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
        )
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        # image_embeds and text_embeds are the projected, L2-normalized embeddings.
        self.total += (100 * (out.image_embeds * out.text_embeds).sum(-1)).sum().item()
        self.count += len(captions)

    def compute(self) -> float:
        if self.count == 0:
            raise ValueError("ClipScore: no images were added")
        return max(self.total / self.count, 0.0)


def open_inception(weights: str | None, device: torch.device | str) -> tuple[nn.Module | None, str | None]:
    """(the Inception network, None), or (None, why FID / KID are unavailable)."""
    reason = fid_unavailable_reason(weights)
    if reason is not None:
        return None, reason
    try:
        return load_inception(weights, device), None
    except ValueError as err:
        return None, str(err)


@torch.no_grad()
def reconstruction_fid(
    autoencoder: KLAutoencoder,
    loader: Iterable,
    weights: str | None,
    device: torch.device,
    inception: nn.Module | None = None,
) -> dict[str, Any]:
    """rFID between held-out images and their reconstructions, or why it is unavailable. `inception`: the
    network `weights` were already loaded into, so it is not loaded twice."""
    reason = None
    if inception is None:
        inception, reason = open_inception(weights, device)
    if inception is None:
        return {"rfid": None, "unavailable": {"rFID": reason}}
    distances = InceptionDistances(inception)
    for batch in loader:
        x = batch["pixel_values"].to(device)
        reconstruction = autoencoder.decode(autoencoder.encode(x).mode()).clamp(-1, 1)
        distances.update((x + 1) / 2, real=True)
        distances.update((reconstruction + 1) / 2, real=False)
    scores = distances.compute(kid=False)
    if scores["fid"] is None:
        return {"rfid": None, "unavailable": {"rFID": scores["unavailable"]["FID"]}}
    return {"rfid": scores["fid"]}


@torch.no_grad()
def pretrained_scores(pipeline: Any, prompts: Any, heldout: Any, cfg: Any, guidance_scale: float) -> dict[str, Any]:
    """CLIP score of generated images against their prompts and FID against held-out images, when the user
    supplied the weights; both on one image per prompt at the model's default sampling settings."""
    unavailable: dict[str, str] = {}
    clip_reason = clip_unavailable_reason(cfg.clip_model)
    if clip_reason is not None:
        unavailable["CLIP score"] = clip_reason
    inception, fid_reason = open_inception(cfg.inception_weights, pipeline.device)
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
        clip = ClipScore(cfg.clip_model, pipeline.device)
        clip.update(generated, prompts.captions)
        scores["clip_score"] = clip.compute()
    if inception is not None:
        distances = InceptionDistances(inception)
        reals = torch.stack([heldout[i]["pixel_values"] for i in range(len(heldout))])
        distances.update((reals + 1) / 2, real=True)
        distances.update(generated, real=False)
        fid = distances.compute(kid=False)
        scores["fid"] = fid["fid"]
        unavailable |= fid.get("unavailable", {})
    return scores
