"""The fast solvers, DDIM inversion and guidance rescale against diffusers, step by step.

As in test_against_diffusers.py, each test walks diffusers' own trajectory and at every step gives our step
the same x_t, the same model output and the same noise. diffusers keeps its sigmas in float32, so the
comparisons are in float32 (relative 1e-5 of the sample's scale).

Euler ancestral: diffusers keeps its sample in the variance-exploding variable x / alpha_t (scaled by
1 / sqrt(sigma^2 + 1) before the model sees it); ours is x itself, so each comparison multiplies diffusers'
sample by alpha_t. The model sees the same input in both.
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ldm.diffusion import (
    DIFFUSERS_SCHEDULE_NAMES,
    GaussianDiffusion,
    classifier_free_guidance,
    ddim_invert,
    ddim_step,
    dpmpp_2m_step,
    rescale_guidance,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler_ancestral,
    sampling_chain,
)
from tests.diffusion.test_against_diffusers import PREDICTIONS, SCHEDULES, SHAPE, standin_model, x_T

TWO_SCHEDULES = ["linear", "scaled_linear"]


def diffusers_kwargs(schedule: str, prediction: str, **kwargs) -> dict:
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": DIFFUSERS_SCHEDULE_NAMES[schedule],
        "prediction_type": PREDICTIONS[prediction],
        **SCHEDULES[schedule],
        **kwargs,
    }


def integer_timesteps(model):
    """diffusers' Euler scheduler hands out float timesteps; the stand-in indexes its schedule with them."""
    return lambda x, t, **kw: model(x, t.long(), **kw)


def batch_index(chain: GaussianDiffusion, step: int) -> torch.Tensor:
    """Our chain index of diffusers' step number `step` (ours count down, diffusers' count up)."""
    return torch.full((SHAPE[0],), chain.num_timesteps - 1 - step, dtype=torch.long)


def assert_step_close(ours: torch.Tensor, ref: torch.Tensor, t) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"t={int(t)}: {m}")


@pytest.mark.parametrize("schedule", TWO_SCHEDULES)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_2m_matches_diffusers_every_step(schedule, prediction, karras, sde):
    steps = 15
    diffusion = GaussianDiffusion.from_schedule(schedule, 1000, prediction=prediction, **SCHEDULES[schedule])
    scheduler = DPMSolverMultistepScheduler(
        **diffusers_kwargs(schedule, prediction),
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
        use_karras_sigmas=karras,
        timestep_spacing="trailing",
    )
    scheduler.alphas_cumprod = diffusion.coef.alphas_cumprod.clone()  # float64: sigma_min cancels in float32
    scheduler.set_timesteps(steps)
    chain = sampling_chain(diffusion, steps, "trailing", karras_sigmas=karras)
    assert chain.timesteps[::-1].tolist() == scheduler.timesteps.tolist(), "the same timesteps for the model"
    sigmas = np.sqrt((1 - chain.coef.alphas_cumprod.numpy()) / chain.coef.alphas_cumprod.numpy())[::-1]
    np.testing.assert_allclose(sigmas, scheduler.sigmas[:-1].numpy(), rtol=1e-5)  # diffusers: float32

    model = standin_model(diffusion)
    generator = torch.Generator().manual_seed(1)
    x, previous_x0 = x_T(), None
    for step, t in enumerate(scheduler.timesteps):
        output = model(x, t.expand(SHAPE[0]))
        noise_source = torch.Generator().set_state(generator.get_state())  # the noise diffusers will draw
        noise = torch.randn(SHAPE, generator=noise_source) if sde else None
        ref = scheduler.step(output, t, x, generator=generator).prev_sample
        last = step == steps - 1
        ours, previous_x0 = dpmpp_2m_step(
            chain, output, x, batch_index(chain, step), None if last else previous_x0, noise
        )
        assert_step_close(ours, ref, t)
        x = ref

    # The whole sampler, same x_T and seed.
    ours = sample_dpmpp_2m(
        model, diffusion, x_T(), num_steps=steps, spacing="trailing", karras_sigmas=karras, sde=sde,
        generator=torch.Generator().manual_seed(1), progress=False,
    )  # fmt: skip
    torch.testing.assert_close(ours.sample, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_2m_on_a_zero_terminal_snr_schedule_takes_the_limit_diffusers_approximates(sde):
    """At alphabar_T = 0, lambda = -inf: ours takes the exact limit (the first step is DDIM's), diffusers clamps
    alphabar_T to 2^-24. The two differ by about sqrt(2^-24) of the sample's scale, and ours has no NaN."""
    diffusion = GaussianDiffusion.from_schedule("scaled_linear", 1000, prediction="v", zero_terminal_snr=True)
    scheduler = DPMSolverMultistepScheduler(
        **diffusers_kwargs("scaled_linear", "v"),
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(12)
    model = standin_model(diffusion)
    generator = torch.Generator().manual_seed(1)
    x = x_T()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(SHAPE[0])), t, x, generator=generator).prev_sample
    ours = sample_dpmpp_2m(
        model, diffusion, x_T(), num_steps=12, spacing="trailing", sde=sde,
        generator=torch.Generator().manual_seed(1), progress=False,
    ).sample  # fmt: skip
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, x, rtol=0, atol=2e-3)

    # The first step from SNR 0 is exactly DDIM's (for the ODE; the SDE adds fresh noise there instead).
    if not sde:
        chain = sampling_chain(diffusion, 12, "trailing")
        first = torch.full((SHAPE[0],), 11)
        output = model(x_T(), chain.model_timesteps(first))
        torch.testing.assert_close(
            dpmpp_2m_step(chain, output, x_T(), first, None)[0], ddim_step(chain, output, x_T(), first)[0]
        )


def test_karras_sigmas_are_refused_on_a_zero_terminal_snr_schedule():
    diffusion = GaussianDiffusion.from_schedule("scaled_linear", 1000, prediction="v", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="karras_sigmas: a zero-terminal-SNR schedule"):
        sampling_chain(diffusion, 10, karras_sigmas=True)


@pytest.mark.parametrize("schedule", TWO_SCHEDULES)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(("spacing", "steps_offset"), [("leading", 1), ("trailing", 0)])
def test_euler_ancestral_matches_diffusers_every_step(schedule, prediction, spacing, steps_offset):
    steps = 20
    diffusion = GaussianDiffusion.from_schedule(schedule, 1000, prediction=prediction, **SCHEDULES[schedule])
    scheduler = EulerAncestralDiscreteScheduler(
        **diffusers_kwargs(schedule, prediction), timestep_spacing=spacing, steps_offset=steps_offset
    )
    scheduler.set_timesteps(steps)
    chain = sampling_chain(diffusion, steps, spacing, steps_offset)
    assert chain.timesteps[::-1].tolist() == scheduler.timesteps.long().tolist()
    alphas = (1 / (1 + scheduler.sigmas**2)).sqrt()  # alpha_t at each of diffusers' levels, then 1

    model = integer_timesteps(standin_model(diffusion))
    generator = torch.Generator().manual_seed(1)
    sample = x_T() / alphas[0]  # the same x_T, in diffusers' variable
    for step, t in enumerate(scheduler.timesteps):
        x = sample * alphas[step]
        output = model(scheduler.scale_model_input(sample, t), t.expand(SHAPE[0]))
        noise = torch.randn(SHAPE, generator=torch.Generator().set_state(generator.get_state()))
        sample = scheduler.step(output, t, sample, generator=generator).prev_sample
        ours, _ = ddim_step(chain, output, x, batch_index(chain, step), eta=1.0, noise=noise)
        assert_step_close(ours, sample * alphas[step + 1], t)

    ours = sample_euler_ancestral(
        model, diffusion, x_T(), num_steps=steps, spacing=spacing, steps_offset=steps_offset,
        generator=torch.Generator().manual_seed(1), progress=False,
    )  # fmt: skip
    torch.testing.assert_close(ours.sample, sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_inversion_matches_diffusers_inverse_scheduler(prediction):
    """With leading spacing and no offset, each of our levels is diffusers' t - T // n, so the two agree."""
    diffusion = GaussianDiffusion.from_schedule(
        "scaled_linear", 1000, prediction=prediction, **SCHEDULES["scaled_linear"]
    )
    scheduler = DDIMInverseScheduler(**diffusers_kwargs("scaled_linear", prediction), clip_sample=False)
    scheduler.set_timesteps(25)
    model = standin_model(diffusion)
    x0 = torch.linspace(-0.8, 0.8, 96).reshape(SHAPE)
    x = x0
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(SHAPE[0])), t, x).prev_sample
    ours = ddim_invert(model, diffusion, x0, num_steps=25, progress=False).sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(phi):
    guided, conditional = torch.randn(SHAPE) * 3, torch.randn(SHAPE)
    torch.testing.assert_close(rescale_guidance(guided, conditional, phi), rescale_noise_cfg(guided, conditional, phi))


def test_guidance_rescale_applies_to_the_guided_output_of_one_batched_pass():
    def model(x, t, scale):
        return x * scale.reshape(-1, 1, 1, 1)

    x, cond, uncond = torch.randn(SHAPE), torch.full((SHAPE[0],), 2.0), torch.full((1,), 0.5)
    guided = classifier_free_guidance(model, 5.0, {"scale": uncond}, rescale=0.7)(x, torch.zeros(2), scale=cond)
    out_u, out_c = x * 0.5, x * 2.0
    plain = out_u + 5.0 * (out_c - out_u)
    torch.testing.assert_close(guided, rescale_noise_cfg(plain, out_c, 0.7))
    with pytest.raises(ValueError, match="guidance rescale must be in"):
        classifier_free_guidance(model, 5.0, {"scale": uncond}, rescale=1.5)


def test_ddim_sampler_from_the_inverted_noise_returns_the_sample_for_an_exact_model():
    """For Gaussian data the stand-in's deterministic part is the exact denoiser, so what is left is inversion's
    own error (each step evaluates the model one level off): at 50 steps the round trip returns the start point
    to within 0.05 (data in [-0.8, 0.8]), and more steps bring it closer."""
    diffusion = GaussianDiffusion.from_schedule("scaled_linear", 1000, prediction="v", **SCHEDULES["scaled_linear"])
    exact = standin_model(diffusion)

    def model(x, t):  # drop the stand-in's sine: the exact denoiser of N(mu, 0.25), a smooth ODE
        return exact(x, t) - _sine_part(diffusion, x, t)

    x0 = torch.linspace(-0.8, 0.8, 96).reshape(SHAPE)

    def round_trip_error(steps: int) -> float:
        x_T_ = ddim_invert(model, diffusion, x0, num_steps=steps, progress=False).sample
        back = sample_ddim(model, diffusion, x_T_, num_steps=steps, progress=False).sample
        return (back - x0).abs().max().item()

    errors = [round_trip_error(steps) for steps in (10, 50, 250)]
    assert errors[1] < 0.05
    assert errors[2] < errors[1] < errors[0]


def _sine_part(diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The stand-in's output for the 0.05 sin(3x) it adds to x0, in v: -sqrt(1 - abar) times it."""
    abar = diffusion.coef.alphas_cumprod[t].to(x.dtype).reshape(-1, 1, 1, 1)
    return -(1 - abar).sqrt() * 0.05 * torch.sin(3 * x)
