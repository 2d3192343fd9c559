"""Both stages end to end, as `ldm quickstart` runs them, at a size a unit test affords."""

import pytest
import torch

from autoencoder.config import LossConfig, ModelConfig
from ldm import LatentDiffusionPipeline
from ldm.commands.quickstart import run_quickstart
from ldm.data import DataConfig
from ldm.training import AutoencoderExperimentConfig, AutoencoderTrainConfig

pytestmark = pytest.mark.training


def test_both_stages_train_save_reload_and_sample(tiny_config, tmp_path, capsys):
    data = DataConfig(resolution=16, num_samples=128, heldout_samples=16)
    ae_cfg = AutoencoderExperimentConfig(
        model=ModelConfig(block_out_channels=(16, 16), latent_channels=4, norm_num_groups=8, sample_size=16),
        loss=LossConfig(),
        train=AutoencoderTrainConfig(steps=30, batch_size=16, eval_samples=16, scale_samples=32, num_threads=1),
        data=data,
    )
    ldm_cfg = tiny_config(steps=30)
    ldm_cfg.data = data
    ldm_cfg.text_encoder.frozen = False  # the quickstart's setting: layers train, the token table stays fixed
    ldm_cfg.text_encoder.train_token_embedding = False

    grid = run_quickstart(tmp_path, 0, ae_cfg, ldm_cfg, prompts=("a red circle", "a blue square"))

    assert grid.is_file() and (tmp_path / "autoencoder" / "vae" / "config.json").is_file()
    assert ldm_cfg.autoencoder == str(tmp_path / "autoencoder" / "vae")  # stage 2 trained on stage 1's VAE
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    trained_scale = pipe.vae.config.scaling_factor
    assert trained_scale != 1.0  # stage 1 measured and stored it
    images = [
        pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
        for _ in range(2)
    ]
    assert images[0].shape == (1, 16, 16, 3) and (images[0] == images[1]).all()
    summary = capsys.readouterr().out
    assert "quickstart finished" in summary and str(tmp_path / "pipeline") in summary
