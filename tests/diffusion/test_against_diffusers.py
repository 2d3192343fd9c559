"""Our samplers against an independent implementation: diffusers' DDPMScheduler and DDIMScheduler.

Both walk diffusers' own trajectory: at every step, each implementation is given the same x_t, the
same model output and the same noise, and their x_{t-1} must agree.

- In float64 (diffusers' scheduler arrays swapped for float64 ones, its step code unchanged) the two
  must agree to 1e-10: the formulas are the same.
- In float32 (diffusers exactly as shipped) they agree to 1e-5 relative wherever 1 - alphabar_t > 0.01.
  Below that, near t = 0, diffusers forms 1 - alphabar_t in float32, where it cancels to a few
  significant digits (1 - 0.99978), and its x_{t-1} moves by up to ~1e-4. Our float64 coefficients do
  not cancel; the float64 comparison shows the formulas agree there too.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ldm.diffusion import (
    DIFFUSERS_SCHEDULE_NAMES,
    DynamicThreshold,
    GaussianDiffusion,
    StaticThreshold,
    ddim_step,
    ddpm_step,
    sample_ddim,
    sample_ddpm,
    sampling_chain,
)

SCHEDULES = {
    "linear": {},
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},  # diffusers' defaults are linear's
    "cosine": {},
}
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SHAPE = (2, 3, 4, 4)
DTYPES = [torch.float64, torch.float32]


def tolerance(chain: GaussianDiffusion, index: int, ref: torch.Tensor) -> tuple[float, float]:
    """(rtol, atol) for our step at `index` against diffusers' x_{t-1} = `ref` (see the module docstring).
    The absolute part is relative to the sample's scale, so elements near 0 are not held to 1e-5 of
    themselves."""
    scale = ref.abs().max().item()
    if ref.dtype == torch.float64:
        # diffusers floors the DDPM variance at 1e-20, so a last step at t > 0 (trailing spacing) still
        # adds 1e-10 z where the exact posterior adds nothing.
        return 1e-10, 1e-9
    cancels = 1 - chain.coef.alphas_cumprod[index].item() < 0.01
    return 1e-5, 2e-4 if cancels else 1e-5 * scale


def standin_model(diffusion: GaussianDiffusion, learned_variance: bool = False):
    """A deterministic network: the exact denoiser for data ~ N(mu, 0.25) per element, bent by a sine so
    it is not linear, expressed in the diffusion's parameterization. Trajectories stay O(1), like a real
    model's."""
    abar_all = diffusion.coef.alphas_cumprod
    mu = torch.linspace(-0.5, 0.5, 48, dtype=torch.float64).reshape(1, *SHAPE[1:])
    s2 = 0.25

    def model(x, t, **_):
        abar = abar_all[t].to(x.dtype).reshape(-1, 1, 1, 1)
        mu_ = mu.to(x.dtype)
        x0 = mu_ + s2 * abar.sqrt() * (x - abar.sqrt() * mu_) / (abar * s2 + 1 - abar) + 0.05 * torch.sin(3 * x)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        out = {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[diffusion.prediction.value]
        if learned_variance:
            out = torch.cat([out, torch.tanh(x)], dim=1)  # interpolation values in [-1, 1]
        return out

    return model


def ddpm_scheduler(schedule, prediction, variance="fixed_small", **kwargs):
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=DIFFUSERS_SCHEDULE_NAMES[schedule],
        prediction_type=PREDICTIONS[prediction],
        variance_type=variance,
        **{"clip_sample": False, **SCHEDULES[schedule], **kwargs},
    )


def ddim_scheduler(schedule, prediction, spacing, **kwargs):
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule=DIFFUSERS_SCHEDULE_NAMES[schedule],
        prediction_type=PREDICTIONS[prediction],
        clip_sample=False,
        timestep_spacing=spacing,
        **SCHEDULES[schedule],
        **kwargs,
    )


def x_T(dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)


def in_dtype(scheduler, diffusion, dtype):
    """diffusers' scheduler with its schedule arrays in `dtype` (float64: computed from our betas)."""
    if dtype == torch.float64:
        scheduler.betas = diffusion.coef.betas.clone()
        scheduler.alphas = 1.0 - scheduler.betas
        scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
        scheduler.one = torch.tensor(1.0, dtype=dtype)
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=dtype)
    return scheduler


def walk_ddpm(scheduler, chain, model, dtype, threshold=None):
    """Step diffusers along its own trajectory, and at each step also take our step from the same x_t
    with the same noise; assert each of our steps is within DDPM_TOLERANCE. Returns diffusers' x_0."""
    generator = torch.Generator().manual_seed(1)
    x = x_T(dtype)
    for index, t in enumerate(scheduler.timesteps):
        output = model(x, t.expand(SHAPE[0]))
        noise_source = torch.Generator().set_state(generator.get_state())  # the noise diffusers will draw
        noise = torch.randn(SHAPE, generator=noise_source, dtype=dtype) if t > 0 else None
        ref = scheduler.step(output, t, x, generator=generator).prev_sample
        i = torch.full((SHAPE[0],), chain.num_timesteps - 1 - index, dtype=torch.long)
        assert int(chain.timesteps[i[0]]) == int(t), "our chain visits diffusers' timesteps"
        ours, _ = ddpm_step(chain, output, x, i, noise, threshold)
        rtol, atol = tolerance(chain, int(i[0]), ref)
        torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, msg=lambda m, t=t: f"t={int(t)}: {m}")
        x = ref
    return x


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_betas_match_diffusers(schedule):
    ours = GaussianDiffusion.from_schedule(schedule, 1000, **SCHEDULES[schedule]).coef.betas
    torch.testing.assert_close(ours.float(), ddpm_scheduler(schedule, "eps").betas, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_matches_diffusers_every_step(schedule, prediction, dtype):
    diffusion = GaussianDiffusion.from_schedule(schedule, 1000, prediction=prediction, **SCHEDULES[schedule])
    scheduler = in_dtype(ddpm_scheduler(schedule, prediction), diffusion, dtype)
    scheduler.set_timesteps(1000)
    model = standin_model(diffusion)
    ref_final = walk_ddpm(scheduler, diffusion, model, dtype)

    # The whole sampler from the same x_T and seed (rounding differences accumulate over 1000 steps).
    ours = sample_ddpm(model, diffusion, x_T(dtype), generator=torch.Generator().manual_seed(1), progress=False)
    torch.testing.assert_close(ours.sample, ref_final, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variance", ["fixed_large", "learned_range"])
def test_ddpm_variance_types_match_diffusers(variance, dtype):
    diffusion = GaussianDiffusion.from_schedule("linear", 1000, prediction="eps", variance=variance)
    scheduler = in_dtype(ddpm_scheduler("linear", "eps", variance=variance), diffusion, dtype)
    scheduler.set_timesteps(1000)
    walk_ddpm(scheduler, diffusion, standin_model(diffusion, variance == "learned_range"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_respaced_ddpm_matches_diffusers(spacing, dtype):
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000, prediction="eps")
    scheduler = in_dtype(ddpm_scheduler("cosine", "eps", timestep_spacing=spacing), diffusion, dtype)
    scheduler.set_timesteps(100)
    chain = sampling_chain(diffusion, 100, spacing)
    walk_ddpm(scheduler, chain, standin_model(diffusion), dtype)


@pytest.mark.parametrize(
    ("threshold", "kwargs"),
    [
        (StaticThreshold(1.0), {"clip_sample": True, "clip_sample_range": 1.0}),
        (
            DynamicThreshold(percentile=0.9, max_value=1.5),
            {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
        ),
    ],
)
def test_thresholding_matches_diffusers(threshold, kwargs):
    diffusion = GaussianDiffusion.from_schedule("linear", 1000, prediction="eps")
    scheduler = in_dtype(ddpm_scheduler("linear", "eps", **kwargs), diffusion, torch.float64)
    scheduler.set_timesteps(1000)
    model = standin_model(diffusion)

    def wide_model(x, t):  # pushes predicted x0 past the threshold so clipping really happens
        return model(x, t) * 1.5

    walk_ddpm(scheduler, diffusion, wide_model, torch.float64, threshold)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers_every_step(schedule, prediction, eta, spacing, dtype):
    diffusion = GaussianDiffusion.from_schedule(schedule, 1000, prediction=prediction, **SCHEDULES[schedule])
    scheduler = in_dtype(ddim_scheduler(schedule, prediction, spacing), diffusion, dtype)
    scheduler.set_timesteps(50)
    chain = sampling_chain(diffusion, 50, spacing)
    model = standin_model(diffusion)
    generator = torch.Generator().manual_seed(1)
    x = x_T(dtype)
    for index, t in enumerate(scheduler.timesteps):
        output = model(x, t.expand(SHAPE[0]))
        noise = torch.randn(SHAPE, generator=generator, dtype=dtype)
        ref = scheduler.step(output, t, x, eta=eta, variance_noise=noise).prev_sample
        i = torch.full((SHAPE[0],), chain.num_timesteps - 1 - index, dtype=torch.long)
        assert int(chain.timesteps[i[0]]) == int(t)
        ours, _ = ddim_step(chain, output, x, i, eta, noise)
        rtol, atol = tolerance(chain, int(i[0]), ref)
        torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, msg=lambda m, t=t: f"t={int(t)}: {m}")
        x = ref

    # The whole sampler, same x_T and seed: 50 steps keep float32 agreement.
    ours = sample_ddim(
        model, diffusion, x_T(dtype), num_steps=50, eta=eta, spacing=spacing,
        generator=torch.Generator().manual_seed(1), progress=False,
    )  # fmt: skip
    torch.testing.assert_close(ours.sample, x, rtol=1e-4, atol=1e-4)


def test_steps_offset_visits_the_same_timesteps_as_diffusers():
    """SD 1.x ships DDIM with leading spacing and steps_offset=1; the sampler must visit the same timesteps."""
    diffusion = GaussianDiffusion.from_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    scheduler = ddim_scheduler("scaled_linear", "eps", "leading", steps_offset=1, set_alpha_to_one=False)
    scheduler.set_timesteps(25)
    chain = sampling_chain(diffusion, 25, "leading", steps_offset=1)
    assert list(chain.timesteps[::-1]) == scheduler.timesteps.tolist()
