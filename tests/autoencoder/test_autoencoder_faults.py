"""Stage 1 survives faults: SIGKILL + `--resume latest` is bitwise the straight run, SIGTERM stops cleanly with
the resume command, and non-finite updates are skipped and, K in a row, stop the run."""

import json
import logging
import shlex
import signal

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from autoencoder.checkpoint import STATE_FILE, latest_checkpoint
from autoencoder.trainer import train_autoencoder
from ldm.data import collate_examples
from tests.autoencoder.test_training import loaders, tiny_config
from tests.fault_run import autoencoder_args, different_tensors, finish, launch, wait_for


@pytest.mark.training
def test_resume_after_sigkill_is_bitwise_the_straight_run(tmp_path):
    straight = launch("autoencoder", str(tmp_path / "straight"), "--steps", "8", "--checkpoint-every", "4")
    marker = tmp_path / "blocked"
    killed = launch("autoencoder", str(tmp_path / "run"), "--steps", "8", "--checkpoint-every", "4",
                    "--block-after", "4", "--marker", str(marker))  # fmt: skip
    wait_for(marker, killed)  # step 4 is saved; the run is drawing the first batch of step 5
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert latest_checkpoint(tmp_path / "run").name == "step_0000004"
    finish(
        launch("autoencoder", str(tmp_path / "run"), "--steps", "8", "--checkpoint-every", "4", "--resume", "latest")
    )
    finish(straight)

    for name in ("model.safetensors", "model_1.safetensors"):  # the autoencoder and the discriminator
        a, b = (tmp_path / run / "checkpoints" / "step_0000008" / name for run in ("straight", "run"))
        assert different_tensors(a, b) == [], name
    a, b = (tmp_path / run / "vae" / "diffusion_pytorch_model.safetensors" for run in ("straight", "run"))
    assert different_tensors(a, b) == []


@pytest.mark.training
def test_sigterm_finishes_the_step_saves_and_exits_0_with_the_resume_command(tmp_path):
    out, marker, release = tmp_path / "run", tmp_path / "blocked", tmp_path / "go"
    run = launch("autoencoder", str(out), "--steps", "1000", "--checkpoint-every", "2",
                 "--block-after", "2", "--marker", str(marker), "--release", str(release))  # fmt: skip
    wait_for(marker, run)  # drawing the first batch of step 3
    run.send_signal(signal.SIGTERM)
    release.touch()
    output = finish(run)  # exit status 0

    assert "SIGTERM: stopped at step 3" in output
    saved = latest_checkpoint(out)
    assert saved.name == "step_0000003"  # the step in progress was finished, then saved
    assert json.loads((saved / STATE_FILE).read_text())["step"] == 3
    assert not (out / "vae").exists()  # the run is not finished: no export
    hint = next(line for line in output.splitlines() if line.startswith("resume with: "))
    assert shlex.split(hint.removeprefix("resume with: ")) == [
        "ldm",
        *autoencoder_args(out, 1000, 2),
        "--resume",
        "latest",
    ]


class NaNImages(Dataset):
    """Shapes-sized examples whose pixels are all NaN (a corrupt batch reaching the loss)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": torch.full((3, 16, 16), float("nan")), "caption": "nan"}


@pytest.mark.training
def test_nonfinite_steps_in_a_row_stop_the_run_and_leave_the_last_good_checkpoint(tmp_path, caplog):
    train, heldout = loaders(batch_size=8)
    train_autoencoder(tiny_config(steps=2, checkpoint_every=2), train, heldout, tmp_path)
    good = tmp_path / "checkpoints" / "step_0000002"
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    nan_loader = DataLoader(NaNImages(), 8, shuffle=True, collate_fn=collate_examples)
    cfg = tiny_config(steps=10, checkpoint_every=2, max_nonfinite_steps=3)
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(RuntimeError, match=r"step 5: 3 steps in a row.*train\.max_nonfinite_steps=3"),
    ):
        train_autoencoder(cfg, nan_loader, heldout, tmp_path, resume="latest")

    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000002"]  # none at step 4, no temp folder
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    skipped = [r.getMessage() for r in caplog.records if "skipped the autoencoder update" in r.getMessage()]
    assert [m.split(":")[0] for m in skipped] == ["step 3", "step 4", "step 5"]
