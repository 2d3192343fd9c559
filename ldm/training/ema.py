"""An exponential moving average of a model's weights, used for sampling (as in DDPM, LDM and DiT)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weights, after every optimizer step.

    With `warmup`, the decay ramps up as min(decay, (1 + n) / (10 + n)) over the n updates so far, so the
    average forgets the random initialization quickly (the schedule diffusers' EMAModel calls warmup-free
    "inverse gamma" at power 1; LDM uses the same form). `save` / `load` keep it in a checkpoint as
    safetensors (accelerate's custom-object checkpoints are pickles).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        # Only what trains: a frozen parameter's average is itself. Fixed by name now, because sampling
        # pipelines switch requires_grad off and on again later.
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.tracked(model)]

    def tracked(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters of `model` this average follows, in the shadow's order."""
        params = dict(model.named_parameters())
        return [params[name] for name in self.names]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        decay = self.current_decay()
        params = [p.detach().float() for p in self.tracked(model)]
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)  # shadow += (1 - decay) * (p - shadow)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model`."""
        for p, s in zip(self.tracked(model), self.shadow, strict=True):
            p.copy_(s.to(p.dtype))

    @contextmanager
    def averaged(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block `model` holds the averaged weights; its own weights come back afterwards."""
        backup = [p.detach().clone() for p in self.tracked(model)]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(self.tracked(model), backup, strict=True):
                    p.copy_(b)

    def to(self, device: torch.device | str) -> EMA:
        """Keep the average on `device` (where the model trains, so updates need no transfer)."""
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def save(self, path: str | Path) -> None:
        """Write the average and its update count to a safetensors file (no pickle in checkpoints)."""
        tensors = {f"shadow.{i}": s.contiguous() for i, s in enumerate(self.shadow)}
        save_file(tensors, str(path), metadata={"decay": str(self.decay), "num_updates": str(self.num_updates)})

    def load(self, path: str | Path) -> None:
        """Restore what `save` wrote; the file must hold one tensor per parameter of this EMA's model."""
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            if keys != {f"shadow.{i}" for i in range(len(self.shadow))}:
                raise ValueError(f"{path}: holds {len(keys)} EMA tensors, this model has {len(self.shadow)} parameters")
            shadow = [f.get_tensor(f"shadow.{i}") for i in range(len(self.shadow))]
        self.shadow = [s.to(t.device, t.dtype) for s, t in zip(shadow, self.shadow, strict=True)]
        self.decay = float(metadata["decay"])
        self.num_updates = int(metadata["num_updates"])
