"""The PatchGAN discriminator (pix2pix's NLayerDiscriminator, as used by CompVis) and its hinge loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """A stack of 4x4 convolutions that scores overlapping patches: (B, 3, H, W) -> logits (B, 1, h, w).

    `layers` strided convolutions halve the resolution (the last one keeps it), then a 1-channel head.
    BatchNorm as in pix2pix; weights drawn N(0, 0.02) (norm scales N(1, 0.02)) as in its init.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits: positive means "looks real"."""
        return self.net(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator's adversarial loss: -E[D(x_rec)]."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4, fp16: bool = False
) -> Tensor:
    """lambda = ||grad_w L_rec|| / (||grad_w L_G|| + 1e-4) at the decoder's last layer w, clamped to [0, max].

    Balances the adversarial gradient against the reconstruction gradient (Esser et al., taming
    transformers). Returned detached: it is a weight, not something to optimize. `fp16`: the losses were
    computed through float16 activations (autocast), whose backward under- or overflows unless scaled;
    each norm is then taken at its own power-of-two scale (`fp16_grad_norm`). A weight that still cannot
    be measured (NaN) is 0 for this step rather than a NaN loss.
    """
    grad_norm = fp16_grad_norm if fp16 else unscaled_grad_norm
    weight = grad_norm(rec_loss, last_layer) / (grad_norm(g_loss, last_layer) + 1e-4)
    return torch.nan_to_num(weight, nan=0.0).clamp(0.0, max_weight).detach()


def unscaled_grad_norm(loss: Tensor, param: Tensor) -> Tensor:
    """||d loss / d param||, keeping the graph for the next gradient."""
    return torch.linalg.vector_norm(torch.autograd.grad(loss, param, retain_graph=True)[0].float())


# fp16 spans about 6e-8 (smallest subnormal) to 65504. The two losses' gradients at the last layer differ by up
# to max_weight, so no common scale fits both: the reconstruction's, a sum over every pixel of the batch, can
# overflow at SD's resolutions, while the adversarial one, spread thin over those pixels, underflows. Each is
# rescaled so that its largest entry lands here, 16 times below fp16's maximum.
FP16_TARGET_MAX = 2.0**12
FP16_SCALE_EXPONENTS = (-24, 24)  # the power-of-two scale's range; an all-zero (underflowed) probe gets 2^24
FP16_OVERFLOWED = 2.0**20  # the largest entry assumed when the unscaled gradient overflowed (> 65504)


def fp16_grad_norm(loss: Tensor, param: Tensor) -> Tensor:
    """||d loss / d param|| through float16 activations, in two backward passes and without a host sync.

    The unscaled gradient's largest entry picks a power-of-two scale s (exact to undo) that brings it to
    FP16_TARGET_MAX; the norm of grad(s * loss) / s is returned, or the unscaled norm if that is not finite.
    """
    probe = torch.autograd.grad(loss, param, retain_graph=True)[0].float()
    largest = torch.nan_to_num(probe.abs().amax(), nan=FP16_OVERFLOWED, posinf=FP16_OVERFLOWED)
    exponent = torch.floor(torch.log2(FP16_TARGET_MAX / largest)).clamp(*FP16_SCALE_EXPONENTS)
    scale = torch.exp2(exponent)
    scaled = torch.autograd.grad(loss.float() * scale, param, retain_graph=True)[0].float()
    norm = torch.linalg.vector_norm(scaled) / scale
    return torch.where(torch.isfinite(norm), norm, torch.linalg.vector_norm(probe))
