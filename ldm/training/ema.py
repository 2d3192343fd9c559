"""An exponential moving average of a model's weights, used for sampling (as in DDPM, LDM and DiT)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from ldm.training.distributed import placed_like, whole


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weights, after every optimizer step.

    With `warmup`, the decay ramps up as min(decay, (1 + n) / (10 + n)) over the n updates so far, so the
    average forgets the random initialization quickly (the schedule diffusers' EMAModel calls warmup-free
    "inverse gamma" at power 1; LDM uses the same form). `save` / `load` keep it in a checkpoint as
    safetensors (accelerate's custom-object checkpoints are pickles).

    Under FSDP the model's parameters are sharded DTensors, and so is the average: each process averages its
    own shard of each parameter, so an update needs no communication and the average costs each GPU its share
    of the weights, not all of them. `gathered()` makes it whole (for a checkpoint); `load` re-shards it.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self._counted = 0  # updates counted on the host
        self._uncounted: torch.Tensor | None = None  # updates counted on the device since (see `update`)
        # Only what trains: a frozen parameter's average is itself. Fixed by name now, because sampling
        # pipelines switch requires_grad off and on again later.
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.tracked(model)]

    def tracked(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters of `model` this average follows, in the shadow's order."""
        params = dict(model.named_parameters())
        return [params[name] for name in self.names]

    @property
    def num_updates(self) -> int:
        """How many updates the average has taken (reads the device count: a host sync)."""
        if self._uncounted is not None:
            self._counted += int(self._uncounted)
            self._uncounted = None
        return self._counted

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self._counted, self._uncounted = value, None

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module, applied: bool | torch.Tensor = True) -> None:
        """Fold the model's current weights into the average, if the optimizer `applied` its update.

        `applied` may be a 0-dim bool tensor on the device (the guard's decision there): the average then
        moves by (1 - decay) * applied, with the warmup's decay and the update count kept on the device too,
        so no step waits for the host to read the flag.
        """
        params = [p.detach().float() for p in self.tracked(model)]
        if not isinstance(applied, torch.Tensor):
            if applied:
                torch._foreach_lerp_(self.shadow, params, 1.0 - self.current_decay())  # s += (1 - d) (p - s)
                self.num_updates += 1
            return
        taken = applied.to(torch.float32)
        if self._uncounted is None:
            self._uncounted = torch.zeros((), dtype=torch.float32, device=taken.device)
        weight = (1.0 - self._device_decay()) * taken
        torch._foreach_lerp_(self.shadow, params, [weight] * len(params))
        self._uncounted += taken

    def _device_decay(self) -> torch.Tensor:
        """`current_decay` as a device tensor, from the host count plus the device count."""
        n = self._uncounted + self._counted
        if not self.warmup:
            return torch.full_like(n, self.decay)
        return torch.clamp((1 + n) / (10 + n), max=self.decay)

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

    def gathered(self) -> EMA:
        """This average with whole tensors: itself when unsharded; under FSDP a copy on the CPU, gathered from
        every process's shards (a collective: every process must call it, though usually only one saves it)."""
        if not self.sharded:
            return self
        gathered = copy.copy(self)
        gathered.shadow = [whole(s).cpu() for s in self.shadow]  # one parameter at a time on the device
        return gathered

    @property
    def sharded(self) -> bool:
        """Whether each process holds only its shard of the average (FSDP)."""
        return any(isinstance(s, DTensor) for s in self.shadow)

    def save(self, path: str | Path) -> None:
        """Write the average and its update count to a safetensors file (no pickle in checkpoints)."""
        if self.sharded:
            raise RuntimeError(f"{path}: this EMA is sharded (FSDP); save its gathered() copy (every process gathers)")
        tensors = {f"shadow.{i}": s.contiguous() for i, s in enumerate(self.shadow)}
        save_file(tensors, str(path), metadata={"decay": str(self.decay), "num_updates": str(self.num_updates)})

    def load(self, path: str | Path) -> None:
        """Restore what `save` wrote: one whole tensor per parameter of this EMA's model, sharded as the
        average is here (so a checkpoint resumes on any number of processes)."""
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            if keys != {f"shadow.{i}" for i in range(len(self.shadow))}:
                raise ValueError(f"{path}: holds {len(keys)} EMA tensors, this model has {len(self.shadow)} parameters")
            shadow = [f.get_tensor(f"shadow.{i}") for i in range(len(self.shadow))]
        for i, (saved, current) in enumerate(zip(shadow, self.shadow, strict=True)):
            if saved.shape != current.shape:
                shapes = f"{tuple(saved.shape)}, this model's parameter {tuple(current.shape)}"
                raise ValueError(f"{path}: shadow.{i} has shape {shapes}")
        self.shadow = [placed_like(s, t) for s, t in zip(shadow, self.shadow, strict=True)]
        self.decay = float(metadata["decay"])
        self.num_updates = int(metadata["num_updates"])
