"""diffusers' StableDiffusionPipeline loads our folder and draws the same images as our pipeline.

The two share nothing but the folder: diffusers uses its own tokenizer call, CLIP forward, latent draw,
CFG and DDIM/DDPM scheduler; we use `ldm.diffusion`'s samplers and guidance. With the same seed (a CPU
generator, float32 on CPU) the final latents agree to within 1e-5 of their scale and the images
(in [0, 1]) to 1e-5: only float32 rounding differs (diffusers' schedule arrays are float32, ours
float64).
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from ldm.generation.noise_schedule import NoiseScheduleConfig
from tests.pipeline.tiny_models import IMAGE_SIZE, tiny_pipeline

PROMPTS = ["a red circle", "two blue squares on grey"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def diffusers_pipe(model_folder) -> StableDiffusionPipeline:
    sd = StableDiffusionPipeline.from_pretrained(model_folder)
    sd.set_progress_bar_config(disable=True)
    return sd


def both(ours, theirs, sampler="ddim", seed=0, **kwargs):
    """(our output, diffusers' output) for the same arguments and seed, as latents and as np images."""
    results = []
    ours_extra = {"progress": False, "sampler": sampler}
    for pipe, extra in ((ours, ours_extra), (theirs, {"height": IMAGE_SIZE, "width": IMAGE_SIZE})):
        for output_type in ("latent", "np"):
            generator = torch.Generator().manual_seed(seed)
            results.append(pipe(PROMPTS, generator=generator, output_type=output_type, **kwargs, **extra).images)
    return results


def assert_same(ours_latent, ours_np, theirs_latent, theirs_np):
    assert ours_latent.shape == theirs_latent.shape
    scale = theirs_latent.abs().max().item()
    torch.testing.assert_close(ours_latent, theirs_latent, rtol=0, atol=TOLERANCE * scale)
    np.testing.assert_allclose(ours_np, theirs_np, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"guidance_scale": 7.5, "num_inference_steps": 8},
        {"guidance_scale": 1.0, "num_inference_steps": 8},  # diffusers: no CFG at all, one U-Net pass
        {"guidance_scale": 4.0, "num_inference_steps": 6, "eta": 0.7},  # step noise drawn in the same order
        {
            "guidance_scale": 3.0,
            "num_inference_steps": 5,
            "negative_prompt": ["blurry", "dark"],
            "num_images_per_prompt": 2,
        },
    ],
    ids=["cfg", "no-guidance", "eta", "negative-and-two-per-prompt"],
)
def test_ddim_matches_diffusers(pipe, diffusers_pipe, kwargs):
    assert_same(*both(pipe, diffusers_pipe, **kwargs))


def test_ddpm_matches_diffusers_ddpm_scheduler(pipe, diffusers_pipe):
    # diffusers also draws noise at the last step (t = 1 with steps_offset 1), where the variance is 0
    # (floored at 1e-20): it happens after all the draws we make, and adds at most 1e-10 z.
    diffusers_pipe.scheduler = DDPMScheduler.from_config(diffusers_pipe.scheduler.config)
    try:
        assert_same(*both(pipe, diffusers_pipe, sampler="ddpm", guidance_scale=5.0, num_inference_steps=6))
    finally:  # the folder's own scheduler back, for the tests after this one
        diffusers_pipe.scheduler = DDIMScheduler.from_config(diffusers_pipe.scheduler.config)


def test_v_prediction_linear_schedule_matches_diffusers(tmp_path):
    schedule = NoiseScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="v")
    pipe = tiny_pipeline(schedule, seed=1)
    sd = StableDiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "model"))
    sd.set_progress_bar_config(disable=True)
    assert sd.scheduler.config.prediction_type == "v_prediction"
    assert_same(*both(pipe, sd, guidance_scale=6.0, num_inference_steps=7))


def test_trailing_spacing_differs_from_diffusers_ddim_by_design(tmp_path):
    """diffusers' DDIMScheduler steps from t to t - T // n, which for trailing spacing (999, 856, 713, ..., 142
    with n = 7) is not the next timestep of the subset, and its last step lands on alphabar_0 rather than 1.
    Ours steps to the previous timestep *in the subset* and ends at alphabar = 1 (DESIGN.md), so the images
    differ; leading spacing (the default) agrees, see above. This pins the known difference."""
    schedule = NoiseScheduleConfig(prediction="v", timestep_spacing="trailing")
    pipe = tiny_pipeline(schedule, seed=1)
    sd = StableDiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "model"))
    sd.set_progress_bar_config(disable=True)
    ours, _, theirs, _ = both(pipe, sd, guidance_scale=6.0, num_inference_steps=7)
    assert (ours - theirs).abs().max() > 100 * TOLERANCE * theirs.abs().max()


def test_guidance_rescale_matches_diffusers(pipe, diffusers_pipe):
    assert_same(*both(pipe, diffusers_pipe, guidance_scale=7.5, num_inference_steps=6, guidance_rescale=0.7))


def test_a_diffusers_scheduler_object_samples_as_in_diffusers(pipe, diffusers_pipe):
    """`scheduler=` runs diffusers' own step code in our loop: the images equal diffusers' pipeline's with it."""
    scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler_config)
    diffusers_pipe.scheduler = UniPCMultistepScheduler.from_config(diffusers_pipe.scheduler.config)
    try:
        ours_latent, ours_np = (
            pipe(PROMPTS, scheduler=scheduler, guidance_scale=5.0, num_inference_steps=6, output_type=kind,
                 generator=torch.Generator().manual_seed(0), progress=False).images
            for kind in ("latent", "np")
        )  # fmt: skip
        theirs_latent, theirs_np = (
            diffusers_pipe(PROMPTS, guidance_scale=5.0, num_inference_steps=6, output_type=kind,
                           height=IMAGE_SIZE, width=IMAGE_SIZE, generator=torch.Generator().manual_seed(0)).images
            for kind in ("latent", "np")
        )  # fmt: skip
        assert_same(ours_latent, ours_np, theirs_latent, theirs_np)
    finally:
        diffusers_pipe.scheduler = DDIMScheduler.from_config(diffusers_pipe.scheduler.config)


@pytest.mark.parametrize(("sampler", "algorithm"), [("dpmpp_2m", "dpmsolver++"), ("dpmpp_2m_sde", "sde-dpmsolver++")])
def test_dpm_solver_matches_diffusers_on_a_trailing_v_prediction_folder(tmp_path, sampler, algorithm):
    """On trailing spacing our DPM-Solver++ visits diffusers' timesteps (its leading spacing divides by n + 1
    where DDIM's divides by n; ours keeps one spacing for every sampler)."""
    schedule = NoiseScheduleConfig(prediction="v", timestep_spacing="trailing")
    pipe = tiny_pipeline(schedule, seed=1)
    sd = StableDiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "model"))
    sd.set_progress_bar_config(disable=True)
    sd.scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config, algorithm_type=algorithm)
    assert_same(*both(pipe, sd, sampler=sampler, guidance_scale=6.0, num_inference_steps=7))
