"""LPIPS never runs on a random backbone: a missing backbone file stops start-up with a clear message."""

import pytest
import torch

from autoencoder.config import AutoencoderConfig, LossConfig
from autoencoder.perceptual import backbone_weight_path, build_lpips, lpips_backbone_available
from autoencoder.trainer import train_autoencoder


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


def test_training_with_lpips_stops_at_start_up_without_the_backbone(empty_hub, tmp_path):
    def no_batches():
        raise AssertionError("training must stop before reading any data")
        yield

    cfg = AutoencoderConfig(loss=LossConfig(lpips_weight=1.0, lpips_net="alex"))
    with pytest.raises(FileNotFoundError, match=r"alexnet-owt-7be5be79\.pth"):
        train_autoencoder(cfg, no_batches(), no_batches(), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
