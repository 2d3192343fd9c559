import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL

from conditioning import TextEncoderConfig
from ldm.data import DataConfig
from ldm.training import DiffusionExperimentConfig, DiffusionTrainConfig, ValidationConfig
from ldm.unet import UNetConfig


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs on one torch thread (tests/conftest.py)."""


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state whose precision cannot change: a test that sets its own
    precision starts and ends clean (as accelerate's own test cases do)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


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


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb in offline mode, quiet, with its own folders under tmp_path (nothing in ~/.cache or ~/.config)."""
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_ERROR_REPORTING": "false",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("CACHE_DIR", "CONFIG_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / "wandb_home" / name.lower()))


@pytest.fixture
def train(request, tiny_config):
    """`train(out, resume=None, **train_settings)`: a tiny in-process run of the stage in `request.param`
    ("autoencoder" or "diffusion"); parametrize it with indirect=True."""
    from ldm.training import train_autoencoder, train_diffusion
    from tests.training.test_train_autoencoder import tiny_config as tiny_autoencoder_config

    if request.param == "autoencoder":
        return lambda out, resume=None, **tc: train_autoencoder(tiny_autoencoder_config(**tc), out, resume)
    return lambda out, resume=None, **tc: train_diffusion(tiny_config(**tc), out, resume)
