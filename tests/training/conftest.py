import pytest
import torch
from diffusers import AutoencoderKL

from conditioning import TextEncoderConfig
from ldm.data import DataConfig
from ldm.training import DiffusionExperimentConfig, DiffusionTrainConfig, ValidationConfig
from ldm.unet import UNetConfig


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs on one torch thread (tests/conftest.py)."""


@pytest.fixture
def tiny_vae_dir(tmp_path):
    """A random f=2 AutoencoderKL saved as a stage-1 output folder, with a non-trivial scaling factor."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.7,
    )
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    return tmp_path / "vae"


@pytest.fixture
def tiny_config(tiny_vae_dir):
    """A stage-2 run small enough for a unit test: 16 px shapes, 8x8 latents, a 2-level U-Net."""

    def make(**train: object) -> DiffusionExperimentConfig:
        settings = {"steps": 6, "batch_size": 8, "warmup_steps": 2, "sample_every": 3, "checkpoint_every": 3}
        settings |= {"log_every": 1, "num_threads": 1, "lr": 1e-3}
        return DiffusionExperimentConfig(
            autoencoder=str(tiny_vae_dir),
            data=DataConfig(resolution=16, num_samples=48, heldout_samples=8),
            text_encoder=TextEncoderConfig(
                hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=16
            ),
            unet=UNetConfig(block_out_channels=(32, 32), cross_attention=(True, True), attention_head_dim=16),
            train=DiffusionTrainConfig(**(settings | train)),
            validation=ValidationConfig(
                prompts=["a red circle", "a blue square"], images_per_prompt=1, num_inference_steps=3
            ),
        )

    return make
