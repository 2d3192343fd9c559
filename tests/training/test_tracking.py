"""`train.log_with`: each tracker, driven through a real CPU Accelerator, writes only under OUTPUT_DIR/logs."""

import sys

import pytest
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from ldm.config import ConfigError
from ldm.training.tracking import TRACKERS, accelerator_log_with, flat_config, start_tracking

CONFIG = {
    "train": {"lr": 1e-3, "steps": 3, "use_ema": True, "log_with": "tensorboard", "resume_from": None},
    "unet": {"block_out_channels": [32, 64], "cross_attention": (True, False)},
    "validation": {"prompts": ["a red circle"], "sampler": {"name": "ddim", "eta": 0.0}},
}
LOSSES = {0: 1.0, 1: 0.5, 2: 0.25}


@pytest.fixture
def run_dirs(tmp_path, monkeypatch):
    """OUTPUT_DIR and a separate, empty working directory that no tracker may write to."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path / "out", cwd


def run(log_with: str, output_dir, project: str = "diffusion") -> Accelerator:
    """A tiny tracked run: start the tracker, log LOSSES at their steps, end training."""
    accelerator = Accelerator(
        cpu=True,
        log_with=accelerator_log_with(log_with),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    start_tracking(accelerator, log_with, project, CONFIG, output_dir / "logs")
    for step, loss in LOSSES.items():
        accelerator.log({"train/loss": loss, "train/lr": 1e-3}, step=step)
    accelerator.end_training()
    return accelerator


def test_flat_config_is_dotted_scalars():
    flat = flat_config(CONFIG)
    assert flat["train.lr"] == 1e-3 and flat["train.steps"] == 3 and flat["train.use_ema"] is True
    assert flat["train.resume_from"] == "None"
    assert flat["unet.block_out_channels"] == "[32, 64]" and flat["unet.cross_attention"] == "(True, False)"
    assert flat["validation.sampler.name"] == "ddim" and flat["validation.sampler.eta"] == 0.0
    assert all(isinstance(value, (int, float, str, bool)) for value in flat.values())


def test_log_with_maps_to_accelerate():
    assert TRACKERS == ("tensorboard", "wandb", "none")
    assert accelerator_log_with("tensorboard") == "tensorboard"
    assert accelerator_log_with("none") is None
    with pytest.raises(ValueError, match=r"train\.log_with.*'mlflow'.*tensorboard, wandb, none"):
        accelerator_log_with("mlflow")


def test_tensorboard_writes_scalars_at_their_steps_under_logs(run_dirs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, cwd = run_dirs
    run("tensorboard", output_dir)
    project_dir = output_dir / "logs" / "diffusion"
    assert list(project_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(project_dir))
    events.Reload()
    assert {(e.step, e.value) for e in events.Scalars("train/loss")} == set(LOSSES.items())
    hparams = list(project_dir.glob("*/hparams.yml"))  # the flattened config, beside its hparams events
    assert len(hparams) == 1 and "unet.block_out_channels: '[32, 64]'" in hparams[0].read_text()
    assert list(cwd.iterdir()) == []


def test_tensorboard_needs_the_same_logging_dir(run_dirs):
    output_dir, _ = run_dirs
    accelerator = Accelerator(
        cpu=True, log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(output_dir))
    )
    with pytest.raises(ValueError, match="logging_dir"):
        start_tracking(accelerator, "tensorboard", "diffusion", CONFIG, output_dir / "logs")


def test_wandb_offline_writes_its_run_under_logs(run_dirs, wandb_offline, tmp_path, monkeypatch):
    import wandb  # the dev extra installs it: CI must run this test, not skip it

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))  # start_tracking's folder must win over WANDB_DIR
    output_dir, cwd = run_dirs
    try:
        run("wandb", output_dir)
    finally:
        wandb.teardown()  # stop wandb's service process now rather than at interpreter exit
    runs = list((output_dir / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record,) = runs[0].glob("run-*.wandb")
    data = record.read_bytes()
    assert b"train/loss" in data
    assert b"unet.block_out_channels" in data and b"[32, 64]" in data
    assert list(cwd.iterdir()) == []
    assert not (tmp_path / "wandb_dir").exists()


def test_none_writes_nothing_and_log_is_a_no_op(run_dirs):
    output_dir, cwd = run_dirs
    accelerator = run("none", output_dir)
    assert accelerator.trackers == []
    assert not (output_dir / "logs").exists() or list((output_dir / "logs").rglob("*")) == []
    assert list(cwd.iterdir()) == []


def test_wandb_missing_fails_before_training(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ConfigError, match=r'train\.log_with.*pip install "latent-diffusion-lab\[wandb\]"'):
        accelerator_log_with("wandb")


def test_wandb_missing_to_accelerate_fails_before_training(monkeypatch):
    monkeypatch.setattr("accelerate.utils.is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r'or set train\.log_with to "tensorboard" or "none"'):
        accelerator_log_with("wandb")
