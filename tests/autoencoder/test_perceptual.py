"""LPIPS never runs on a random backbone: a missing backbone file stops start-up with a clear message."""

import pytest
import torch

import ldm.training.autoencoder_stage as stage_1
from autoencoder.config import LossConfig
from autoencoder.perceptual import backbone_weight_path, build_lpips, lpips_backbone_available
from ldm.training import AutoencoderExperimentConfig


@pytest.fixture
def empty_hub(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_missing_backbone_names_the_file_and_both_ways_out(empty_hub):
    assert backbone_weight_path("vgg") == empty_hub / "checkpoints" / "vgg16-397923af.pth"
    assert not lpips_backbone_available("vgg")
    with pytest.raises(FileNotFoundError) as err:
        build_lpips("vgg")
    message = str(err.value)
    assert str(empty_hub / "checkpoints" / "vgg16-397923af.pth") in message
    assert "lpips_weight=0" in message and "place that file" in message


def test_training_with_lpips_stops_at_start_up_without_the_backbone(empty_hub, tmp_path, monkeypatch):
    def no_data(*args):
        raise AssertionError("training must stop before reading any data")

    monkeypatch.setattr(stage_1, "build_dataset", no_data)
    cfg = AutoencoderExperimentConfig(loss=LossConfig(lpips_weight=1.0, lpips_net="alex"))
    with pytest.raises(FileNotFoundError, match=r"alexnet-owt-7be5be79\.pth"):
        stage_1.train_autoencoder(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
