"""Count host round trips: the ops that, on a GPU, stall the host or copy data from it.

    with HostRoundTrips() as trips:
        one_sampling_step()
    assert trips.total == 0, str(trips)  # str: pytest shortens the repr of a message object

It watches which aten ops run and on which devices, not timings, so it runs on the CPU. Three kinds:
- `syncs`: ops whose result the host waits for on an accelerator: `.item()`, `bool(t)`, `int(t)`,
  `float(t)` and indexing with a 0-dim tensor (`aten._local_scalar_dense`), ops whose output size
  depends on the data (nonzero, masked_select, boolean indexing, unique, repeat_interleave without
  output_size, bincount, histc), ops that return a Python bool (equal, allclose), and linalg's
  error checks.
- `host_data`: tensors made from Python or numpy data; `torch.tensor`, `torch.as_tensor`,
  `torch.from_numpy` and `Tensor.new_tensor` all dispatch `aten.lift_fresh`. On a GPU each is a
  host-to-device copy. Ops that fill a tensor on its device (torch.full, zeros, arange, randn) are not.
- `cross_device_copies`: `.to` / `_to_copy` / `copy_` between two devices, and ops given tensors on
  two devices (which copy implicitly), keyed "op src->dst" or "op dev1+dev2".

Under `torch.inference_mode()` (the pipeline's `__call__`) composite ops reach the mode whole, not
decomposed: `.item()` is `aten.item`, `bool(t)` `aten.is_nonzero`, `.to(device)` `aten.to.*`. Those are
listed too; a sync hidden inside another composite op's C++ code would be missed there.

What a CPU-only run cannot see: `.to("cpu")` of a CPU tensor is no copy, and `.tolist()` / `.numpy()`
of a CPU tensor read its memory without dispatching a copy. Run the same code on the `meta` device to
see those (as cpu->meta / meta->cpu copies). The meta run is blind to `torch.tensor(data, device="meta")`,
which the CPU run counts as host data; the two runs together cover each other.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

SYNC_OPS = frozenset(
    {
        aten._local_scalar_dense,
        aten.item,  # composite: seen whole under inference_mode
        aten.is_nonzero,  # bool(t), composite
        aten.nonzero,
        aten.nonzero_numpy,
        aten.argwhere,
        aten.masked_select,
        aten._unique,
        aten._unique2,
        aten.unique_consecutive,
        aten.unique_dim,
        aten.unique_dim_consecutive,
        aten.equal,
        aten.allclose,
        aten.bincount,
        aten.histc,  # computes min / max on the host when they are not given
        aten._linalg_check_errors,
    }
)
SYNC_OVERLOADS = frozenset(
    {
        aten.where.default,  # torch.where(condition) is nonzero
        aten.narrow.Tensor,  # a tensor start is read on the host
    }
)
INDEXING_OPS = frozenset({aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_})
HOST_DATA_OPS = frozenset({aten.lift, aten.lift_fresh, aten.lift_fresh_copy})
MOVE_OPS = frozenset({aten._to_copy, aten.to})  # (src, ..., device=...) or to.device / to.other
COPY_OPS = frozenset({aten.copy_, aten.copy, aten._copy_from, aten._copy_from_and_resize})  # (dst, src, ...)

_THIS_FILE = str(Path(__file__).resolve())
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class HostRoundTrips(TorchDispatchMode):
    """A dispatch mode counting the host round trips of the ops run inside it (see the module docstring).

    `syncs`, `host_data` and `cross_device_copies` are Counters of aten op names; `origins` counts each
    of them by the source line outside torch that ran it ("op at file:line"), for the failure message.
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()
        self.host_data: Counter[str] = Counter()
        self.cross_device_copies: Counter[str] = Counter()
        self.origins: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """How many round trips were counted, of all three kinds."""
        return sum(self.syncs.values()) + sum(self.host_data.values()) + sum(self.cross_device_copies.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._record(func, args, kwargs)  # before running: an op that fails on meta is still counted
        return func(*args, **kwargs)

    def __str__(self) -> str:
        kinds = {"syncs": self.syncs, "host_data": self.host_data, "cross_device_copies": self.cross_device_copies}
        lines = [f"{kind}: {dict(counts)}" for kind, counts in kinds.items()]
        lines += [f"  {origin}: {count}" for origin, count in self.origins.items()]
        return "\n".join(lines)

    __repr__ = __str__

    def _record(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict[str, Any]) -> None:
        name = str(func)
        if _is_sync(func, args, kwargs):
            self._count(self.syncs, name)
        if func.overloadpacket in HOST_DATA_OPS:
            self._count(self.host_data, name)
        copy = _cross_device(func, args, kwargs)
        if copy is not None:
            self._count(self.cross_device_copies, f"{name} {copy}")

    def _count(self, counts: Counter[str], key: str) -> None:
        counts[key] += 1
        self.origins[f"{key} at {_caller()}"] += 1


def _is_sync(func: torch._ops.OpOverload, args: tuple, kwargs: dict[str, Any]) -> bool:
    packet = func.overloadpacket
    if packet in SYNC_OPS or func in SYNC_OVERLOADS:
        return True
    if packet in INDEXING_OPS:  # a boolean mask is a nonzero in disguise
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if packet is aten.repeat_interleave:  # the output's length is the sum of the repeats, unless given
        repeats_is_tensor = func._overloadname in ("Tensor", "self_Tensor")
        return repeats_is_tensor and kwargs.get("output_size") is None
    return False


def _cross_device(func: torch._ops.OpOverload, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """'src->dst' for a copy between devices, 'a+b' for an op mixing devices, None otherwise."""
    packet = func.overloadpacket
    if packet in MOVE_OPS:
        src = args[0].device
        dst = _move_destination(args, kwargs) or src
        return None if _same_device(src, dst) else f"{src.type}->{dst.type}"
    if packet in COPY_OPS:
        dst, src = args[0].device, args[1].device
        return None if _same_device(src, dst) else f"{src.type}->{dst.type}"
    # A 0-dim CPU tensor next to a device tensor is read on the host as a scalar: no copy.
    tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
    devices = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.ndim == 0)}
    return "+".join(sorted(devices)) if len(devices) > 1 else None


def _move_destination(args: tuple, kwargs: dict[str, Any]) -> torch.device | None:
    """Where `_to_copy` / `to` sends its input: the device keyword, a device argument (to.device), or
    the device of a tensor argument (to.other); None when only the dtype changes."""
    for value in (kwargs.get("device"), *args[1:]):
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, (torch.device, str)):
            return torch.device(value)
    return None


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _caller() -> str:
    """The innermost 'file:line' outside torch and this file: where the round trip was asked for."""
    for frame in reversed(traceback.extract_stack()):
        path = str(Path(frame.filename).resolve())
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


class StepWindows:
    """A sampler `callback` that counts every step after the first in a `HostRoundTrips` window of its own.

    The first step is the warm-up. Window k runs from the callback of step k to that of step k + 1, so it
    holds exactly one step: the loop's bookkeeping, the model call and the update. `then` is called too
    (outside the windows), to keep a callback the sampler was given. Use it as a context manager, so that
    a step that raises still closes its window.
    """

    def __init__(self) -> None:
        self.steps: list[HostRoundTrips] = []
        self.then: Callable[..., None] | None = None
        self._open: HostRoundTrips | None = None

    def __call__(self, index: int, t: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
        self._close()
        if self.then is not None:
            self.then(index, t, x, pred_x0)
        if index > 0:  # the sampler walks indices down to 0: another step follows
            self._open = HostRoundTrips().__enter__()
            self.steps.append(self._open)

    def __enter__(self) -> StepWindows:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None
