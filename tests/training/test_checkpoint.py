"""Checkpoints are atomic and pruned; the data position, the non-finite guard and the stop signal in isolation."""

import argparse
import os
import signal
import time

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ldm.commands import resume_command
from ldm.training.checkpoint import (
    TEMP_PREFIX,
    complete_checkpoints,
    latest_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from ldm.training.faults import NonFiniteGuard, StopSignal
from ldm.training.training_state import DataStream
from tests.host_round_trips import HostRoundTrips


@pytest.fixture
def accelerator():
    return Accelerator(cpu=True)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_and_nothing_resume_would_pick(tmp_path, accelerator):
    model = accelerator.prepare(nn.Linear(2, 2))
    first = save_checkpoint(accelerator, tmp_path, 1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def crash(folder):
        raise OSError("disk full")

    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(accelerator, tmp_path, 2, extra=crash)
    assert latest_checkpoint(tmp_path) == first
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert (tmp_path / "checkpoints" / f"{TEMP_PREFIX}step_0000002").is_dir()  # the half folder, under a hidden name

    save_checkpoint(accelerator, tmp_path, 3)  # the next save clears the leftover
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001", "step_0000003"]


def test_only_the_last_k_checkpoints_are_kept(tmp_path, accelerator):
    accelerator.prepare(nn.Linear(2, 2))
    for step in range(1, 6):
        save_checkpoint(accelerator, tmp_path, step, keep=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [4, 5]


def test_latest_is_the_last_saved_not_the_highest_step(tmp_path, accelerator):
    # A run saved steps 2 and 4, was resumed from step 2 and has saved step 3 since: step 4 is abandoned.
    accelerator.prepare(nn.Linear(2, 2))
    for step in (2, 4, 3):
        save_checkpoint(accelerator, tmp_path, step, keep=3)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000003"
    assert resolve_resume(tmp_path, "latest") == latest_checkpoint(tmp_path)


def test_the_data_stream_resumes_mid_epoch_with_the_batches_the_straight_run_draws(tmp_path, accelerator):
    def stream() -> DataStream:
        loader = DataLoader(range(12), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
        return DataStream(accelerator.prepare(loader))

    straight = stream()
    expected = [next(straight).tolist() for _ in range(8)]  # three batches per epoch: crosses two boundaries
    interrupted = stream()
    for _ in range(4):  # one batch into the second epoch
        next(interrupted)
    interrupted.save(tmp_path)
    resumed = stream()
    next(resumed)  # a fresh run's generator has moved on; loading must put it back
    resumed.load(tmp_path)
    assert (resumed.epoch, resumed.position) == (1, 1)
    assert [next(resumed).tolist() for _ in range(4)] == expected[4:]


@pytest.mark.parametrize("fused", [False, True], ids=["host", "device"])
def test_a_nonfinite_gradient_skips_the_update_and_k_in_a_row_stop(accelerator, fused):
    """SGD is decided on the host; a fused AdamW on the device (its kernel honours the guard's found_inf)."""
    model = nn.Linear(2, 1)
    opt = (
        torch.optim.AdamW(model.parameters(), lr=0.1, fused=True) if fused else torch.optim.SGD(model.parameters(), 0.1)
    )
    model, opt = accelerator.prepare(model, opt)
    guard = NonFiniteGuard(limit=2)
    weights = model.weight.detach().clone()

    loss = model(torch.tensor([[float("inf"), 1.0]])).sum()  # finite parameters, an infinite input
    loss.backward()
    guard.watch("net", loss)
    assert not guard.apply(accelerator, "net", opt, model.parameters())
    assert torch.equal(model.weight, weights) and model.weight.grad is None  # no step, gradients zeroed
    guard.end_step()
    assert guard.total == 0  # counted on the device until a check reads it
    assert not guard.healthy(1) and (guard.total, guard.streak) == (1, 1)

    model(torch.ones(1, 2)).sum().backward()
    assert guard.apply(accelerator, "net", opt, model.parameters())
    guard.end_step()
    guard.check(2)
    assert (guard.total, guard.streak) == (1, 0) and not torch.equal(model.weight, weights)
    if fused:  # the skipped update left no trace in the optimizer either: one step taken
        assert int(opt.optimizer.state[opt.optimizer.param_groups[0]["params"][0]]["step"]) == 1

    last_good = [p.detach().clone() for p in model.parameters()]
    for _ in (3, 4):
        model(torch.ones(1, 2)).sum().backward()
        model.weight.grad[0, 0] = float("nan")
        guard.apply(accelerator, "net", opt, model.parameters())
        guard.end_step()
    # the skipped steps left the model finite and exactly as the last good step did
    for param, good in zip(model.parameters(), last_good, strict=True):
        assert torch.isfinite(param).all() and torch.equal(param, good)
    with pytest.raises(RuntimeError, match=r"step 4: 2 steps in a row.*train\.max_nonfinite_steps=2"):
        guard.check(4)


def test_a_device_decision_never_waits_for_the_host(accelerator):
    model = nn.Linear(2, 1)
    model, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True))
    guard = NonFiniteGuard(limit=2)
    for value in (float("nan"), 1.0):
        loss = model(torch.full((1, 2), value)).sum()
        loss.backward()
        with HostRoundTrips() as trips:
            guard.watch("net", loss)
            applied = guard.apply(accelerator, "net", opt, model.parameters(), clip=1.0)
            guard.end_step()
        assert trips.total == 0, str(trips)
        assert isinstance(applied, torch.Tensor) and bool(applied) == (value == 1.0)
    guard.check(2)
    assert (guard.total, guard.streak) == (1, 0)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_an_fp16_overflow_skips_the_update_and_halves_the_loss_scale(clip, fresh_accelerate_state):
    # Accelerate makes a GradScaler only on a GPU; this sets up the state it makes there (native AMP, fp16,
    # a scaler the prepared optimizer steps through) around a real CPU GradScaler.
    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=1024.0)
    model = nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    guard = NonFiniteGuard(limit=3)
    weights = model.weight.detach().clone()

    loss = model(torch.ones(1, 2)).sum() * 1e38  # finite, but its scaled gradient overflows
    accelerator.backward(loss)
    guard.watch("net", loss)
    assert not guard.apply(accelerator, "net", opt, model.parameters(), clip)
    guard.end_step()
    guard.check(1)
    assert accelerator.scaler.get_scale() == 512.0 and torch.equal(model.weight, weights)
    # The scaler's normal search for its scale, not a non-finite step: it does not count towards the limit.
    assert (guard.total, guard.streak, guard.overflows) == (0, 0, 1)

    loss = model(torch.ones(1, 2)).sum()  # d loss / d weight = (1, 1)
    accelerator.backward(loss)
    guard.watch("net", loss)
    assert guard.apply(accelerator, "net", opt, model.parameters(), clip)
    guard.end_step()
    guard.check(2)
    # The update used the unscaled gradient (clipped to norm 1 when asked); the scale is kept.
    step = 0.1 * (torch.ones(1, 2) / 2**0.5 if clip else torch.ones(1, 2))
    torch.testing.assert_close(weights - model.weight.detach(), step)
    assert accelerator.scaler.get_scale() == 512.0 and (guard.total, guard.streak, guard.overflows) == (0, 0, 1)


def test_fp16_start_up_overflows_do_not_stop_the_run_but_nan_losses_and_a_scale_of_1_count(fresh_accelerate_state):
    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model = nn.Linear(2, 1, bias=False)
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1e-40))
    guard = NonFiniteGuard(limit=3)

    def step(number: int, loss_factor: float) -> bool:
        loss = model(torch.ones(1, 2)).sum() * loss_factor
        accelerator.backward(loss)
        guard.watch("net", loss)
        stepped = guard.apply(accelerator, "net", opt, model.parameters())
        guard.end_step()
        guard.check(number)  # raises once 3 steps in a row are non-finite
        return stepped

    # The forward runs in fp16 (max 65504): a gradient of 1000 x scale overflows there until the scale is 64, so
    # the scaler halves from 2^16 ten times (far over the limit of 3 in a row) before the update goes through.
    results = [step(n, 1000.0) for n in range(1, 12)]
    assert results == [False] * 10 + [True] and accelerator.scaler.get_scale() == 64.0
    assert (guard.total, guard.streak, guard.overflows) == (0, 0, 10)

    assert not step(12, float("nan"))  # a non-finite loss is the data's or the model's fault: counted
    assert (guard.total, guard.streak) == (1, 1)
    accelerator.scaler.update(1.0)
    assert not step(13, 1e5)  # at a scale of 1 an overflowing gradient is no longer the scaler's search
    assert (guard.total, guard.streak, guard.overflows) == (2, 2, 10)


def test_sigterm_during_training_becomes_a_stop_request_and_the_old_handler_comes_back(accelerator):
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignal() as signals:
        assert not signals.requested(accelerator)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes
        assert signals.received == "SIGTERM" and signals.requested(accelerator)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_the_resume_command_repeats_the_run_with_resume_latest():
    args = argparse.Namespace(command="train-diffusion", config="my run.yaml", overrides=["train.lr=1e-4"])
    assert resume_command(args, "runs/x") == (
        "ldm train-diffusion --config 'my run.yaml' --output-dir runs/x --set train.lr=1e-4 --resume latest"
    )
