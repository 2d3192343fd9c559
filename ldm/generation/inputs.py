"""The pipeline's tensor inputs, checked and converted: init images, masks, x_T and prompt embeddings.

Each function raises ValueError whose message starts with the argument's name and says what would be valid,
so a bad call fails before any sampling work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from conditioning.tokenizer import validate_prompts

IMAGE_FORMS = "a PIL image, a list of PIL images, an (H, W, 3) / (B, H, W, 3) array, or a (B, 3, H, W) tensor in [0, 1]"
MASK_FORMS = "a PIL image, a list of them, an (H, W) / (B, H, W) array, or a (B, 1, H, W) tensor in [0, 1]"


def image_batch(image: object, name: str = "image") -> torch.Tensor:
    """`image` as a float32 (B, 3, H, W) tensor in [0, 1]. uint8 arrays are divided by 255."""
    batch = _as_batch(image, name, IMAGE_FORMS, mode="RGB")
    if batch.ndim == 3 and batch.shape[0] == 3:  # one (3, H, W) image
        batch = batch.unsqueeze(0)
    if batch.ndim == 4 and batch.shape[1] != 3 and batch.shape[-1] == 3:  # (B, H, W, 3) from arrays and PIL
        batch = batch.permute(0, 3, 1, 2)
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"{name}: must be {IMAGE_FORMS}; got a tensor of shape {tuple(batch.shape)}")
    return _in_unit_range(batch, name)


def mask_batch(mask: object, size: tuple[int, int], name: str = "mask_image") -> torch.Tensor:
    """`mask` as a float32 (B, 1, H, W) tensor in [0, 1] (1 = repaint), of the init image's (H, W) = `size`."""
    batch = _as_batch(mask, name, MASK_FORMS, mode="L")
    if batch.ndim == 3:  # (B, H, W) from arrays and PIL
        batch = batch.unsqueeze(1)
    if batch.ndim != 4 or batch.shape[1] != 1:
        raise ValueError(f"{name}: must be {MASK_FORMS}; got a tensor of shape {tuple(batch.shape)}")
    if tuple(batch.shape[-2:]) != tuple(size):
        raise ValueError(
            f"{name}: is {batch.shape[-2]}x{batch.shape[-1]} (HxW) but the image is {size[0]}x{size[1]}; "
            "give a mask of the image's size"
        )
    return _in_unit_range(batch, name)


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """The pixel mask (B, 1, H, W) on the latent grid (B, 1, H / f, W / f): a latent cell is repainted when any
    of its f x f pixels is (mask >= 0.5), so no pixel the user marked keeps its old content."""
    return F.max_pool2d((mask >= 0.5).float(), kernel_size=factor)


def match_batch(tensor: torch.Tensor, batch: int, per_prompt: int, name: str) -> torch.Tensor:
    """Rows for every image: one row for all, one per prompt (repeated per image), or one per image."""
    rows = tensor.shape[0]
    if rows == batch:
        return tensor
    if rows == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    if rows * per_prompt == batch:
        return tensor.repeat_interleave(per_prompt, dim=0)
    raise ValueError(
        f"{name}: has {rows} items for {batch // per_prompt} prompts x {per_prompt} images; "
        "give 1, one per prompt, or one per image"
    )


def check_latents(latents: object, shape: tuple[int, ...]) -> torch.Tensor:
    """`latents` (x_T) must be a floating tensor of the call's latent shape (B, C, h, w)."""
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise ValueError(f"latents: must be a floating-point tensor of shape {shape}, got {type(latents).__name__}")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(
            f"latents: has shape {tuple(latents.shape)} but this call draws {shape} "
            "(prompts x images per prompt, latent channels, height / f, width / f)"
        )
    return latents


def check_embeddings(embeddings: object, name: str, width: int) -> torch.Tensor:
    """Prompt embeddings must be a floating (P, L, D) tensor with D the text encoder's width."""
    if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point() or embeddings.ndim != 3:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"{name}: must be a floating-point (prompts, tokens, {width}) tensor, got {shape}")
    if embeddings.shape[-1] != width:
        raise ValueError(f"{name}: has width {embeddings.shape[-1]} but the text encoder's is {width}")
    return embeddings


def check_prompts(prompt: object, negative_prompt: object) -> None:
    """Prompts are str or lists of str; a list of negative prompts has one per prompt."""
    prompts = validate_prompts(prompt, name="prompt")
    if negative_prompt is not None:
        negatives = validate_prompts(negative_prompt, name="negative_prompt")
        if not isinstance(negative_prompt, str) and len(negatives) != len(prompts):
            raise ValueError(
                f"negative_prompt: has {len(negatives)} prompts for {len(prompts)} prompts; "
                "give one str for all, or a list with one per prompt"
            )


def embeddings_for_guidance(
    prompt_embeds: object, negative_prompt_embeds: object, unconditional: torch.Tensor | None, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) from given embeddings; without negatives, `unconditional` (the "" embedding, (1, L, D))
    serves every prompt. The two must have the same number of tokens (they share one batched U-Net pass)."""
    cond = check_embeddings(prompt_embeds, "prompt_embeds", width)
    if negative_prompt_embeds is None:
        uncond = unconditional
    else:
        uncond = check_embeddings(negative_prompt_embeds, "negative_prompt_embeds", width)
    if uncond.shape[1] != cond.shape[1]:
        raise ValueError(f"negative_prompt_embeds: has {uncond.shape[1]} tokens but prompt_embeds has {cond.shape[1]}")
    uncond = match_batch(uncond.to(cond.device), cond.shape[0], 1, "negative_prompt_embeds")
    return cond, uncond


def _as_batch(value: object, name: str, forms: str, mode: str) -> torch.Tensor:
    """A tensor from PIL image(s), array(s) or a tensor; channel order is left for the caller."""
    if isinstance(value, Image.Image):
        value = [value]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not value or not all(isinstance(item, Image.Image) for item in value):
            raise ValueError(f"{name}: a list must hold PIL images only, got {[type(v).__name__ for v in value]}")
        sizes = {item.size for item in value}
        if len(sizes) > 1:
            raise ValueError(f"{name}: the images have different sizes {sorted(sizes)}; give images of one size")
        value = np.stack([np.asarray(item.convert(mode)) for item in value])
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint8:
            value = value.astype(np.float32) / 255.0
        elif not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{name}: an array must be uint8 or float, got {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if value.ndim in (2, 3) and (mode == "L") == (value.ndim == 2):
            value = value.unsqueeze(0)  # one image
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: must be {forms}; got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name}: a tensor must be floating point with values in [0, 1], got {value.dtype}")
    return value.float()


def _in_unit_range(batch: torch.Tensor, name: str) -> torch.Tensor:
    low, high = batch.min().item(), batch.max().item()  # once per call, before sampling
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(f"{name}: values must lie in [0, 1], got [{low:.3g}, {high:.3g}]")
    return batch
