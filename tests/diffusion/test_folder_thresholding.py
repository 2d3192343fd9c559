"""A folder's `clip_sample` / `thresholding` per sampler, against diffusers' scheduler of the same algorithm.

diffusers' DDIM and DDPM schedulers read both keys (thresholding first); DPM-Solver++ reads `thresholding` only
(`clip_sample` is not one of its config keys); Euler ancestral reads neither. `folder_threshold_for` says what
each of our samplers should apply; each test runs the whole sampler with it and diffusers' scheduler built
`from_config` with the same keys (as a folder's config reaches it), from the same x_T and seed, and shows the
clipping bites: where diffusers clips, not clipping misses it; where it does not, clipping would move the result.
"""

import inspect
import warnings

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
)

from ldm.diffusion import SAMPLERS, DynamicThreshold, GaussianDiffusion, StaticThreshold
from ldm.diffusion.thresholding import folder_threshold_for
from tests.diffusion.test_against_diffusers import SCHEDULES, SHAPE, standin_model, x_T
from tests.diffusion.test_solvers_against_diffusers import diffusers_kwargs, integer_timesteps


def reads_of(sampler: str):
    """The folder keys a sampler of the table reads."""
    return SAMPLERS[sampler].folder_clipping


STEPS = 20
CLIP = {"clip_sample": True, "clip_sample_range": 0.5}  # a small range, so the clamp bites at every step
DYNAMIC = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}
CONFIGS = {"clip_sample": CLIP, "thresholding": DYNAMIC, "both": CLIP | DYNAMIC}
NOT_ASKED = {"clip_sample": False, "thresholding": False}  # diffusers' DDIM/DDPM default clip_sample to True
# The samplers' spacing: SD's leading + 1, except DPM-Solver++, whose leading spacing is not DDIM's by design.
SPACING = {"ddim": ("leading", 1), "ddpm": ("leading", 1), "euler_ancestral": ("leading", 1)}
DIFFUSERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "dpmpp_2m_sde": DPMSolverMultistepScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "lcm": LCMScheduler,  # reads no spacing or offset: it visits its own skip-step schedule's timesteps
}
TOLERANCE = 1e-5  # of the sample's scale, as the step-by-step oracle tests hold; whole runs of 20 steps keep it
BITES = 1e-2  # clipping or not moves the result by more than this (1000x the tolerance)
# LCM re-noises its clipped x0 with fresh noise at every step, so the clipping does not compound over the chain:
# on the dynamic threshold it moves the result by ~5e-3 (still 500x the tolerance).
BITES_BY_SAMPLER = {"lcm": 2e-3}


def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion.from_schedule("scaled_linear", 1000, prediction="eps", **SCHEDULES["scaled_linear"])


def wide_model():
    """The stand-in denoiser with its eps scaled by 1.5, so the predicted x0 overshoots and clipping happens."""
    model = standin_model(diffusion())
    return lambda x, t, **kw: 1.5 * model(x, t, **kw)


def todays_threshold(keys: dict):
    """What the pipeline applies today to every sampler: the folder's clipping, whoever samples."""
    if keys.get("thresholding"):
        return DynamicThreshold(keys["dynamic_thresholding_ratio"], keys["sample_max_value"])
    return StaticThreshold(keys["clip_sample_range"]) if keys.get("clip_sample") else None


def diffusers_sample(sampler: str, keys: dict) -> torch.Tensor:
    """diffusers' scheduler for `sampler`, built from a folder-like config holding `keys`, run from x_T()."""
    spacing, offset = SPACING.get(sampler, ("trailing", 0))
    config = diffusers_kwargs("scaled_linear", "eps", timestep_spacing=spacing, steps_offset=offset) | keys
    if sampler.startswith("dpmpp"):
        config["algorithm_type"] = "sde-dpmsolver++" if sampler.endswith("sde") else "dpmsolver++"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # from_config warns of the keys a scheduler does not take
        scheduler = DIFFUSERS[sampler].from_config(config)
    if sampler.startswith("dpmpp"):
        scheduler.alphas_cumprod = diffusion().coef.alphas_cumprod.clone()  # float64, as the oracle test does
    scheduler.set_timesteps(STEPS)
    model, generator = wide_model(), torch.Generator().manual_seed(1)
    if sampler == "euler_ancestral":  # diffusers' variable is x / alpha_t; the model sees x
        model, alphas = integer_timesteps(model), (1 / (1 + scheduler.sigmas**2)).sqrt()
        sample = x_T() / alphas[0]
        for t in scheduler.timesteps:
            output = model(scheduler.scale_model_input(sample, t), t.expand(SHAPE[0]))
            sample = scheduler.step(output, t, sample, generator=generator).prev_sample
        return sample
    x = x_T()
    for t in scheduler.timesteps:
        output = model(x, t.expand(SHAPE[0]))
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    return x


def our_sample(sampler: str, threshold) -> torch.Tensor:
    spacing, offset = SPACING.get(sampler, ("trailing", 0))
    chain = {"spacing": spacing, "steps_offset": offset} if "spacing" in SAMPLERS[sampler].chain_settings else {}
    return SAMPLERS[sampler](
        wide_model(), diffusion(), x_T(), num_steps=STEPS, **chain, threshold=threshold,
        generator=torch.Generator().manual_seed(1), progress=False,
    ).sample  # fmt: skip


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference, relative to b's scale."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_each_sampler_clips_a_folders_x0_as_diffusers_does(sampler, config):
    keys = CONFIGS[config]
    reference = diffusers_sample(sampler, keys)
    threshold = folder_threshold_for(reads_of(sampler), **keys)
    assert max_difference(our_sample(sampler, threshold), reference) <= TOLERANCE

    # The test can fail: the other choice (clip where diffusers does not, or not where it does) misses diffusers.
    other = todays_threshold(keys) if threshold is None else None
    assert other is not None or threshold is not None, "the config asks for no clipping this sampler could skip"
    assert max_difference(our_sample(sampler, other), reference) > BITES_BY_SAMPLER.get(sampler, BITES)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_folder_that_asks_for_no_clipping_samples_unclipped(sampler):
    assert folder_threshold_for(reads_of(sampler), **NOT_ASKED) is None
    assert max_difference(our_sample(sampler, None), diffusers_sample(sampler, NOT_ASKED)) <= TOLERANCE


def test_the_table_is_diffusers_config_keys():
    """Which scheduler takes which key, from diffusers' own signatures (an upgrade that adds one fails here)."""
    for sampler, reads in ((name, reads_of(name)) for name in SAMPLERS):
        keys = inspect.signature(DIFFUSERS[sampler].__init__).parameters
        assert reads.clip_sample == ("clip_sample" in keys and "clip_sample_range" in keys), sampler
        assert reads.thresholding == ({"thresholding", "dynamic_thresholding_ratio", "sample_max_value"} <= set(keys))


def test_the_values_pass_through():
    assert folder_threshold_for(reads_of("ddim"), **CLIP) == StaticThreshold(0.5)
    assert folder_threshold_for(reads_of("ddpm"), **CLIP | DYNAMIC) == DynamicThreshold(0.9, 1.5)  # thresholding first
    assert folder_threshold_for(reads_of("dpmpp_2m"), **CLIP) is None
    assert folder_threshold_for(reads_of("dpmpp_2m_sde"), **CLIP | DYNAMIC) == DynamicThreshold(0.9, 1.5)
    assert folder_threshold_for(reads_of("euler_ancestral"), **CLIP | DYNAMIC) is None
    assert folder_threshold_for(reads_of("lcm"), **CLIP) == StaticThreshold(0.5)
