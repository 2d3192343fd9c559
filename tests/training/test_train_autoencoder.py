"""End to end: a tiny autoencoder learns shapes; checkpoints resume; the exported vae/ loads in diffusers."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, Dataset

import ldm.training.autoencoder_stage as stage_1
from autoencoder.config import LossConfig, ModelConfig
from autoencoder.model import KLAutoencoder, build_vae
from ldm.data import DataConfig, ShapesDataset, collate_examples
from ldm.training import AutoencoderExperimentConfig, AutoencoderTrainConfig, train_autoencoder

RES = 16


def tiny_config(loss: LossConfig | None = None, **train: object) -> AutoencoderExperimentConfig:
    """Stage 1 on 320 shapes at 16 px (64 held out), a 2-level autoencoder."""
    model = ModelConfig(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8, sample_size=RES)
    settings = {"steps": 60, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "log_every": 10}
    settings |= {"sample_every": 20, "checkpoint_every": 20, "eval_samples": 64, "scale_samples": 64, "num_threads": 1}
    data = DataConfig(resolution=RES, num_samples=320, heldout_samples=64)
    train_cfg = AutoencoderTrainConfig(**(settings | train))
    return AutoencoderExperimentConfig(model=model, loss=loss or LossConfig(), train=train_cfg, data=data)


def heldout_loader() -> DataLoader:
    """The held-out split the trainer evaluates on."""
    return DataLoader(ShapesDataset(64, RES, "heldout"), 16, collate_fn=collate_examples)


def heldout_mse(vae: AutoencoderKL, heldout: DataLoader) -> float:
    model = KLAutoencoder(vae).eval()
    with torch.no_grad():
        images = [b["pixel_values"] for b in heldout]
        errors = [(model.decode(model.encode(x).mode()) - x).pow(2).mean() for x in images]
    return torch.stack(errors).mean().item()


@pytest.mark.training
def test_tiny_autoencoder_learns_shapes_and_exports_a_diffusers_vae(tmp_path):
    cfg, heldout = tiny_config(), heldout_loader()
    torch.manual_seed(cfg.train.seed)  # the trainer seeds the same way before building the network
    init_mse = heldout_mse(build_vae(cfg.model), heldout)

    result = train_autoencoder(cfg, tmp_path)

    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert vae.config.scaling_factor == pytest.approx(result["scaling_factor"])
    assert 0 < vae.config.scaling_factor != 1.0
    trained_mse = heldout_mse(vae, heldout)
    assert trained_mse < 0.7 * init_mse, (init_mse, trained_mse)  # measured: 0.61 -> 0.38 after 60 steps

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 60 and metrics["num_images"] == 64
    assert {"psnr", "ssim", "kl", "latent_mean", "latent_std", "scaling_factor"} <= set(metrics)
    assert "lpips" not in metrics  # no pretrained backbone here: LPIPS is not reported rather than faked
    assert metrics["scaling_factor"] == pytest.approx(1 / metrics["latent_std"], rel=0.2)
    assert (tmp_path / "samples" / "step_0000020.png").is_file() and (tmp_path / "samples" / "final.png").is_file()
    assert any((tmp_path / "logs").rglob("events.out.tfevents*"))
    assert (tmp_path / "checkpoints" / "step_0000060" / "model.safetensors").is_file()


class CountingDataset(Dataset):
    """Wraps a dataset and counts the examples read from it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.read = dataset, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        self.read += 1
        return self.dataset[index]


@pytest.mark.training
def test_resume_latest_continues_the_step_count_with_the_discriminator(tmp_path, monkeypatch):
    gan = LossConfig(disc_weight=0.5, disc_start=2, disc_channels=8, disc_layers=2)
    first = tiny_config(gan, steps=4, checkpoint_every=2, batch_size=8)
    result = train_autoencoder(first, tmp_path)
    assert result["step"] == 4
    saved = (tmp_path / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes()

    second = tiny_config(gan, steps=6, checkpoint_every=2, batch_size=8)
    counting = CountingDataset(ShapesDataset(320, RES, "train"))
    real_build = stage_1.build_dataset
    monkeypatch.setattr(
        stage_1, "build_dataset", lambda cfg, split: counting if split == "train" else real_build(cfg, split)
    )
    result = train_autoencoder(second, tmp_path, resume="latest")
    assert result["step"] == 6
    scale_batches = second.train.scale_samples // 8  # the scaling factor reads its images from the train loader
    # Two more optimizer steps (accelerate's prepared loader reads one batch ahead), then the scale pass over
    # the plain loader. The 4 batches consumed before the checkpoint are skipped without being read.
    assert counting.read == (2 + 1 + scale_batches) * 8
    assert (tmp_path / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes() == saved
    assert (tmp_path / "checkpoints" / "step_0000006" / "model_1.safetensors").is_file()  # the discriminator


def test_resume_latest_without_checkpoints_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train_autoencoder(tiny_config(), tmp_path, resume="latest")
