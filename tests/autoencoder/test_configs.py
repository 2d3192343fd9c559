"""The autoencoder's YAML configs load into the typed dataclasses; the CPU one equals the defaults."""

from pathlib import Path

import pytest

from ldm.cli import build_parser
from ldm.config import ConfigError, load_config
from ldm.training import AutoencoderExperimentConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_cpu_config_equals_the_dataclass_defaults():
    assert load_config(AutoencoderExperimentConfig, CONFIGS / "autoencoder_shapes_cpu.yaml") == (
        AutoencoderExperimentConfig()
    )
    assert AutoencoderExperimentConfig().model.downsampling_factor == 4


def test_gpu_config_is_sd_sized():
    cfg = load_config(AutoencoderExperimentConfig, CONFIGS / "autoencoder_sd_f8_256.yaml")
    assert cfg.model.downsampling_factor == 8 and cfg.model.latent_channels == 4
    assert cfg.model.block_out_channels == (128, 256, 512, 512) and cfg.data.resolution == 256
    assert cfg.loss.lpips_weight == 1.0 and cfg.loss.use_discriminator


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        load_config(AutoencoderExperimentConfig, None, ["model.block_out_channels=[24, 48]"])
    with pytest.raises(ConfigError, match="lossy"):
        load_config(AutoencoderExperimentConfig, None, ["lossy.kl_weight=1"])


def test_cli_parses_train_autoencoder():
    args = build_parser().parse_args(["train-autoencoder", "--set", "train.steps=3", "--resume", "latest"])
    assert args.command == "train-autoencoder" and args.overrides == ["train.steps=3"] and args.resume == "latest"
