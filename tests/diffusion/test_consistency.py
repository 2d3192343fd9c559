"""The consistency-model math (`ldm.diffusion.consistency`) and the lcm sampler against diffusers.

Each function is compared with the diffusers code it follows: the guidance embedding with the pipelines'
`get_guidance_scale_embedding` (fed w - 1, as they feed it), the boundary scalings, timesteps and `denoised` with
LCMScheduler's own methods, and `sample_lcm` with LCMScheduler's step loop on the same model callable, from the
same x_T and with the same generator seed (LCMScheduler draws its noise with randn_tensor, which on the CPU is
torch.randn from the generator, one draw per step but the last, as ours).
"""

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

from ldm.diffusion import (
    SAMPLERS,
    GaussianDiffusion,
    StaticThreshold,
    consistency_denoise,
    consistency_scalings,
    guidance_scale_embedding,
    lcm_timesteps,
    sample_lcm,
)
from ldm.diffusion.consistency import lcm_chain
from ldm.generation.noise_schedule import NoiseScheduleConfig
from tests.diffusion.test_against_diffusers import SCHEDULES, SHAPE, standin_model, x_T
from tests.diffusion.test_solvers_against_diffusers import diffusers_kwargs

GUIDANCE_SCALES = [1.0, 1.5, 4.0, 7.3, 12.0]


def diffusers_embedding(pipeline_class, guidance_scale: float, dim: int) -> torch.Tensor:
    """What the pipeline feeds its U-Net as timestep_cond for one image: the embedding of guidance_scale - 1."""
    w = torch.tensor(guidance_scale - 1).repeat(1)
    return pipeline_class.get_guidance_scale_embedding(None, w, embedding_dim=dim)


@pytest.mark.parametrize("pipeline_class", [StableDiffusionPipeline, LatentConsistencyModelPipeline])
@pytest.mark.parametrize("dim", [4, 31, 256, 512])
def test_guidance_scale_embedding_is_what_diffusers_pipelines_feed_the_unet(pipeline_class, dim):
    """Ours takes the guidance scale w and embeds w - 1, exactly the pipelines' timestep_cond for guidance_scale w."""
    w = torch.tensor(GUIDANCE_SCALES, dtype=torch.float64)
    ours = guidance_scale_embedding(w, dim)
    theirs = torch.cat([diffusers_embedding(pipeline_class, g, dim) for g in GUIDANCE_SCALES])
    assert ours.shape == (len(GUIDANCE_SCALES), dim) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= 1e-6
    # The convention can fail: embedding w itself (diffusers' function fed w) is far from what the pipeline feeds.
    unshifted = torch.cat([diffusers_embedding(pipeline_class, g + 1, dim) for g in GUIDANCE_SCALES])
    assert (ours - unshifted).abs().max().item() > 0.1


def test_guidance_scale_embedding_of_float32_scales_matches_too():
    """The trainer's w (float32, drawn on its device) embeds to the same values: w - 1 is exact for w >= 1."""
    w = torch.tensor(GUIDANCE_SCALES, dtype=torch.float32)
    theirs = torch.cat([diffusers_embedding(StableDiffusionPipeline, float(g), 64) for g in w])
    assert (guidance_scale_embedding(w, 64) - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("timestep_scaling", [10.0, 0.05])
def test_consistency_scalings_are_lcm_schedulers_boundary_condition(timestep_scaling):
    scheduler = LCMScheduler(timestep_scaling=timestep_scaling)
    t = torch.tensor([0, 1, 19, 259, 500, 999])
    c_skip, c_out = consistency_scalings(t, timestep_scaling=timestep_scaling)
    for i, timestep in enumerate(t):
        their_skip, their_out = scheduler.get_scalings_for_boundary_condition_discrete(timestep)
        assert abs(c_skip[i].item() - float(their_skip)) <= 1e-6
        assert abs(c_out[i].item() - float(their_out)) <= 1e-6
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # f(x, 0) = x: the boundary condition
    if timestep_scaling < 1:  # small scalings make the skip term matter, so the comparison above can fail
        assert c_skip[2].item() > 0.1


@pytest.mark.parametrize(
    ("num_train_timesteps", "original"), [(1000, 50), (1000, 8), (1000, 30), (500, 50), (1000, 1000)]
)
def test_lcm_timesteps_are_the_ones_lcm_scheduler_sets(num_train_timesteps, original):
    scheduler = LCMScheduler(num_train_timesteps=num_train_timesteps, original_inference_steps=original)
    for steps in sorted({1, 2, 3, 4, 7, 8, original // 2 or 1, original}):
        scheduler.set_timesteps(steps)
        ours = lcm_timesteps(num_train_timesteps, steps, original)
        assert ours.tolist() == scheduler.timesteps.tolist(), steps


def float64_scheduler(diffusion: GaussianDiffusion, **config) -> LCMScheduler:
    """LCMScheduler with its alphas_cumprod swapped for our float64 array (its step code unchanged)."""
    scheduler = LCMScheduler(**config)
    scheduler.alphas_cumprod = diffusion.coef.alphas_cumprod.clone()
    return scheduler


@pytest.mark.parametrize("chain_kind", ["full", "lcm"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_consistency_denoise_is_lcm_schedulers_denoised(prediction, chain_kind):
    """f(x_t, t) at each of LCMScheduler's timesteps, on the full chain (the trainer's: index = timestep) and on the
    sampler's respaced chain (index i is the i-th lowest visited timestep), in float64 to 1e-10."""
    diffusion = GaussianDiffusion.from_schedule("scaled_linear", 1000, prediction, **SCHEDULES["scaled_linear"])
    config = diffusers_kwargs("scaled_linear", prediction, timestep_scaling=0.05)  # c_skip matters at this scale
    scheduler = float64_scheduler(diffusion, **config)
    scheduler.set_timesteps(4)
    chain = diffusion if chain_kind == "full" else lcm_chain(diffusion, 4)
    generator = torch.Generator().manual_seed(0)
    for step, timestep in enumerate(scheduler.timesteps.tolist()):
        x = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
        output = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
        scheduler._step_index = step
        theirs = scheduler.step(output, timestep, x, generator=torch.Generator().manual_seed(1)).denoised
        index = timestep if chain_kind == "full" else chain.num_timesteps - 1 - step
        ours = consistency_denoise(chain, output, x, torch.full((SHAPE[0],), index), timestep_scaling=0.05)
        assert (ours - theirs).abs().max().item() <= 1e-10, timestep


def diffusers_lcm_loop(model, scheduler: LCMScheduler, steps: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop diffusers' pipelines run: model at t, LCMScheduler.step with the generator. Returns the sample and
    the generator's state after it."""
    scheduler.set_timesteps(steps)
    x, generator = x_T(), torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(SHAPE[0])), t, x, generator=generator).prev_sample
    return x, generator.get_state()


LOOP_CASES = {
    "eps_4": ("scaled_linear", "eps", 4, {}),
    "eps_1": ("scaled_linear", "eps", 1, {}),
    "eps_8_original_20": ("scaled_linear", "eps", 8, {"original_inference_steps": 20}),
    "v_2_linear": ("linear", "v", 2, {"beta_start": 1e-4, "beta_end": 0.02}),  # LCMScheduler's defaults are SD's
    "x0_3_cosine": ("cosine", "x0", 3, {}),
    "v_zero_snr_4": ("scaled_linear", "v", 4, {"rescale_betas_zero_snr": True}),
    "eps_6_small_scaling": ("scaled_linear", "eps", 6, {"timestep_scaling": 0.05}),
    "eps_4_clip_sample": ("scaled_linear", "eps", 4, {"clip_sample": True, "clip_sample_range": 0.5}),
}


@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_sample_lcm_draws_what_lcm_schedulers_step_loop_draws(case):
    schedule, prediction, steps, config = LOOP_CASES[case]
    zero_snr = config.get("rescale_betas_zero_snr", False)
    betas = {key: config[key] for key in ("beta_start", "beta_end") if key in config} or SCHEDULES[schedule]
    diffusion = GaussianDiffusion.from_schedule(schedule, 1000, prediction, zero_terminal_snr=zero_snr, **betas)
    model = standin_model(diffusion)
    scheduler = LCMScheduler(**diffusers_kwargs(schedule, prediction, **config))
    theirs, their_state = diffusers_lcm_loop(model, scheduler, steps)
    threshold = StaticThreshold(config["clip_sample_range"]) if config.get("clip_sample") else None
    generator = torch.Generator().manual_seed(1)
    ours = sample_lcm(
        model, diffusion, x_T(), num_steps=steps, original_inference_steps=config.get("original_inference_steps", 50),
        timestep_scaling=config.get("timestep_scaling", 10.0), threshold=threshold, generator=generator,
        progress=False,
    ).sample  # fmt: skip
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 1e-5 * scale
    assert torch.equal(generator.get_state(), their_state)  # the same draws: none after the last step
    if steps > 1:  # the re-noising draws fresh noise: another seed lands elsewhere, so the match can fail
        other, _ = diffusers_lcm_loop(model, scheduler, steps, seed=2)
        assert (ours - other).abs().max().item() > 1e-3 * scale


def test_the_callback_sees_lcm_schedulers_timesteps_and_denoised():
    diffusion = GaussianDiffusion.from_schedule("scaled_linear", 1000, **SCHEDULES["scaled_linear"])
    seen = []
    out = sample_lcm(
        standin_model(diffusion), diffusion, x_T(), num_steps=4, generator=torch.Generator().manual_seed(1),
        callback=lambda index, t, x, x0: seen.append((index, t, x0)), return_trajectory=True, progress=False,
    )  # fmt: skip
    assert [(index, t) for index, t, _ in seen] == [(3, 999), (2, 759), (1, 499), (0, 259)]
    assert torch.equal(seen[-1][2], out.sample)  # the last step returns its denoised x0 itself
    assert out.trajectory.shape == (5, *SHAPE)


def test_lcm_is_a_stochastic_sampler_that_clips_as_lcm_scheduler_does():
    lcm = SAMPLERS["lcm"]
    assert not lcm.deterministic and lcm.draws_step_noise()
    assert lcm.folder_clipping.clip_sample and lcm.folder_clipping.thresholding
    assert lcm.chain_settings == ("original_inference_steps",)
    assert lcm.chain(GaussianDiffusion.from_schedule("linear", 1000), 4).timesteps[::-1].tolist() == [
        999, 759, 499, 259,
    ]  # fmt: skip


# ---- named errors ----------------------------------------------------------------------------------------


def test_more_steps_than_the_skip_step_schedule_has_are_refused_by_name():
    assert len(lcm_timesteps(1000, 8, 8)) == 8
    with pytest.raises(ValueError, match=r"^num_inference_steps: 9 is more than the 8 timesteps"):
        lcm_timesteps(1000, 9, 8)
    with pytest.raises(ValueError, match=r"^num_inference_steps: must be a positive int, got 0"):
        lcm_timesteps(1000, 0)
    with pytest.raises(ValueError, match=r"^original_inference_steps: must be an int in \[1, 1000\]"):
        lcm_timesteps(1000, 4, 1001)
    diffusion = GaussianDiffusion.from_schedule("linear", 1000)
    with pytest.raises(ValueError, match=r"^num_inference_steps: 51 is more than the 50"):
        sample_lcm(standin_model(diffusion), diffusion, x_T(), num_steps=51, progress=False)


@pytest.mark.parametrize(
    ("option", "value"),
    [("spacing", "trailing"), ("steps_offset", 1), ("karras_sigmas", True), ("eta", 0.5), ("final_alphabar", 0.99)],
)
def test_sampler_options_that_do_not_apply_to_lcm_are_refused_by_name(option, value):
    diffusion = GaussianDiffusion.from_schedule("linear", 1000)
    with pytest.raises(ValueError, match=rf"^{option}: does not apply to the lcm sampler"):
        sample_lcm(standin_model(diffusion), diffusion, x_T(), num_steps=4, progress=False, **{option: value})
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_step'"):
        sample_lcm(standin_model(diffusion), diffusion, x_T(), num_step=4, progress=False)


def test_bad_embedding_inputs_and_folder_keys_are_refused_by_name():
    with pytest.raises(ValueError, match=r"^w: must be 1-D"):
        guidance_scale_embedding(torch.ones(2, 1), 32)
    with pytest.raises(ValueError, match=r"^dim: .* must be an int >= 4, got 2"):
        guidance_scale_embedding(torch.ones(2), 2)
    with pytest.raises(ValueError, match=r"^original_inference_steps: must be an int in \[1, 1000\]"):
        NoiseScheduleConfig(original_inference_steps=0)
    with pytest.raises(ValueError, match=r"^timestep_scaling: must be a positive number"):
        NoiseScheduleConfig(original_inference_steps=50, timestep_scaling=0.0)
