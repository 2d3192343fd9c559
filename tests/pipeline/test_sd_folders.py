"""Stable Diffusion folders as they are downloaded: every component diffusers writes (safety checker and feature
extractor included), a PNDM scheduler config with SD's `set_alpha_to_one: false` and `steps_offset: 1`, pickled
`.bin` weights beside the safetensors. Our pipeline loads the folder and its DDIM draws the latents diffusers'
`StableDiffusionPipeline` draws with `DDIMScheduler.from_config` of the same folder, to float32 precision.

The comparison is of latents: diffusers runs its (random, tiny) safety checker on decoded images, which may
black some of them out.
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor

from ldm.generation import LatentDiffusionPipeline
from tests.pipeline.tiny_models import IMAGE_SIZE, tiny_text_encoder, tiny_unet, tiny_vae

PROMPTS = ["a red circle", "two blue squares on grey"]
TINY_CLIP = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}


def tiny_safety_checker() -> StableDiffusionSafetyChecker:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={**TINY_CLIP, "vocab_size": 99},
        vision_config={**TINY_CLIP, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    return StableDiffusionSafetyChecker(config)


def sd_folder(tmp_path, prediction: str = "epsilon", **scheduler_config) -> Path:
    """A tiny SD-1.x (epsilon) or SD-2.x (v_prediction) folder written by diffusers itself. Its scheduler config
    also carries `scheduler_config` (clip_sample false, as SD's snapshots do: PNDMScheduler has no such argument,
    and diffusers' DDIMScheduler defaults to clipping when the key is missing)."""
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
        steps_offset=1, skip_prk_steps=True, prediction_type=prediction,
    )  # fmt: skip
    encoder = tiny_text_encoder()
    sd = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=encoder.model, tokenizer=encoder.tokenizer, unet=tiny_unet(seed=3),
        scheduler=scheduler, safety_checker=tiny_safety_checker(),
        feature_extractor=CLIPImageProcessor(size=32, crop_size=32), requires_safety_checker=True,
    )  # fmt: skip
    folder = tmp_path / "sd"
    sd.save_pretrained(folder, safe_serialization=False)  # .bin files, as older snapshots carry them
    sd.save_pretrained(folder, safe_serialization=True)  # and the safetensors beside them
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"clip_sample": False} | scheduler_config))
    return folder


def latents_of_both(folder: Path, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    ours = LatentDiffusionPipeline.from_pretrained(folder)
    theirs = StableDiffusionPipeline.from_pretrained(folder)
    # From the file: StableDiffusionPipeline's constructor rewrites a loaded config's clip_sample: true to false
    # (and steps_offset to 1) as outdated; we sample what the folder says, as DDIMScheduler does with it.
    theirs.scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(folder, subfolder="scheduler"))
    theirs.set_progress_bar_config(disable=True)
    settings = {"guidance_scale": 5.0, "num_inference_steps": 7, "output_type": "latent", **kwargs}
    a = ours(PROMPTS, sampler="ddim", generator=torch.Generator().manual_seed(0), progress=False, **settings).images
    b = theirs(PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE, generator=torch.Generator().manual_seed(0), **settings)
    return a, b.images


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float = 1e-5) -> None:
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance * theirs.abs().max().item())


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"], ids=["sd1", "sd2"])
def test_a_downloaded_sd_folder_draws_diffusers_ddim_latents(tmp_path, prediction):
    """The last DDIM step lands on alphabar_0 (`set_alpha_to_one: false`), not on 1: it used to differ."""
    assert_same(*latents_of_both(sd_folder(tmp_path, prediction)))


@pytest.mark.parametrize(
    "config",
    [
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
    ],
    ids=["clip_sample", "thresholding"],
)
def test_the_folders_clipping_of_x0_is_honoured(tmp_path, config):
    folder = sd_folder(tmp_path, **config)
    ours, theirs = latents_of_both(folder)
    assert_same(ours, theirs, 1e-4)  # torch.quantile's float32 interpolation differs in the last digits
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    plain = pipe(
        PROMPTS, sampler="ddim", guidance_scale=5.0, num_inference_steps=7, output_type="latent",
        threshold=lambda x0: x0, generator=torch.Generator().manual_seed(0), progress=False,
    ).images  # fmt: skip
    assert not torch.allclose(plain, ours)  # the clipping changed the draw, so the test can tell


def test_inversion_starts_where_the_folders_ddim_ends(tmp_path):
    """With set_alpha_to_one false, DDIM's last step leaves x at alphabar_0; inversion starts from that level,
    as diffusers' DDIMInverseScheduler does with the same config."""
    from diffusers import DDIMInverseScheduler

    from ldm.diffusion import ddim_invert

    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder(tmp_path))
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler_config)
    inverse.set_timesteps(10)
    cond, _ = pipe.encode_prompt(PROMPTS)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def model(x, t, **_):
        return pipe.unet(x, t, encoder_hidden_states=cond).sample

    x = x0
    for t in inverse.timesteps:
        x = inverse.step(model(x, t.expand(2)), t, x).prev_sample
    final = pipe.noise_schedule.final_alphabar(pipe.diffusion)
    ours = ddim_invert(model, pipe.diffusion, x0, num_steps=10, steps_offset=1, final_alphabar=final, progress=False)
    torch.testing.assert_close(ours.sample, x, rtol=1e-4, atol=1e-4)


def test_a_scheduler_config_with_an_unknown_spacing_is_refused_by_name(tmp_path):
    folder = sd_folder(tmp_path)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text()) | {"timestep_spacing": "uniform"}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"scheduler_config\.json: timestep_spacing 'uniform' is not one of"):
        LatentDiffusionPipeline.from_pretrained(folder)


def test_fp16_variant_weights_load_by_name(tmp_path):
    """A snapshot with only `*.fp16.safetensors` loads with variant="fp16", to the latents diffusers draws from
    the same files; without the variant the error names it."""
    folder = tmp_path / "fp16"
    StableDiffusionPipeline.from_pretrained(sd_folder(tmp_path)).to(torch.float16).save_pretrained(
        folder, variant="fp16", safe_serialization=True
    )
    with pytest.raises(OSError, match=r"component 'vae' cannot be loaded .*pass variant='fp16'"):
        LatentDiffusionPipeline.from_pretrained(folder)
    ours = LatentDiffusionPipeline.from_pretrained(folder, variant="fp16")
    assert ours.dtype == torch.float32  # fp16 weights, read into float32 (torch_dtype= picks another)
    theirs = StableDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
    theirs.scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(folder, subfolder="scheduler"))
    theirs.set_progress_bar_config(disable=True)
    settings = {"guidance_scale": 5.0, "num_inference_steps": 7, "output_type": "latent"}
    a = ours(PROMPTS, sampler="ddim", generator=torch.Generator().manual_seed(0), progress=False, **settings).images
    b = theirs(PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE, generator=torch.Generator().manual_seed(0), **settings)
    assert_same(a, b.images)


def test_ldm_generate_loads_variant_weights_with_the_flag(tmp_path, capsys):
    from ldm.cli import main

    folder = tmp_path / "fp16"
    StableDiffusionPipeline.from_pretrained(sd_folder(tmp_path)).to(torch.float16).save_pretrained(
        folder, variant="fp16", safe_serialization=True
    )
    command = ["generate", "a red circle", "--model", str(folder), "--steps", "2", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        main(command)
    assert info.value.code == 2 and "pass variant='fp16'" in capsys.readouterr().err
    assert main([*command, "--variant", "fp16"]) == 0
    assert (tmp_path / "out" / "000-a-red-circle.png").is_file()
