"""LPIPS with its pretrained torchvision backbone, or a clear stop when that backbone is missing.

The backbone weights come from torchvision's download cache (torch hub's `checkpoints/` folder); they
cannot be fetched on an offline machine. We never fall back to a random backbone: a random network's
"LPIPS" is not the metric anyone means by the name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# The files torchvision's vgg16 / alexnet / squeezenet1_1 ImageNet weights are cached as.
BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def backbone_weight_path(net: str) -> Path:
    """Where torchvision looks for the ImageNet weights of LPIPS backbone `net` before downloading them."""
    if net not in BACKBONE_FILES:
        raise ValueError(f"lpips_net: {net!r} is not one of {', '.join(BACKBONE_FILES)}")
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def lpips_backbone_available(net: str = "vgg") -> bool:
    """Whether the pretrained backbone for LPIPS `net` is in torch hub's cache."""
    return backbone_weight_path(net).is_file()


def require_lpips_backbone(net: str = "vgg") -> None:
    """Raise FileNotFoundError, naming the file and the two ways out, if the LPIPS backbone is missing."""
    path = backbone_weight_path(net)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs the pretrained torchvision backbone for net={net!r}, and {path} is missing "
            "(it cannot be downloaded here). Either place that file there (torchvision downloads it on a "
            "machine with internet; TORCH_HOME moves the cache), or set the LPIPS weight to 0 "
            "(--set loss.lpips_weight=0) to train without the perceptual loss."
        )


def build_lpips(net: str = "vgg") -> nn.Module:
    """The `lpips` package's LPIPS(net) with its pretrained backbone and linear heads, frozen, in eval mode.

    Inputs are images in [-1, 1]; the output is a distance per image, shape (B, 1, 1, 1).
    """
    require_lpips_backbone(net)
    import lpips

    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, verbose=False)
    return model.eval().requires_grad_(False)
