"""A consistency-distilled model folder: its U-Net takes the guidance scale (time_cond_proj_dim), its scheduler config
is LCMScheduler's, and it defaults to sampler "lcm". diffusers' StableDiffusionPipeline loads the same folder and,
from the same latents with the same guidance, steps and generator, draws the same latents as our pipeline.

The student here is the tiny random U-Net with a random guidance-embedding map (cond_proj), so w visibly changes
its output: a pipeline that ran classifier-free guidance, embedded w instead of w - 1, or dropped the embedding
would draw other latents.
"""

import copy
import json
from collections import Counter

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from ldm.generation import LatentDiffusionPipeline, SamplingDefaults
from ldm.generation.noise_schedule import NoiseScheduleConfig
from tests.pipeline.test_pipeline_host_round_trips import count_pipeline_steps
from tests.pipeline.tiny_models import IMAGE_SIZE, LATENT_CHANNELS, tiny_text_encoder, tiny_unet, tiny_vae

PROMPTS = ["a red circle", "two blue squares on grey"]
LATENT_SHAPE = (2, LATENT_CHANNELS, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
TOLERANCE = 1e-5  # of the latents' scale, as test_pipeline_matches_diffusers.py holds the other samplers
ORIGINAL_STEPS = 8  # the skip-step schedule the folder says it was distilled on (LCMScheduler's default is 50)
DEFAULTS = SamplingDefaults(guidance_scale=4.0, num_inference_steps=4, sampler="lcm")


def student_unet(seed: int = 0) -> UNet2DConditionModel:
    """The tiny U-Net with a 32-wide guidance embedding input, its map random (so w changes the output)."""
    torch.manual_seed(seed + 1)
    return UNet2DConditionModel.from_config(tiny_unet(seed).config, time_cond_proj_dim=32)


def distilled_pipeline(timestep_scaling: float = 10.0) -> LatentDiffusionPipeline:
    schedule = NoiseScheduleConfig(original_inference_steps=ORIGINAL_STEPS, timestep_scaling=timestep_scaling)
    encoder = copy.deepcopy(tiny_text_encoder())
    return LatentDiffusionPipeline(tiny_vae(), encoder, student_unet(), schedule, DEFAULTS)


@pytest.fixture(scope="module")
def distilled_folder(tmp_path_factory):
    return distilled_pipeline().save_pretrained(tmp_path_factory.mktemp("distilled"))


@pytest.fixture(scope="module")
def ours(distilled_folder) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline.from_pretrained(distilled_folder)


def diffusers_pipeline(folder, scheduler_class=LCMScheduler) -> StableDiffusionPipeline:
    sd = StableDiffusionPipeline.from_pretrained(folder)
    sd.scheduler = scheduler_class.from_config(sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    return sd


def x_T() -> torch.Tensor:
    return torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(3))


def seed(value: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(value)


def our_latents(pipe: LatentDiffusionPipeline, **kwargs) -> torch.Tensor:
    return pipe(PROMPTS, latents=x_T(), generator=seed(), output_type="latent", progress=False, **kwargs).images


def their_latents(sd: StableDiffusionPipeline, guidance_scale: float, steps: int) -> torch.Tensor:
    return sd(PROMPTS, latents=x_T(), generator=seed(), guidance_scale=guidance_scale, num_inference_steps=steps,
              output_type="latent", height=IMAGE_SIZE, width=IMAGE_SIZE).images  # fmt: skip


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape == LATENT_SHAPE
    assert (ours - theirs).abs().max().item() <= TOLERANCE * theirs.abs().max().item()


def test_the_folder_is_an_lcm_folder_diffusers_loads(distilled_folder, ours):
    config = json.loads((distilled_folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "LCMScheduler"
    assert (config["original_inference_steps"], config["timestep_scaling"]) == (ORIGINAL_STEPS, 10.0)
    index = json.loads((distilled_folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    sd = StableDiffusionPipeline.from_pretrained(distilled_folder)
    assert isinstance(sd.scheduler, LCMScheduler) and sd.scheduler.config.original_inference_steps == ORIGINAL_STEPS
    assert sd.unet.config.time_cond_proj_dim == 32
    assert ours.defaults == DEFAULTS and ours.noise_schedule == distilled_pipeline().noise_schedule
    assert ours.guidance_in_unet


def test_lcm_on_the_distilled_folder_draws_what_diffusers_lcm_scheduler_draws(distilled_folder, ours):
    """Our defaults (lcm, 4 steps, w = 4) against StableDiffusionPipeline with LCMScheduler at the same settings:
    one U-Net pass per step with timestep_cond = the embedding of w - 1, fresh noise from the generator."""
    sd = diffusers_pipeline(distilled_folder)
    theirs = their_latents(sd, 4.0, 4)
    assert_same(our_latents(ours), theirs)
    # Each can fail: another w is another embedding, other steps other timesteps, another seed other noise.
    scale = theirs.abs().max().item()
    assert (our_latents(ours, guidance_scale=5.0) - theirs).abs().max().item() > 100 * TOLERANCE * scale
    assert (our_latents(ours, num_inference_steps=3) - theirs).abs().max().item() > 100 * TOLERANCE * scale
    other_seed = ours(PROMPTS, latents=x_T(), generator=seed(1), output_type="latent", progress=False).images
    assert (other_seed - theirs).abs().max().item() > 100 * TOLERANCE * scale


def test_lcm_reads_the_folders_timestep_scaling_as_diffusers_does(tmp_path):
    """At timestep_scaling 0.05 the boundary condition's c_skip x_t term is large enough to show."""
    folder = distilled_pipeline(timestep_scaling=0.05).save_pretrained(tmp_path / "model")
    theirs = their_latents(diffusers_pipeline(folder), 2.0, 3)
    assert_same(our_latents(LatentDiffusionPipeline.from_pretrained(folder), guidance_scale=2.0,
                            num_inference_steps=3), theirs)  # fmt: skip


def test_another_sampler_on_the_distilled_folder_also_passes_the_guidance_embedding(distilled_folder, ours):
    """DDIM on the student: diffusers still feeds the U-Net timestep_cond and runs no CFG, and so do we."""
    theirs = their_latents(diffusers_pipeline(distilled_folder, DDIMScheduler), 3.0, 5)
    assert_same(our_latents(ours, sampler="ddim", guidance_scale=3.0, num_inference_steps=5), theirs)


def test_lcm_image_to_image_runs_lcm_schedulers_last_steps(ours):
    """Image to image with sampler lcm equals LCMScheduler's own step code in our loop (`scheduler=`, diffusers'
    img2img start: add_noise at the first kept timestep, then set_begin_index), from the same generator."""
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=seed(5))
    kwargs = {"image": image, "strength": 0.5, "num_inference_steps": 6, "output_type": "latent", "progress": False}
    lcm = ours(PROMPTS, sampler="lcm", generator=seed(), **kwargs).images
    scheduler = ours(PROMPTS, scheduler=LCMScheduler, generator=seed(), **kwargs).images
    assert_same(lcm, scheduler)


def test_lcm_on_a_teacher_folder_guides_as_diffusers_does(pipe, model_folder):
    """A folder whose U-Net takes no w (and that records no original_inference_steps): lcm runs CFG, and LCMScheduler
    built from its DDIM config takes the default 50-step skip schedule, as ours does."""
    theirs = their_latents(diffusers_pipeline(model_folder), 5.0, 4)
    assert_same(our_latents(pipe, sampler="lcm", guidance_scale=5.0, num_inference_steps=4), theirs)


def test_a_step_with_the_guidance_embedding_makes_no_host_round_trip(ours, monkeypatch):
    """The w embedding is built once per call; each step only expands it, on the device."""
    steps = count_pipeline_steps(ours, "lcm", monkeypatch, generator=seed(), output_type="latent", progress=False)
    for trips in steps:
        assert trips.syncs == Counter(), str(trips)
        assert trips.host_data == Counter(), str(trips)


# ---- named errors ----------------------------------------------------------------------------------------


def test_more_steps_than_the_folders_skip_step_schedule_are_refused_by_name(ours):
    assert our_latents(ours, num_inference_steps=ORIGINAL_STEPS).shape == LATENT_SHAPE
    with pytest.raises(ValueError, match=rf"^num_inference_steps: 9 is more than the {ORIGINAL_STEPS} timesteps"):
        ours(PROMPTS, num_inference_steps=ORIGINAL_STEPS + 1)
    assert our_latents(ours, sampler="ddim", num_inference_steps=12).shape == LATENT_SHAPE  # DDIM's chain is 1000


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"karras_sigmas": True}, r"^karras_sigmas: sampler 'lcm' visits the timesteps"),
        ({"eta": 0.5}, r"^eta: is DDIM's noise; sampler 'lcm' takes none"),
        ({"negative_prompt": "blurry"}, r"^negative_prompt: this model's U-Net takes the guidance scale as an input"),
        ({"guidance_rescale": 0.5}, r"^guidance_rescale: this model's U-Net takes the guidance scale as an input"),
    ],
    ids=["karras", "eta", "negative_prompt", "guidance_rescale"],
)
def test_options_that_do_not_apply_are_refused_by_name(ours, options, message):
    with pytest.raises(ValueError, match=message):
        ours(PROMPTS, **options)
