"""U-Net LoRA weights in diffusers' format: `pytorch_lora_weights.safetensors`, the file
`StableDiffusionPipeline.load_lora_weights` reads and `save_lora_weights` writes.

The keys are the U-Net's module paths under `unet.` (`unet.down_blocks.0...to_q.lora.down.weight` for A,
`...lora.up.weight` for B); the header's `lora_adapter_metadata` records rank, alpha and the adapted modules,
so an alpha other than the rank survives the round trip (without it diffusers assumes alpha = rank). Files
from other trainers (kohya's `lora_unet_...` keys) are converted by diffusers on reading. Only safetensors is
read: a pickled `.bin` adapter is refused, as pickled weights are everywhere in this package.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
UNET_PREFIX = StableDiffusionLoraLoaderMixin.unet_name  # "unet"
TRAINED_ADAPTER = "default"  # peft's name for the adapter `add_adapter` adds, which training uses


def lora_file(path: str | Path) -> Path:
    """The adapter file `path` names: the file itself, or `pytorch_lora_weights.safetensors` in a folder.
    FileNotFoundError / ValueError naming `path` when there is none or it is not safetensors."""
    path = Path(path)
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        where = f"holds no {LORA_WEIGHT_NAME}" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{path}: {where} (give a .safetensors file or a folder with {LORA_WEIGHT_NAME})")
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: is not a .safetensors file (pickled adapters are not loaded)")
    return file


def unet_lora_state_dict(unet: UNet2DConditionModel, adapter_name: str = TRAINED_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter `adapter_name` of `unet` in diffusers' key format (without the `unet.` prefix)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return convert_state_dict_to_diffusers({k: v.detach().contiguous() for k, v in peft_state.items()})


def adapter_metadata(unet: UNet2DConditionModel, adapter_name: str = TRAINED_ADAPTER) -> dict[str, object]:
    """What a reader needs to rebuild the adapter's peft LoraConfig: rank, alpha, adapted modules. Only these
    keys, so that an older peft (which rejects keys it does not know) still reads the file."""
    config = unet.peft_config[adapter_name]
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}


def save_unet_lora(unet: UNet2DConditionModel, folder: str | Path, adapter_name: str = TRAINED_ADAPTER) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` (diffusers' format, with the adapter's metadata)."""
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(folder),
        unet_lora_layers=unet_lora_state_dict(unet, adapter_name),
        safe_serialization=True,
        unet_lora_adapter_metadata=adapter_metadata(unet, adapter_name),
    )
    return Path(folder) / LORA_WEIGHT_NAME


def read_unet_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict | None]:
    """(state dict, network alphas, metadata) of the U-Net adapter in the file `path` names, as diffusers'
    `lora_state_dict` reads it (keys keep their `unet.` prefix). ValueError when it holds no U-Net layers or
    also text-encoder layers, which this package does not load."""
    file = lora_file(path)
    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(file.parent), weight_name=file.name, use_safetensors=True, return_lora_metadata=True
    )
    others = sorted({key.split(".")[0] for key in state if not key.startswith(f"{UNET_PREFIX}.")})
    if others:
        raise ValueError(f"{file}: also adapts {', '.join(others)}; only U-Net LoRA weights are supported")
    if not state:
        raise ValueError(f"{file}: holds no U-Net LoRA weights")
    return state, alphas, metadata


def load_unet_lora(unet: UNet2DConditionModel, path: str | Path, adapter_name: str | None = None) -> str:
    """Add the adapter in `path` to `unet` (diffusers' `load_lora_into_unet`, through peft); returns its name."""
    state, alphas, metadata = read_unet_lora(path)
    names_before = set(getattr(unet, "peft_config", {}))
    if adapter_name is not None and adapter_name in names_before:
        raise ValueError(f"adapter_name: {adapter_name!r} is already loaded; unload it or choose another name")
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(
        state, alphas, unet, adapter_name=adapter_name, metadata=metadata
    )
    (name,) = set(unet.peft_config) - names_before
    return name
