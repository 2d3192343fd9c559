"""Fine-tuning a Stable Diffusion folder as it is downloaded, with configs/finetune_sd15.yaml as shipped: only the
paths, the data and the sizes are replaced by a tiny SD-1.x folder that diffusers itself wrote."""

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTextModel

from ldm.config import load_config
from ldm.training import DiffusionExperimentConfig, train_diffusion
from ldm.training.diffusion_stage import load_vae
from tests.pipeline.test_sd_folders import assert_same, latents_of_both, sd_folder
from tests.pipeline.tiny_models import IMAGE_SIZE

FINETUNE_SD15 = Path(__file__).resolve().parents[2] / "configs" / "finetune_sd15.yaml"


def finetune_config(folder: Path, *overrides: str) -> DiffusionExperimentConfig:
    """configs/finetune_sd15.yaml on `folder`, sized for a unit test (16 px shapes, a few steps of 4 images)."""
    paths = [f"{key}={folder}" for key in ("autoencoder", "text_encoder.pretrained", "unet.pretrained")]
    tiny = ["data.source=shapes", f"data.resolution={IMAGE_SIZE}", "data.num_samples=16", "data.heldout_samples=4"]
    tiny += ["train.steps=3", "train.batch_size=4", "train.warmup_steps=1", "train.num_workers=0"]
    tiny += ["train.log_with=none", "train.log_every=1", "train.sample_every=100", "train.checkpoint_every=100"]
    tiny += ["train.lr=1e-3", "validation.images_per_prompt=1", "validation.num_inference_steps=2"]
    return load_config(DiffusionExperimentConfig, FINETUNE_SD15, [*paths, *tiny, *overrides])


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.training
@pytest.mark.usefixtures("fresh_accelerate_state")  # the config's bf16, whatever ran before
def test_the_sd15_config_fine_tunes_a_downloaded_folder_end_to_end(tmp_path):
    folder = sd_folder(tmp_path)
    out = tmp_path / "run"
    cfg = finetune_config(folder)
    assert cfg.train.mixed_precision == "bf16" and cfg.train.gradient_checkpointing  # as shipped
    metrics = train_diffusion(cfg, out)
    assert metrics["step"] == 3 and metrics["latent_cache"]
    exported = out / "pipeline"
    # The VAE and CLIP stayed frozen, with the folder's own scaling factor; the U-Net trained.
    vae = AutoencoderKL.from_pretrained(exported, subfolder="vae", use_safetensors=True)
    assert same_weights(vae, AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True))
    assert vae.config.scaling_factor == 0.5  # the tiny folder's (tests/pipeline/tiny_models.py), not 0.18215
    encoder = CLIPTextModel.from_pretrained(exported, subfolder="text_encoder", use_safetensors=True)
    assert same_weights(encoder, CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True))
    trained = load_file(exported / "unet" / "diffusion_pytorch_model.safetensors")
    before = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert trained.keys() == before.keys()
    assert any(not torch.equal(trained[k], before[k]) for k in before)
    assert metrics["trainable_parameters"] == sum(p.numel() for p in before.values())
    # The export samples as the folder did (SD's set_alpha_to_one: false and steps_offset: 1 kept), in our
    # pipeline and in diffusers' own.
    scheduler = StableDiffusionPipeline.from_pretrained(exported).scheduler.config
    assert not scheduler.set_alpha_to_one and scheduler.steps_offset == 1
    assert_same(*latents_of_both(exported))
    assert (out / "samples" / "final.png").is_file()


def test_a_config_with_another_noise_process_than_the_folder_says_so(tmp_path, caplog):
    folder = sd_folder(tmp_path)
    finetune_config(folder)  # SD's own schedule: nothing to say
    assert "another noise process" not in caplog.text
    finetune_config(folder, "noise.prediction=v", "noise.set_alpha_to_one=true")
    assert "noise.prediction: 'v' (the folder's: 'eps')" in caplog.text
    assert "noise.set_alpha_to_one: True (the folder's: False)" in caplog.text


def test_variant_weights_of_the_autoencoder_load(tmp_path):
    folder = sd_folder(tmp_path)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
    vae.save_pretrained(folder / "vae", variant="fp16", safe_serialization=True)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()  # only the variant is left
    with pytest.raises(OSError):
        load_vae(str(folder))
    assert same_weights(load_vae(str(folder), "fp16"), vae)
