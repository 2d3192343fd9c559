"""Both stages survive the same faults, because both run on the one training runtime.

For each stage: SIGKILL + `--resume latest` is bitwise the straight run; SIGTERM / SIGINT finish the step,
save and exit 0 with the resume command; a non-finite update is skipped and counted, and K in a row stop the
run with the last good checkpoint intact; a crash during a save leaves the previous checkpoints (the newest
`keep_checkpoints`) and nothing that a resume would pick; 2 processes under `accelerate launch` log means
over ranks, split each epoch, write from the main process only, and their checkpoint resumes on one process.
"""

import json
import logging
import shlex
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from ldm.data import ShapesDataset
from ldm.training.autoencoder_stage import AutoencoderStage
from ldm.training.checkpoint import STATE_FILE, TEMP_PREFIX, complete_checkpoints, latest_checkpoint
from ldm.training.diffusion_stage import DiffusionStage
from ldm.training.training_state import DataStream
from tests.fault_run import different_tensors, finish, launch, stage_args, wait_for
from tests.training.launch import (
    BATCH,
    RES,
    check_epoch_split,
    check_main_process_writes,
    check_reduced,
    rank_records,
    run_ldm,
    tensorboard_scalars,
    write_shards,
    writes,
)

pytestmark = pytest.mark.training

STAGES = ("autoencoder", "diffusion")
STAGE_CLASSES = {"autoencoder": AutoencoderStage, "diffusion": DiffusionStage}
UPDATE_NAME = {"autoencoder": "autoencoder", "diffusion": "unet"}
# Subprocess runs: (steps, checkpoint_every); the middle checkpoint falls inside an epoch (see tests/fault_run.py).
RUN_LENGTH = {"autoencoder": (8, 4), "diffusion": (10, 5)}
# What a checkpoint holds beyond accelerate's RNG and optimizer files, and the exported weights.
CHECKPOINT_WEIGHTS = {
    "autoencoder": ("model.safetensors", "model_1.safetensors"),
    "diffusion": ("model.safetensors", "ema.safetensors"),
}
EXPORTED = {
    "autoencoder": "vae/diffusion_pytorch_model.safetensors",
    "diffusion": "pipeline/unet/diffusion_pytorch_model.safetensors",
}


def poison_steps(monkeypatch: pytest.MonkeyPatch, stage: str, steps: set[int]) -> None:
    """Make every loss of the given optimizer steps (1-based) NaN, as a corrupt batch would."""
    stage_class = STAGE_CLASSES[stage]
    real_updates = stage_class.updates

    def updates(self, batch, step):
        for update in real_updates(self, batch, step):
            if step + 1 in steps:
                update.loss = update.loss * float("nan")
            yield update

    monkeypatch.setattr(stage_class, "updates", updates)


@pytest.mark.parametrize("stage", STAGES)
def test_resume_after_sigkill_is_bitwise_the_straight_run(stage, tmp_path, tiny_vae_dir):
    steps, every = RUN_LENGTH[stage]
    args = [stage, "--steps", str(steps), "--checkpoint-every", str(every), "--vae", str(tiny_vae_dir)]
    straight = launch(args[0], str(tmp_path / "straight"), *args[1:])
    marker = tmp_path / "blocked"
    killed = launch(args[0], str(tmp_path / "run"), *args[1:], "--block-after", str(every), "--marker", str(marker))
    wait_for(marker, killed)  # checkpoint `every` is saved; the run is drawing the first batch after it
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert latest_checkpoint(tmp_path / "run").name == f"step_{every:07d}"
    finish(launch(args[0], str(tmp_path / "run"), *args[1:], "--resume", "latest"))
    finish(straight)

    for name in CHECKPOINT_WEIGHTS[stage]:
        a, b = (tmp_path / run / "checkpoints" / f"step_{steps:07d}" / name for run in ("straight", "run"))
        assert different_tensors(a, b) == [], name
    assert different_tensors(*(tmp_path / run / EXPORTED[stage] for run in ("straight", "run"))) == []


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_finishes_the_step_saves_and_exits_0_with_the_resume_command(
    stage, signum, tmp_path, tiny_vae_dir
):
    out, marker, release = tmp_path / "run", tmp_path / "blocked", tmp_path / "go"
    run = launch(
        stage,
        str(out),
        "--steps",
        "1000",
        "--checkpoint-every",
        "2",
        "--vae",
        str(tiny_vae_dir),
        "--block-after",
        "2",
        "--marker",
        str(marker),
        "--release",
        str(release),
    )
    wait_for(marker, run)  # drawing the first batch of step 3
    run.send_signal(signum)
    release.touch()
    output = finish(run)  # exit status 0, no KeyboardInterrupt

    assert f"{signum.name}: stopped at step 3" in output
    saved = latest_checkpoint(out)
    assert saved.name == "step_0000003"  # the step in progress was finished, then saved
    assert json.loads((saved / STATE_FILE).read_text())["step"] == 3
    assert not (out / EXPORTED[stage].split("/")[0]).exists()  # the run is not finished: no export
    hint = next(line for line in output.splitlines() if line.startswith("resume with: "))
    expected = ["ldm", *stage_args(stage, out, 1000, 2, tiny_vae_dir), "--resume", "latest"]
    assert shlex.split(hint.removeprefix("resume with: ")) == expected


@pytest.mark.parametrize("train", STAGES, indirect=True)
def test_a_nonfinite_step_skips_its_update_and_is_counted(train, request, tmp_path, monkeypatch):
    stage = request.node.callspec.params["train"]
    poison_steps(monkeypatch, stage, {3})
    metrics = train(tmp_path, steps=4, checkpoint_every=1, sample_every=100)

    assert metrics["step"] == 4 and metrics["nonfinite_steps"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["nonfinite_steps"] == 1
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1, 2, 4]  # none of the bad step 3
    optimizer = torch.load(tmp_path / "checkpoints" / "step_0000004" / "optimizer.bin", weights_only=True)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {3}  # Adam stepped at 1, 2 and 4 only
    if stage == "diffusion":
        assert metrics["ema_updates"] == 3  # and the EMA did not average the skipped step


@pytest.mark.parametrize("train", STAGES, indirect=True)
def test_nonfinite_steps_in_a_row_stop_the_run_and_leave_the_last_good_checkpoint(
    train, request, tmp_path, monkeypatch, caplog
):
    stage = request.node.callspec.params["train"]
    train(tmp_path, steps=2, checkpoint_every=2)
    good = tmp_path / "checkpoints" / "step_0000002"
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    poison_steps(monkeypatch, stage, set(range(3, 11)))
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(RuntimeError, match=r"step 5: 3 steps in a row.*train\.max_nonfinite_steps=3"),
    ):
        # The counters are read at log steps (every step here), so the run stops at the step the limit is reached.
        train(tmp_path, resume="latest", steps=10, checkpoint_every=2, max_nonfinite_steps=3, log_every=1)

    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000002"]  # none at step 4, no temp folder
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    skipped = [r.getMessage() for r in caplog.records if f"their update ({UPDATE_NAME[stage]})" in r.getMessage()]
    assert [m.split(":")[0] for m in skipped] == ["up to step 3", "up to step 4", "up to step 5"]


@pytest.mark.parametrize("train", STAGES, indirect=True)
def test_a_streak_between_log_steps_stops_the_run_at_the_next_check(train, request, tmp_path, monkeypatch):
    stage = request.node.callspec.params["train"]
    poison_steps(monkeypatch, stage, {2, 3, 4})  # a streak of 3 that ends before the log step 6
    with pytest.raises(RuntimeError, match=r"step 6: 3 steps in a row"):
        train(tmp_path, steps=10, checkpoint_every=100, sample_every=100, max_nonfinite_steps=3, log_every=6)


@pytest.mark.parametrize("train", STAGES, indirect=True)
def test_a_crash_during_a_save_keeps_the_newest_checkpoints_and_resume_continues(train, tmp_path, monkeypatch):
    real_save = DataStream.save

    def disk_full_at_step_6(self, folder):
        if folder.name.endswith("step_0000006"):
            raise OSError("disk full")
        real_save(self, folder)

    monkeypatch.setattr(DataStream, "save", disk_full_at_step_6)
    with pytest.raises(OSError, match="disk full"):
        train(tmp_path, steps=6, checkpoint_every=2, keep_checkpoints=2, sample_every=100)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 4]  # keep 2; step 6 never completed
    assert latest_checkpoint(tmp_path).name == "step_0000004"
    assert (tmp_path / "checkpoints" / f"{TEMP_PREFIX}step_0000006").is_dir()  # the half folder, under a hidden name
    kept = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_0000004").iterdir()}

    monkeypatch.setattr(DataStream, "save", real_save)
    metrics = train(tmp_path, resume="latest", steps=6, checkpoint_every=2, keep_checkpoints=2, sample_every=100)
    assert metrics["step"] == 6 and metrics["steps_this_run"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_0000004").iterdir()} == kept


@dataclass
class LaunchCase:
    """A 6-step, 2-process run of one stage: its arguments, the logged key, one epoch's captions (steps 1-4),
    the files only it writes, and metrics expected after the run and after resuming it to step 8."""

    args: list[str]
    out: Path
    key: str
    captions: list[str]
    files: tuple[str, ...]
    metrics: dict = field(default_factory=dict)
    resumed_metrics: dict = field(default_factory=dict)


def autoencoder_launch(tmp_path: Path, vae: Path) -> LaunchCase:
    """Stage 1 on WebDataset shards: 4 shards of 16, so each rank streams 2 shards = 4 batches per epoch."""
    captions = write_shards(tmp_path, "train", shards=4, per_shard=16)
    write_shards(tmp_path, "heldout", shards=1, per_shard=16)
    config = {
        "data": {"source": "webdataset", "resolution": RES, "train_path": str(tmp_path / "train-*.tar")},
        "model": {"block_out_channels": [8, 8], "latent_channels": 4, "norm_num_groups": 4, "sample_size": RES},
        "loss": {"lpips_weight": 0.0},
        "train": {"steps": 6, "batch_size": BATCH, "warmup_steps": 1, "log_every": 1, "sample_every": 2},
    }
    config["data"] |= {"heldout_path": str(tmp_path / "heldout-00.tar"), "shuffle_buffer": 8}
    config["train"] |= {"checkpoint_every": 4, "eval_samples": 16, "scale_samples": 16, "num_threads": 1}
    (tmp_path / "ae.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "ae"
    args = ["train-autoencoder", "--config", str(tmp_path / "ae.yaml"), "--output-dir", str(out)]
    files = ("vae/config.json", "vae/diffusion_pytorch_model.safetensors")
    return LaunchCase(args, out, "rec", captions, files, metrics={"num_images": 16})  # the whole held-out shard


def diffusion_launch(tmp_path: Path, vae: Path) -> LaunchCase:
    """Stage 2 on the latent cache of 64 shapes: 2 ranks x 8 = 16 per step, so steps 1-4 are one epoch."""
    config = {
        "autoencoder": str(vae),
        "data": {"source": "shapes", "resolution": RES, "num_samples": 64, "heldout_samples": 8},
        "text_encoder": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "unet": {"block_out_channels": [32, 32], "cross_attention": [True, True], "attention_head_dim": 16},
        "train": {"steps": 6, "batch_size": BATCH, "warmup_steps": 1, "log_every": 1, "sample_every": 2},
        "validation": {"prompts": ["a red circle"], "images_per_prompt": 1, "num_inference_steps": 2},
    }
    config["text_encoder"] |= {"max_length": 16, "frozen": True}
    config["train"] |= {"checkpoint_every": 4, "num_threads": 1, "ema_decay": 0.9}
    (tmp_path / "dm.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "dm"
    args = ["train-diffusion", "--config", str(tmp_path / "dm.yaml"), "--output-dir", str(out)]
    shapes = ShapesDataset(64, resolution=RES, split="train", seed=0)
    files = ("cache/latents/manifest.json", "cache/captions/manifest.json", "checkpoints/step_0000004/ema.safetensors")
    files += ("pipeline/unet/diffusion_pytorch_model.safetensors",)
    captions = [shapes[i]["caption"] for i in range(len(shapes))]
    return LaunchCase(args, out, "loss", captions, files, resumed_metrics={"ema_updates": 8})


LAUNCH_CASES = {"autoencoder": autoencoder_launch, "diffusion": diffusion_launch}


@pytest.mark.parametrize("stage", STAGES)
def test_trains_on_two_processes_and_resumes_on_one(stage, tmp_path, tiny_vae_dir):
    case = LAUNCH_CASES[stage](tmp_path, tiny_vae_dir)
    proc = run_ldm(case.args, case.out, tmp_path, processes=2)
    records = rank_records(proc.stderr)
    assert {rank for rank, _ in records} == {0, 1}  # two processes really trained
    check_reduced(tensorboard_scalars(case.out, f"train/{case.key}"), records, case.key, range(1, 7))
    check_epoch_split(records, range(1, 5), case.captions)
    files = check_main_process_writes(writes(tmp_path, 2), case.out)
    common = ("config.yaml", "metrics.json", "samples/step_0000002.png", "samples/final.png")
    common += ("checkpoints/step_0000006/model.safetensors", "checkpoints/step_0000006/trainer_state.json")
    assert set(common + case.files) <= set(files)
    assert any(f.startswith(f"logs/{stage}/events.out.tfevents") for f in files)
    assert (case.out / "checkpoints" / "step_0000006" / "random_states_1.pkl").is_file()
    metrics = json.loads((case.out / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics.items() >= case.metrics.items()

    resumed = run_ldm([*case.args, "--resume", "latest", "--set", "train.steps=8"], case.out, tmp_path, processes=1)
    assert "step_0000006" in resumed.stderr  # accelerate's "Loading states from ...": the 2-process checkpoint
    assert sorted(rank_records(resumed.stderr)) == [(0, 7), (0, 8)]  # one process, continuing the step count
    metrics = json.loads((case.out / "metrics.json").read_text())
    assert (metrics["step"], metrics["steps_this_run"]) == (8, 2) and metrics.items() >= case.resumed_metrics.items()
    assert (case.out / "checkpoints" / "step_0000008" / "trainer_state.json").is_file()
