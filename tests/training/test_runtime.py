"""The one training runtime: the LR schedule of both stages, the recorded config, the trackers and metrics.json."""

import json
import math

import pytest

from ldm.config import load_config
from ldm.training import (
    AutoencoderExperimentConfig,
    AutoencoderTrainConfig,
    DiffusionExperimentConfig,
    DiffusionTrainConfig,
    TrainConfig,
)
from ldm.training.runtime import learning_rate_factor

STAGES = ("autoencoder", "diffusion")


@pytest.mark.parametrize(
    ("train_config", "floor"), [(AutoencoderTrainConfig, 0.1), (DiffusionTrainConfig, 0.0)], ids=STAGES
)
def test_lr_warms_up_then_follows_a_cosine_to_the_stages_floor(train_config, floor):
    tc = train_config(steps=102, warmup_steps=2)
    assert tc.min_lr_ratio == floor
    factors = [learning_rate_factor(step, tc) for step in range(102)]
    assert factors[0] == pytest.approx(0.5) and factors[1] == pytest.approx(1.0)  # linear warmup
    for step in (2, 27, 52, 101):  # floor + (1 - floor) * (1 + cos(pi * progress)) / 2, progress = (step - 2) / 100
        cosine = 0.5 * (1 + math.cos(math.pi * (step - 2) / 100))
        assert factors[step] == pytest.approx(floor + (1 - floor) * cosine)
    assert factors[52] == pytest.approx((1 + floor) / 2)
    assert learning_rate_factor(102, tc) == pytest.approx(floor)  # the end of the schedule


def test_constant_schedule_and_min_lr_ratio_bounds():
    assert learning_rate_factor(500, TrainConfig(steps=1000, lr_schedule="constant")) == 1.0
    with pytest.raises(ValueError, match=r"min_lr_ratio: must be in \[0, 1\]"):
        TrainConfig(min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="log_with: 'mlflow' is not one of tensorboard, wandb, none"):
        TrainConfig(log_with="mlflow")


@pytest.mark.training
@pytest.mark.parametrize("train", STAGES, indirect=True)
def test_a_run_records_its_config_and_the_same_metrics_for_both_stages(train, request, tmp_path):
    stage = request.node.callspec.params["train"]
    metrics = train(tmp_path, steps=3, checkpoint_every=3, sample_every=100)

    config_class = {"autoencoder": AutoencoderExperimentConfig, "diffusion": DiffusionExperimentConfig}[stage]
    recorded = load_config(config_class, tmp_path / "config.yaml")  # written once, by the runtime, at start
    assert recorded.train.steps == 3 and recorded.train.min_lr_ratio == config_class().train.min_lr_ratio
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    shared = {"step", "steps_this_run", "lr", "nonfinite_steps", "train_seconds", "images_per_second"}
    assert shared <= set(metrics) and metrics["step"] == metrics["steps_this_run"] == 3
    headline = {"autoencoder": "rec_last_100_steps", "diffusion": "loss_last_100_steps"}[stage]
    assert metrics[headline] > 0
    assert metrics["lr"] == pytest.approx(recorded.train.lr * learning_rate_factor(2, recorded.train))
    assert any((tmp_path / "logs" / stage).glob("events.out.tfevents*"))  # tensorboard, the default


@pytest.mark.training
@pytest.mark.parametrize("train", STAGES, indirect=True)
def test_log_with_wandb_offline_records_the_losses_under_logs(train, request, tmp_path, wandb_offline):
    import wandb

    stage = request.node.callspec.params["train"]
    try:
        train(tmp_path, steps=2, checkpoint_every=2, sample_every=100, log_every=1, log_with="wandb")
    finally:
        wandb.teardown()
    (run,) = (tmp_path / "logs" / "wandb").glob("offline-run-*")
    (record,) = run.glob("run-*.wandb")
    data = record.read_bytes()
    key = {"autoencoder": b"train/rec", "diffusion": b"train/loss"}[stage]
    assert key in data and b"train/lr" in data and b"train.steps" in data
    assert not list((tmp_path / "logs").glob("*/events.out.tfevents*"))  # no TensorBoard beside it


@pytest.mark.training
@pytest.mark.parametrize("train", ["diffusion"], indirect=True)
def test_log_with_none_writes_no_logs(train, tmp_path):
    metrics = train(tmp_path, steps=2, checkpoint_every=2, sample_every=100, log_with="none")
    assert metrics["step"] == 2
    assert not (tmp_path / "logs").exists()


def test_every_rank_draws_its_own_random_stream(tmp_path, monkeypatch):
    """Both stages seed rank r with train.seed + r (stage 1 once seeded every rank alike)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    from ldm.training.runtime import start_run

    Accelerator(cpu=True)  # the process state start_run's Accelerator then reuses
    draws = {}
    for rank in (0, 1):
        for state in (PartialState, AcceleratorState):  # as `accelerate launch` would set it on rank r
            monkeypatch.setitem(state._shared_state, "process_index", rank)
        for cfg in (AutoencoderExperimentConfig(), DiffusionExperimentConfig(autoencoder="unused")):
            cfg.train.seed, cfg.train.log_with = 7, "none"
            start_run(cfg, cfg.train, tmp_path / f"rank{rank}", "run")
            assert torch.initial_seed() == 7 + rank
            draws[rank, type(cfg).__name__] = torch.randn(4)
    assert torch.equal(draws[0, "AutoencoderExperimentConfig"], draws[0, "DiffusionExperimentConfig"])
    assert not torch.equal(draws[0, "AutoencoderExperimentConfig"], draws[1, "AutoencoderExperimentConfig"])
    assert (tmp_path / "rank0" / "config.yaml").is_file() and not (tmp_path / "rank1").exists()  # main process only
