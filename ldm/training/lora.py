"""LoRA fine-tuning of the U-Net with peft, as diffusers' train_text_to_image_lora.py does it.

The U-Net's weights are frozen and a low-rank adapter (`unet.lora`) is added to its attention projections;
only the adapter trains, so the optimizer, the EMA (both follow requires_grad) and the gradients are the
adapter's size. What the stage does differently, kept here:
- `add_lora`: freeze the U-Net, add the adapter, the same draw on every process;
- `check_lora`: LoRA under FSDP, refused by name (the config refuses it beside a trained text encoder);
- `LoRACheckpoint`: a checkpoint holds the adapter (diffusers' `pytorch_lora_weights.safetensors`, the format
  of the export) instead of accelerate's `model.safetensors` with every base weight; the base is rebuilt from
  the config (the `pretrained` folder, or the seeded init of a fresh U-Net) when the run resumes;
- `fused_unet`: the export's plain UNet2DConditionModel with the adapter merged into its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, init_empty_weights
from accelerate.utils import DistributedType
from diffusers import UNet2DConditionModel
from torch import nn

from ldm.generation.lora_weights import LORA_WEIGHT_NAME, TRAINED_ADAPTER, UNET_PREFIX, adapter_metadata, read_unet_lora
from ldm.generation.lora_weights import save_unet_lora as save_adapter
from ldm.unet import LoRAConfig

__all__ = [
    "LoRACheckpoint",
    "add_lora",
    "check_lora",
    "fused_unet",
    "is_adapter_parameter",
    "parameter_counts",
    "save_adapter",
]


def check_lora(lora: LoRAConfig | None, accelerator: Accelerator) -> None:
    """ValueError naming `unet.lora` when the run's distribution cannot hold an adapter-only run (FSDP). The config
    itself refuses LoRA beside a trained text encoder (`DiffusionExperimentConfig`)."""
    if lora is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "unet.lora: not supported under FSDP: accelerate's FSDP checkpoints write the whole sharded U-Net, not "
            "the adapter, and the export merges an unsharded one. The frozen base needs no optimizer state, so "
            "DDP (configs/accelerate/multi_gpu.yaml) fits where the full fine-tuning needed FSDP"
        )


def add_lora(unet: UNet2DConditionModel, lora: LoRAConfig, seed: int) -> None:
    """Freeze `unet` and add the peft adapter `lora` describes (A normal with std 1/r, B = 0: the U-Net's output is
    unchanged until B trains), in place. Only the adapter's parameters then require gradients.

    Drawn from `seed` on a forked RNG, so every process builds the same A (DDP would broadcast rank 0's anyway)
    and the caller's random stream is untouched."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.resolved_alpha,
        target_modules=list(lora.target_modules),
        init_lora_weights="gaussian",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            unet.add_adapter(config, adapter_name=TRAINED_ADAPTER)
        except ValueError as err:  # peft: "Target modules {...} not found in the base model"
            raise ValueError(f"unet.lora.target_modules: {lora.target_modules} ({err})") from err
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(is_adapter_parameter(name))


def is_adapter_parameter(name: str) -> bool:
    """Whether the parameter called `name` belongs to a LoRA adapter (peft names them lora_A / lora_B ...)."""
    return ".lora_" in name


def parameter_counts(denoiser: nn.Module) -> dict[str, int]:
    """`trainable_parameters`: the weights of `denoiser` that train (those requiring gradients: with `unet.lora`
    the adapter's); `unet_parameters`: the U-Net's own weights, an adapter's not counted, so that a LoRA run and a
    full fine-tuning of the same U-Net report the same total."""
    unet = denoiser.get_submodule("unet")
    return {
        "trainable_parameters": sum(p.numel() for p in denoiser.parameters() if p.requires_grad),
        "unet_parameters": sum(p.numel() for name, p in unet.named_parameters() if not is_adapter_parameter(name)),
    }


class LoRACheckpoint:
    """accelerate save / load pre-hooks that put the adapter in a checkpoint instead of the whole model.

    On save, the model's entry in accelerate's list of state dicts is dropped (no `model.safetensors`) and the
    main process writes `pytorch_lora_weights.safetensors` beside the optimizer state; on load, the model is
    taken off accelerate's list and the adapter is copied into its parameters in place (the optimizer holds
    them). The values are float32 and only renamed on the way, so a resumed run continues bitwise.
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, unet: UNet2DConditionModel) -> None:
        self.accelerator, self.model, self.unet = accelerator, model, unet  # `unet` carries the adapter
        accelerator.register_save_state_pre_hook(self.save)
        accelerator.register_load_state_pre_hook(self.load)

    def index_in(self, models: list[nn.Module]) -> int:
        """The position of the trained model among accelerate's prepared models (as wrapped by DDP or not)."""
        matches = [i for i, m in enumerate(models) if self.accelerator.unwrap_model(m) is self.model]
        if len(matches) != 1:
            raise RuntimeError("unet.lora: the trained model is not among accelerate's prepared models")
        return matches[0]

    def save(self, models: list[nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
        """accelerate's save pre-hook (every process): the adapter file instead of the model's state dict."""
        weights.pop(self.index_in(models))  # `models` is accelerate's own list: left as it is
        if self.accelerator.is_main_process:
            save_adapter(self.unet, output_dir)

    def load(self, models: list[nn.Module], input_dir: str) -> None:
        """accelerate's load pre-hook: the adapter from the checkpoint, checked against `unet.lora`."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        models.pop(self.index_in(models))  # a copy of accelerate's list: it then loads no model.safetensors
        folder = Path(input_dir)
        if not (folder / LORA_WEIGHT_NAME).is_file():
            raise FileNotFoundError(
                f"{folder}: holds no {LORA_WEIGHT_NAME}; it is not the checkpoint of a unet.lora run (resume a "
                "full fine-tuning checkpoint without unet.lora)"
            )
        state, _, metadata = read_unet_lora(folder)
        saved = {k.removeprefix(f"{UNET_PREFIX}."): v for k, v in (metadata or {}).items()}
        expected = adapter_metadata(self.unet)
        if {k: saved.get(k) for k in expected} != expected:
            raise ValueError(f"{folder}: the adapter was trained as {saved}, but unet.lora now says {expected}")
        state = convert_unet_state_dict_to_peft({k.removeprefix(f"{UNET_PREFIX}."): v for k, v in state.items()})
        result = set_peft_model_state_dict(self.unet, state, adapter_name=TRAINED_ADAPTER)
        missing = [k for k in result.missing_keys if is_adapter_parameter(k)]
        if result.unexpected_keys or missing:
            wrong = (result.unexpected_keys or missing)[:3]
            raise ValueError(f"{folder / LORA_WEIGHT_NAME}: does not fit this U-Net's adapter (e.g. {wrong})")


@torch.no_grad()
def fused_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A plain UNet2DConditionModel (no peft layers) with the adapter merged into its weights: W + (alpha / r) B A
    in each adapted layer (peft's `get_delta_weight`, what its own merge adds). Its other weights are `unet`'s
    tensors, shared, not copied; `unet` is left as it is (a deep copy would also drag along `unet.compile()`'s
    wrapper, which calls the original module)."""
    from peft.tuners.lora import LoraLayer

    deltas = {
        f"{name}.base_layer.weight": module.get_delta_weight(TRAINED_ADAPTER)
        for name, module in unet.named_modules()
        if isinstance(module, LoraLayer)
    }
    state = {
        key.replace(".base_layer", ""): value + deltas[key] if key in deltas else value
        for key, value in unet.state_dict().items()
        if not is_adapter_parameter(key)
    }
    with init_empty_weights():  # parameters on the meta device until `state` is assigned
        fused = UNet2DConditionModel.from_config(unet.config)
    fused.load_state_dict(state, assign=True)  # strict: every weight of the plain U-Net is accounted for
    return fused
