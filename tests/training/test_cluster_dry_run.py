"""A cluster's life on this CPU: 2 processes under `accelerate launch` train stage 2 from 8 WebDataset shards
of precomputed latents; one rank is SIGKILLed mid-run, the job stops, a relaunch with `--resume latest`
finishes it, and the final weights are bit for bit those of an uninterrupted 2-process run."""

import itertools
import os
import signal
from pathlib import Path

import pytest

from ldm.config import load_config
from ldm.training import DiffusionExperimentConfig
from ldm.training.checkpoint import latest_checkpoint
from ldm.training.precompute import precompute_latents
from tests.fault_run import different_tensors, diffusion_args, finish, launch, wait_for
from tests.training.launch import free_port

pytestmark = pytest.mark.training

STEPS, EVERY = 8, 4


def latent_overrides(latents: Path) -> list[str]:
    """Stage 2 on the precomputed latents, with the frozen text encoder whose embeddings they carry."""
    return ["text_encoder.frozen=true", "data.source=latents", f"data.train_path={latents}", "data.shuffle_buffer=8"]


def precompute(tmp_path: Path, vae: Path) -> Path:
    """32 shapes in 8 shards of 4, with their caption embeddings."""
    args = diffusion_args(tmp_path / "unused", STEPS, EVERY, vae)
    overrides = [value for flag, value in itertools.pairwise(args) if flag == "--set"]
    cfg = load_config(DiffusionExperimentConfig, None, [*overrides, "text_encoder.frozen=true"])
    manifest = precompute_latents(cfg, tmp_path / "latents", samples_per_shard=4)
    assert len(manifest["shards"]) == 8 and manifest["text_encoder"] is not None
    return tmp_path / "latents"


def test_two_ranks_on_latent_shards_survive_a_killed_rank_and_resume_bitwise(tmp_path, tiny_vae_dir):
    latents = precompute(tmp_path, tiny_vae_dir)
    common = ["diffusion", "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--vae", str(tiny_vae_dir)]
    common += [arg for override in latent_overrides(latents) for arg in ("--set", override)]
    # One run at a time: two 2-process runs on 2 cores would only slow each other down.
    finish(launch(common[0], str(tmp_path / "straight"), *common[1:], processes=2, port=free_port()), timeout=240)

    marker = tmp_path / "blocked"
    run = str(tmp_path / "run")
    job = launch(
        common[0], run, *common[1:], "--block-after", str(EVERY), "--marker", str(marker), processes=2, port=free_port()
    )
    rank_1 = marker.with_name("blocked.1")
    wait_for(rank_1, job, timeout=240)  # checkpoint 4 is saved; rank 1 is drawing its next batch
    os.kill(int(rank_1.read_text()), signal.SIGKILL)
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0, output[-3000:]  # the launcher tears the job down when a rank dies
    assert latest_checkpoint(Path(run)).name == f"step_{EVERY:07d}"

    finish(launch(common[0], run, *common[1:], "--resume", "latest", processes=2, port=free_port()), timeout=240)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (tmp_path / r / "checkpoints" / f"step_{STEPS:07d}" / name for r in ("straight", "run"))
        assert different_tensors(a, b) == [], name
    exported = "pipeline/unet/diffusion_pytorch_model.safetensors"
    assert different_tensors(tmp_path / "straight" / exported, tmp_path / "run" / exported) == []
