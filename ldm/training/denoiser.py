"""The module stage 2 optimizes: the U-Net, and the text encoder with it when that is trained too."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from conditioning import TextEncoder


class Denoiser(nn.Module):
    """`model(x_t, t, **conditioning) -> U-Net output`, the callable `ldm.diffusion`'s losses expect.

    The conditioning is either `encoder_hidden_states` (a frozen encoder's output, possibly from the
    text cache) or the `captions` themselves, which a trainable encoder (LDM trains its text transformer
    jointly with the U-Net when it starts from scratch) encodes inside this forward pass, so that
    Accelerate wraps, checkpoints, averages (EMA) and, across processes, all-reduces both as one model.
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: TextEncoder | None = None) -> None:
        super().__init__()
        if text_encoder is not None and text_encoder.frozen:
            raise ValueError("text_encoder: a frozen encoder is not trained; pass it to the batches, not here")
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> torch.Tensor:
        if captions is not None:
            if self.text_encoder is None:
                raise ValueError("captions: this denoiser has no trainable text encoder; pass encoder_hidden_states")
            encoder_hidden_states = self.text_encoder.encode(captions).to(x.dtype)
        if encoder_hidden_states is None:
            raise ValueError("encoder_hidden_states: required (or captions, with a trainable text encoder)")
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample
