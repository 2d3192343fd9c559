"""Stage 2 survives faults: SIGKILL + resume is bitwise the straight run (weights and EMA), SIGINT stops after
the step with a checkpoint, and a NaN loss skips its update (no optimizer step, no EMA update) and is counted."""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

import ldm.training.trainer as trainer
from autoencoder.checkpoint import latest_checkpoint
from ldm.training import train_diffusion
from tests.fault_run import different_tensors, finish, launch, wait_for


@pytest.mark.training
def test_resume_after_sigkill_is_bitwise_the_straight_run(tmp_path, tiny_vae_dir):
    # 32 images in batches of 8: the step-5 checkpoint is one batch into the second epoch.
    args = ["--steps", "10", "--checkpoint-every", "5", "--vae", str(tiny_vae_dir)]
    straight = launch("diffusion", str(tmp_path / "straight"), *args)
    marker = tmp_path / "blocked"
    killed = launch("diffusion", str(tmp_path / "run"), *args, "--block-after", "5", "--marker", str(marker))
    wait_for(marker, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert latest_checkpoint(tmp_path / "run").name == "step_0000005"
    finish(launch("diffusion", str(tmp_path / "run"), *args, "--resume", "latest"))
    finish(straight)

    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (tmp_path / run / "checkpoints" / "step_0000010" / name for run in ("straight", "run"))
        assert different_tensors(a, b) == [], name


@pytest.mark.training
def test_sigint_finishes_the_step_and_saves_a_checkpoint(tmp_path, tiny_vae_dir):
    out, marker, release = tmp_path / "run", tmp_path / "blocked", tmp_path / "go"
    run = launch("diffusion", str(out), "--steps", "1000", "--checkpoint-every", "2", "--vae", str(tiny_vae_dir),
                 "--block-after", "2", "--marker", str(marker), "--release", str(release))  # fmt: skip
    wait_for(marker, run)
    run.send_signal(signal.SIGINT)
    release.touch()
    output = finish(run)  # exit 0, no KeyboardInterrupt
    assert "stopped_by: SIGINT" in output
    assert latest_checkpoint(out).name == "step_0000003"
    assert not (out / "pipeline").exists()


@pytest.mark.training
def test_a_nan_loss_skips_its_update_and_is_counted(tmp_path, tiny_config, monkeypatch):
    calls = []

    def nan_at_step_3(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 3 else loss

    real_loss = trainer.diffusion_loss
    monkeypatch.setattr(trainer, "diffusion_loss", nan_at_step_3)
    metrics = train_diffusion(tiny_config(steps=4, checkpoint_every=2, sample_every=100), tmp_path)

    assert metrics["nonfinite_steps"] == 1 and metrics["step"] == 4
    assert metrics["ema_updates"] == 3  # no EMA update for the skipped step
    assert json.loads((tmp_path / "metrics.json").read_text())["nonfinite_steps"] == 1
    weights = load_file(tmp_path / "checkpoints" / "step_0000004" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
