"""The model folder: what save_pretrained writes, that it loads back to the same images, and clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from ldm import LatentDiffusionPipeline
from ldm.generation.model_folder import SAMPLING_DEFAULTS, SamplingDefaults
from ldm.generation.noise_schedule import NoiseScheduleConfig
from tests.pipeline.tiny_models import tiny_pipeline


def sample(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "output_type": "np", "progress": False, **kwargs}
    return pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_folder_is_a_stable_diffusion_pipeline_with_safetensors_only(model_folder):
    index = json.loads((model_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"][0] == "transformers"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    for absent in ("safety_checker", "feature_extractor", "image_encoder"):
        assert index[absent] == [None, None]
    assert index["requires_safety_checker"] is False
    scheduler = json.loads((model_folder / "scheduler" / "scheduler_config.json").read_text())
    assert NoiseScheduleConfig.from_scheduler_config(scheduler) == NoiseScheduleConfig()
    assert json.loads((model_folder / SAMPLING_DEFAULTS).read_text()) == vars(SamplingDefaults())
    weights = {p.relative_to(model_folder).parent.as_posix() for p in model_folder.rglob("*.safetensors")}
    assert weights == {"vae", "unet", "text_encoder"}
    assert not [p for p in model_folder.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]


def test_reloaded_pipeline_draws_identical_images(pipe, model_folder):
    loaded = LatentDiffusionPipeline.from_pretrained(model_folder)
    assert loaded.vae.config.scaling_factor == 0.5
    np.testing.assert_array_equal(sample(loaded, guidance_scale=3.0), sample(pipe, guidance_scale=3.0))


def test_learned_range_schedule_and_sampling_defaults_survive_the_round_trip(tmp_path):
    schedule = NoiseScheduleConfig(beta_schedule="cosine", prediction="v", variance="learned_range")
    defaults = SamplingDefaults(guidance_scale=2.5, num_inference_steps=3, sampler="ddpm", eta=0.0)
    pipe = tiny_pipeline(schedule, defaults)
    loaded = LatentDiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "model"))
    assert loaded.noise_schedule == schedule
    assert loaded.defaults == defaults
    assert loaded.unet.config.out_channels == 8  # 2 x 4 latent channels: mean and variance
    # The defaults drive a call that leaves them unset: 3 DDPM steps, which draws step noise.
    out = loaded(
        "a red circle",
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        return_trajectory=True,
        progress=False,
    )
    assert out.trajectory.shape == (4, 1, 4, 8, 8)
    again = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent", progress=False)
    torch.testing.assert_close(out.images, again.images, rtol=0, atol=0)


def test_float64_loading_and_moving(model_folder):
    loaded = LatentDiffusionPipeline.from_pretrained(model_folder, torch_dtype=torch.float64, device="cpu")
    assert loaded.dtype == torch.float64 and loaded.text_encoder.model.dtype == torch.float64
    images = sample(loaded, num_inference_steps=2)
    assert images.dtype == np.float32 and images.shape == (2, 16, 16, 3)
    loaded.to(dtype=torch.float32)
    assert loaded.vae.dtype == loaded.unet.dtype == torch.float32


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("model_index.json", "model_index.json is missing"),
        ("vae", "component 'vae' is missing"),
        ("unet", "component 'unet' is missing"),
        ("text_encoder", "component 'text_encoder' is missing"),
        ("tokenizer", "component 'tokenizer' is missing"),
        ("scheduler", "component 'scheduler' is missing"),
        ("unet/diffusion_pytorch_model.safetensors", "component 'unet' has no .safetensors weights"),
    ],
)
def test_incomplete_folder_names_the_missing_component(model_folder, tmp_path, remove, message):
    broken = shutil.copytree(model_folder, tmp_path / "broken")
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=message) as info:
        LatentDiffusionPipeline.from_pretrained(broken)
    assert str(broken) in str(info.value)


def test_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "nowhere")


def test_bad_sampling_defaults_file_names_file_and_key(model_folder, tmp_path):
    folder = shutil.copytree(model_folder, tmp_path / "model")
    (folder / SAMPLING_DEFAULTS).write_text(json.dumps({"guidance": 3.0}))
    with pytest.raises(ValueError, match=f"{SAMPLING_DEFAULTS}: unknown key 'guidance'"):
        LatentDiffusionPipeline.from_pretrained(folder)
    (folder / SAMPLING_DEFAULTS).write_text(json.dumps({"guidance_scale": -1.0}))
    with pytest.raises(ValueError, match=f"{SAMPLING_DEFAULTS}: guidance_scale: must be >= 0"):
        LatentDiffusionPipeline.from_pretrained(folder)


def test_folder_without_sampling_defaults_gets_the_defaults(model_folder, tmp_path):
    folder = shutil.copytree(model_folder, tmp_path / "model")
    (folder / SAMPLING_DEFAULTS).unlink()  # e.g. a Stable Diffusion folder from elsewhere
    assert LatentDiffusionPipeline.from_pretrained(folder).defaults == SamplingDefaults()


def test_the_folder_takes_every_sampler_of_the_table_and_no_other():
    from ldm.diffusion import SAMPLER_NAMES

    assert [SamplingDefaults(sampler=name).sampler for name in SAMPLER_NAMES] == list(SAMPLER_NAMES)
    with pytest.raises(ValueError, match="sampler: must be one of ddim, ddpm"):
        SamplingDefaults(sampler="euler")
