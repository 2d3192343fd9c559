"""Faults a long run must survive: non-finite updates and preemption signals (SIGTERM / SIGINT).

Every decision is taken identically on all processes: each flag is reduced across ranks before use.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType, TracebackType

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ldm.training.distributed import whole

logger = logging.getLogger(__name__)


def any_process(accelerator: Accelerator, flag: bool | Tensor) -> bool:
    """Whether `flag` holds on at least one process (a collective: every rank must call it)."""
    return any_processes(accelerator, flag)[0]


def any_processes(accelerator: Accelerator, *flags: bool | Tensor) -> list[bool]:
    """For each flag, whether it holds on at least one process, in one collective (every rank must call it)."""
    device = accelerator.device
    values = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=device).reshape(()) for f in flags])
    return [bool(v > 0) for v in accelerator.reduce(values, "sum").tolist()]


def grad_norm(accelerator: Accelerator, params: Iterable[nn.Parameter], clip: float | None = None) -> Tensor:
    """The total L2 norm of the gradients, clipped to `clip` by accelerate when given (as before).

    Without clipping the norm is computed from the gradients, which stay untouched.
    """
    params = list(params)
    if clip is not None:
        return whole(torch.as_tensor(accelerator.clip_grad_norm_(params, clip)))  # FSDP: a DTensor, made whole
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=accelerator.device)
    return whole(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


class NonFiniteGuard:
    """Skips an update whose loss or gradient norm is not finite, counts it, and stops the run after
    `limit` steps in a row with a skipped update.

    Without a loss scaler the whole decision stays on the device: the "skip" flag (reduced over processes
    on the device) is handed to a fused Adam/AdamW as its `found_inf`, and the fused kernel leaves the
    weights, moments and step count untouched when it is set, so no step waits for the host. The counters
    are device tensors read only by `check` (at log and checkpoint steps and at the end), so a streak is
    noticed at the next check, while the skipped updates have already changed nothing. Other optimizers
    and fp16 loss scaling (where accelerate reads the scale on the host every step anyway) decide on the host.

    Under fp16 loss scaling, a finite loss whose scaled gradient overflows is the scaler's normal search for
    its scale (it overflows a few times at start-up): the update is skipped and the scale halved, but the
    step is counted in `overflows`, not as a non-finite step, while the scale is above 1.

    Per micro-batch: `watch(name, loss)`; at the step where gradients sync: `apply(...)` steps the
    optimizer or skips it, and returns whether it stepped (a bool, or a device bool tensor); after the
    optimizer step: `end_step()`; at a log or checkpoint step: `check(step)` warns and raises.
    """

    def __init__(self, limit: int, key: str = "train.max_nonfinite_steps") -> None:
        self.limit, self.key = limit, key
        self.total = 0  # steps with a skipped update, over the whole run (resumes included), as of the last check
        self.streak = 0  # ... in a row, up to the last check
        self.overflows = 0  # fp16 loss-scaler overflows (skipped updates that are not counted above)
        self._bad_loss: dict[str, Tensor] = {}
        self._skipped: list[Tensor] = []  # this step's skip flags (device bool tensors)
        self._skips_by_name: dict[str, int | Tensor] = {}  # skipped updates per name since the last check
        self._pending: Tensor | None = None  # (new skipped steps, streak, longest streak) since the last check

    def watch(self, name: str, loss: Tensor) -> None:
        """Remember whether the loss of update `name` was non-finite in any micro-batch since its last step."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss[name] = bad | self._bad_loss[name] if name in self._bad_loss else bad

    def apply(
        self,
        accelerator: Accelerator,
        name: str,
        optimizer: torch.optim.Optimizer,
        params: Iterable[nn.Parameter],
        clip: float | None = None,
    ) -> bool | Tensor:
        """At a sync step: step `optimizer` if its losses and gradient norm are finite everywhere; else skip.

        Returns whether it stepped: a device bool tensor when decided on the device, else a bool. Either way
        the gradients are zeroed.
        """
        norm = grad_norm(accelerator, params, clip)
        bad_loss = self._bad_loss.pop(name, torch.zeros((), dtype=torch.bool, device=norm.device))
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper steps this one
        if accelerator.scaler is None and _skips_on_device(inner):
            skip = any_process_on_device(accelerator, bad_loss | ~torch.isfinite(norm))
            inner.found_inf = skip.float()  # the fused kernel's own skip, as under a GradScaler
            try:
                optimizer.step()
            finally:
                del inner.found_inf
            optimizer.zero_grad(set_to_none=True)
            self._skipped.append(skip)
            self._skips_by_name[name] = self._skips_by_name.get(name, 0) + skip.long()
            return ~skip
        return self._apply_on_host(accelerator, name, optimizer, norm, bad_loss)

    def _apply_on_host(
        self, accelerator: Accelerator, name: str, optimizer: torch.optim.Optimizer, norm: Tensor, bad_loss: Tensor
    ) -> bool:
        bad_loss, bad_grad = any_processes(accelerator, bad_loss, ~torch.isfinite(norm))
        skip, scaler = bad_loss or bad_grad, accelerator.scaler
        overflow = skip and scaler is not None and not bad_loss and scaler.get_scale() > 1.0
        if skip and scaler is not None:  # fp16: back off the scale as the scaler's own skip would
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        if overflow:
            self.overflows += 1
            logger.info("%s: fp16 gradient overflow, loss scale now %g (update skipped)", name, scaler.get_scale())
        else:
            self._skipped.append(torch.full((), skip, dtype=torch.bool, device=norm.device))
            if skip:
                self._skips_by_name[name] = self._skips_by_name.get(name, 0) + 1
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return not skip

    def end_step(self) -> None:
        """Fold this step's skip flags into the device counters (no host sync)."""
        flags, self._skipped = self._skipped, []
        if not flags:  # every update was lost to the scaler's search: neither breaks nor extends a streak
            return
        any_skipped = torch.stack(flags).any().long()
        if self._pending is None:  # made on the device from a Python scalar: no copy from the host
            self._pending = torch.full((3,), self.streak, dtype=torch.long, device=any_skipped.device)
            self._pending[0].zero_()
        new, streak, longest = self._pending.unbind()
        streak = (streak + 1) * any_skipped  # reset by a step without a skipped update
        self._pending = torch.stack([new + any_skipped, streak, torch.maximum(longest, streak)])

    def check(self, step: int) -> None:
        """Read the counters (a host sync: call it at log and checkpoint steps); warn about skipped updates
        since the last check and raise RuntimeError once `limit` steps in a row skipped one."""
        if self._pending is None:
            return
        new, self.streak, longest = (int(v) for v in self._pending.tolist())
        self._pending = None
        by_name, self._skips_by_name = self._skips_by_name, {}
        names = [name for name, count in by_name.items() if int(count)]  # read with the counters
        if not new:
            return
        self.total += new
        logger.warning(
            "up to step %d: %d step(s) with a non-finite loss or gradient skipped their update%s "
            "(%d in all, %d in a row now; %s=%d)",
            step, new, f" ({'/'.join(names)})" if names else "", self.total, self.streak,
            self.key, self.limit,
        )  # fmt: skip
        if longest >= self.limit:
            raise RuntimeError(
                f"step {step}: {longest} steps in a row had a non-finite loss or gradient ({self.key}="
                f"{self.limit}); stopped without saving this state, the last checkpoint is the last good one. "
                "Lower the learning rate, check the data, or resume from an earlier checkpoint."
            )

    def healthy(self, step: int) -> bool:
        """Whether the last step's updates all happened (scheduled checkpoints are written only then); reads
        the counters (see `check`)."""
        self.check(step)
        return self.streak == 0

    def state_dict(self) -> dict[str, int]:
        """The counters, for trainer_state.json (call `check` first)."""
        return {"total": self.total, "streak": self.streak, "overflows": self.overflows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore what `state_dict` returned (an empty dict leaves the counters at zero)."""
        self.total, self.streak = int(state.get("total", 0)), int(state.get("streak", 0))
        self.overflows = int(state.get("overflows", 0))
        self._pending = None


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` honours a `found_inf` tensor in its step (torch's fused Adam / AdamW)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups
    )


def any_process_on_device(accelerator: Accelerator, flag: Tensor) -> Tensor:
    """`flag` (a 0-dim bool tensor) OR-ed over processes, as a device tensor (a collective, without a host sync)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(flag.float().reshape(1), "sum")[0] > 0


class StopSignal:
    """While active, SIGTERM / SIGINT (cluster preemption, Ctrl-C) ask the run to stop after the current step.

    A second signal stops at once (KeyboardInterrupt). The previous handlers come back on exit. Outside
    the main thread no handler can be installed and signals keep their previous effect.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            raise KeyboardInterrupt(f"second signal ({name}): stopping now, without a checkpoint")
        self.received = name
        logger.warning("%s received: finishing this step, then saving a checkpoint and stopping", name)

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any process received a signal (a collective: every rank must call it every step).

        The flag is a host value, so it is reduced over a CPU (gloo) process group: a GPU run's step does
        not wait for its device to tell the host what the host already knows.
        """
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)])
        torch.distributed.all_reduce(flag, group=host_group())
        return bool(flag.numpy()[0] > 0)


_HOST_GROUP: list = []


def host_group() -> torch.distributed.ProcessGroup | None:
    """A process group over the CPU (gloo) for host values: the default group when it is gloo already,
    else a gloo group over all ranks, made on first use (a collective: every rank's first call meets)."""
    if torch.distributed.get_backend() == "gloo":
        return None
    if not _HOST_GROUP:
        _HOST_GROUP.append(torch.distributed.new_group(backend="gloo"))
    return _HOST_GROUP[0]
