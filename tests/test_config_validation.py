"""The shipped configs reject bad values when they are read: unknown keys, wrong types and impossible values
(a resolution the autoencoder or the U-Net cannot divide evenly) name the file and the key, before any work."""

import json
from pathlib import Path

import pytest

from ldm.cli import main
from ldm.config import ConfigError, load_config
from ldm.training import AutoencoderExperimentConfig, DiffusionExperimentConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
AUTOENCODER_YAML = CONFIGS / "autoencoder_shapes_cpu.yaml"
DIFFUSION_YAML = CONFIGS / "diffusion_shapes_cpu.yaml"


@pytest.fixture
def vae_f4(tmp_path):
    """A stage-1 output folder as far as the config check reads it: config.json of a 3-level (f = 4) VAE."""
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"block_out_channels": [32, 32, 32], "latent_channels": 4}))
    return folder


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.levels=3", "unknown key 'model.levels'"),
        ("train.steps=many", "train.steps: expected an integer, got 'many'"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("loss.lpips_net=resnet", "loss.lpips_net: 'resnet' is not one of"),
        ("train.batch_size=0", "batch_size: must be >= 1, got 0"),
        ("data.resolution=30", "data.resolution: 30 is not a multiple of the autoencoder's downsampling factor f=4"),
        ("data.resolution=34", "f=4 (model.block_out_channels has 3 levels); use a multiple of 4"),
    ],
)
def test_autoencoder_config_errors_name_file_and_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(AutoencoderExperimentConfig, AUTOENCODER_YAML, [override])
    assert str(AUTOENCODER_YAML) in str(info.value) and message in str(info.value)


def test_autoencoder_resolution_is_checked_against_a_pretrained_vae(vae_f4):
    cfg = load_config(AutoencoderExperimentConfig, AUTOENCODER_YAML, [f"model.pretrained={vae_f4}"])
    assert cfg.data.resolution == 32
    with pytest.raises(ConfigError, match=f"f=4 \\(model.pretrained {vae_f4}\\)"):
        load_config(AutoencoderExperimentConfig, AUTOENCODER_YAML, [f"model.pretrained={vae_f4}", "data.resolution=34"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.learning_rate=1e-4"], "unknown key 'train.learning_rate'"),
        (["unet.block_out_channels=wide"], "unet.block_out_channels: expected a list"),
        (["train.ema_decay=high"], "train.ema_decay: expected a number"),
        (["validation.sampler=euler"], "validation: sampler: must be one of ddim, ddpm, dpmpp_2m"),
        (["train.ema_decay=1.0"], "ema_decay: must be in [0, 1)"),
        (["data.resolution=30"], "data.resolution: 30 is not a multiple of the downsampling factor f=4"),
        (["data.resolution=36"], "36 gives 9x9 latents (f=4), which the U-Net's 2 levels cannot halve 1 times"),
        (["data.resolution=36"], "use a multiple of 8"),
        (["text_encoder.text_encoder_subfolder=../../etc"], "text_encoder_subfolder: must be a folder inside"),
        (["text_encoder.tokenizer_subfolder=/tmp/tokenizer"], "tokenizer_subfolder: must be a folder inside"),
    ],
)
def test_diffusion_config_errors_name_file_and_key(vae_f4, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(DiffusionExperimentConfig, DIFFUSION_YAML, [f"autoencoder={vae_f4}", *overrides])
    assert str(DIFFUSION_YAML) in str(info.value) and message in str(info.value)


def test_without_a_local_vae_the_unet_alone_bounds_the_resolution(tmp_path):
    missing = tmp_path / "not_trained_yet" / "vae"
    cfg = load_config(DiffusionExperimentConfig, DIFFUSION_YAML, [f"autoencoder={missing}", "data.resolution=48"])
    assert cfg.data.resolution == 48  # some VAE factor (f = 2, 8) would fit; the trainer checks the real one
    with pytest.raises(ConfigError, match=r"data\.resolution: 33 is not a multiple of the U-Net.s downsampling"):
        load_config(DiffusionExperimentConfig, DIFFUSION_YAML, [f"autoencoder={missing}", "data.resolution=33"])


def test_a_vae_config_without_block_out_channels_is_named(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"latent_channels": 4}))
    with pytest.raises(ConfigError, match=r"vae/config\.json: 'block_out_channels' must be a non-empty list"):
        load_config(DiffusionExperimentConfig, DIFFUSION_YAML, [f"autoencoder={tmp_path / 'vae'}"])


@pytest.mark.parametrize(
    ("command", "config", "extra"),
    [
        ("train-autoencoder", AUTOENCODER_YAML, []),
        ("train-diffusion", DIFFUSION_YAML, ["autoencoder={vae}"]),
    ],
)
def test_an_impossible_resolution_stops_the_cli_before_any_output(vae_f4, tmp_path, capsys, command, config, extra):
    out = tmp_path / "run"
    sets = [arg for item in [*extra, "data.resolution=30"] for arg in ("--set", item.format(vae=vae_f4))]
    with pytest.raises(SystemExit) as info:
        main([command, "--config", str(config), "--output-dir", str(out), *sets])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"ldm {command}: error: {config}: ") and "data.resolution: 30" in err
    assert not out.exists()  # nothing was started: no config.yaml, no logs, no checkpoints
