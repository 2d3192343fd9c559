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
        return torch.as_tensor(accelerator.clip_grad_norm_(params, clip))
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=accelerator.device)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class NonFiniteGuard:
    """Skips an update whose loss or gradient norm is not finite, counts it, and stops the run after
    `limit` steps in a row with a skipped update.

    Under fp16 loss scaling, a finite loss whose scaled gradient overflows is the scaler's normal search for
    its scale (it overflows a few times at start-up): the update is skipped and the scale halved, but the
    step is counted in `overflows`, not as a non-finite step, while the scale is above 1.

    Per micro-batch: `watch(name, loss)`; at the step where gradients sync: `apply(...)` steps the
    optimizer or, when anything was non-finite on any process, zeroes its gradients without stepping;
    after the optimizer step: `end_step(step)` counts and raises.
    """

    def __init__(self, limit: int, key: str = "train.max_nonfinite_steps") -> None:
        self.limit, self.key = limit, key
        self.total = 0  # steps with a skipped update, over the whole run (resumes included)
        self.streak = 0  # ... in a row, up to the last step
        self.overflows = 0  # fp16 loss-scaler overflows (skipped updates that are not counted above)
        self._bad_loss: dict[str, Tensor] = {}
        self._skipped: list[str] = []
        self._overflowed = False

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
    ) -> bool:
        """At a sync step: step `optimizer` if its losses and gradient norm are finite everywhere; else skip.

        Returns whether it stepped. Either way the gradients are zeroed.
        """
        norm = grad_norm(accelerator, params, clip)
        bad_loss = self._bad_loss.pop(name, torch.tensor(False, device=norm.device))
        bad_loss, bad_grad = any_processes(accelerator, bad_loss, ~torch.isfinite(norm))
        skip, scaler = bad_loss or bad_grad, accelerator.scaler
        overflow = skip and scaler is not None and not bad_loss and scaler.get_scale() > 1.0
        if skip and scaler is not None:  # fp16: back off the scale as the scaler's own skip would
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        if overflow:
            self.overflows += 1
            self._overflowed = True
            logger.info("%s: fp16 gradient overflow, loss scale now %g (update skipped)", name, scaler.get_scale())
        elif skip:
            self._skipped.append(name)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return not skip

    def end_step(self, step: int) -> None:
        """Count optimizer step `step`; raise RuntimeError once `limit` steps in a row skipped an update."""
        skipped, self._skipped = self._skipped, []
        overflowed, self._overflowed = self._overflowed, False
        if not skipped:
            if not overflowed:  # a step lost to the scaler's search neither breaks nor extends a streak
                self.streak = 0
            return
        self.total += 1
        self.streak += 1
        logger.warning(
            "step %d: non-finite loss or gradient; skipped the %s update (%d in a row, %d in all; %s=%d)",
            step, "/".join(skipped), self.streak, self.total, self.key, self.limit,
        )  # fmt: skip
        if self.streak >= self.limit:
            raise RuntimeError(
                f"step {step}: {self.streak} steps in a row had a non-finite loss or gradient ({self.key}="
                f"{self.limit}); stopped without saving this state, the last checkpoint is the last good one. "
                "Lower the learning rate, check the data, or resume from an earlier checkpoint."
            )

    @property
    def healthy(self) -> bool:
        """Whether the last step's updates all happened (scheduled checkpoints are written only then)."""
        return self.streak == 0

    def state_dict(self) -> dict[str, int]:
        """The counters, for trainer_state.json."""
        return {"total": self.total, "streak": self.streak, "overflows": self.overflows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore what `state_dict` returned (an empty dict leaves the counters at zero)."""
        self.total, self.streak = int(state.get("total", 0)), int(state.get("streak", 0))
        self.overflows = int(state.get("overflows", 0))


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
        """Whether any process received a signal (a collective: every rank must call it every step)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        return any_process(accelerator, self.received is not None)
