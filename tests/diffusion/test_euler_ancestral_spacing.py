"""Euler ancestral's timesteps and noise levels against diffusers' EulerAncestralDiscreteScheduler, per spacing.

diffusers' Euler schedulers do not round `linspace` spacing: they visit t_i = i (T - 1) / (n - 1) (946.42...),
interpolate sigma = sqrt((1 - abar) / abar) linearly between the integer timesteps, and tell the network the
fractional t. `leading` (with SD's steps_offset 1) and `trailing` are integers, the schedule's own levels.

With zero terminal SNR diffusers sets alphabar_{T-1} = 2^-24 (sigma 4096), where ours is exactly 0; the spacings
that visit t = T - 1 (trailing, linspace) then differ by about sqrt(2^-24) of the sample's scale (as DPM-Solver++
does, test_solvers_against_diffusers.py), and leading, which does not visit it, agrees as without.
"""

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

from ldm.diffusion import GaussianDiffusion, sample_ddim, sample_euler_ancestral, sampling_chain, sdedit_start
from tests.diffusion.test_against_diffusers import SCHEDULES, SHAPE, standin_model, x_T
from tests.diffusion.test_solvers_against_diffusers import diffusers_kwargs

SPACINGS = {"leading": 1, "trailing": 0, "linspace": 0}  # spacing -> steps_offset (SD's 1 for leading)
TOLERANCE = 1e-5  # relative to the sample's scale
ZERO_SNR_TOLERANCE = 2e-3  # diffusers' 2^-24 against our 0 at t = T - 1 (measured: 3e-4)


def diffusion(zero_snr: bool) -> GaussianDiffusion:
    return GaussianDiffusion.from_schedule(
        "scaled_linear", 1000, prediction="v" if zero_snr else "eps", zero_terminal_snr=zero_snr,
        **SCHEDULES["scaled_linear"],
    )  # fmt: skip


def scheduler(zero_snr: bool, spacing: str, steps: int) -> EulerAncestralDiscreteScheduler:
    s = EulerAncestralDiscreteScheduler(
        **diffusers_kwargs("scaled_linear", "v" if zero_snr else "eps"),
        timestep_spacing=spacing, steps_offset=SPACINGS[spacing], rescale_betas_zero_snr=zero_snr,
    )  # fmt: skip
    s.set_timesteps(steps)
    return s


def float_time_model(d: GaussianDiffusion):
    """The stand-in denoiser plus a term in sin(t + x): it reads t as a float, as a U-Net's timestep embedding
    does, so telling it 946 instead of 946.42 moves its output by ~0.04."""
    base = standin_model(d)

    def model(x, t, **_):
        t_ = t.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return base(x, t.round().long()) + 0.1 * torch.sin(t_ + x)

    return model


def diffusers_sample(s: EulerAncestralDiscreteScheduler, model) -> torch.Tensor:
    """diffusers' run from our x_T, in our variable x (diffusers keeps x / alpha_t; at sigma = 0 they agree)."""
    generator = torch.Generator().manual_seed(1)
    sample = x_T() * (1 + s.sigmas[0] ** 2).sqrt()
    for t in s.timesteps:
        sample = s.step(model(s.scale_model_input(sample, t), t.expand(SHAPE[0])), t, sample, generator=generator)
        sample = sample.prev_sample
    return sample


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("steps", [20, 25])
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_euler_ancestral_visits_diffusers_timesteps_and_sigmas(spacing, zero_snr, steps):
    d, s = diffusion(zero_snr), scheduler(zero_snr, spacing, steps)
    chain = sampling_chain(d, steps, spacing, SPACINGS[spacing], fractional_linspace=True)
    ours_t = torch.from_numpy(chain.timesteps[::-1].copy())
    assert ours_t.dtype == (torch.float32 if spacing == "linspace" else torch.int64)
    torch.testing.assert_close(ours_t.to(s.timesteps.dtype), s.timesteps, rtol=0, atol=0)  # the same float32 t
    abar = chain.coef.alphas_cumprod.numpy()[::-1]
    with np.errstate(divide="ignore"):
        sigmas = np.sqrt((1 - abar) / abar)
    top = zero_snr and spacing != "leading"  # t = T - 1 visited: ours sigma inf (abar 0), diffusers 4096
    if top:
        assert abar[0] == 0 and s.sigmas[0].item() == pytest.approx(2.0**12)
    # diffusers forms 1 - abar in float32, which near t = 0 cancels to ~1.5e-5 of sigma; rounding linspace is 5e-3
    np.testing.assert_allclose(sigmas[int(top) :], s.sigmas[int(top) : -1].numpy(), rtol=5e-5)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_euler_ancestral_samples_as_diffusers_does(spacing, zero_snr):
    steps = 20
    d, s = diffusion(zero_snr), scheduler(zero_snr, spacing, steps)
    model = float_time_model(d)
    reference = diffusers_sample(s, model)
    ours = sample_euler_ancestral(
        model, d, x_T(), num_steps=steps, spacing=spacing, steps_offset=SPACINGS[spacing],
        generator=torch.Generator().manual_seed(1), progress=False,
    ).sample  # fmt: skip
    assert torch.isfinite(ours).all()
    tolerance = ZERO_SNR_TOLERANCE if zero_snr and spacing != "leading" else TOLERANCE
    assert relative(ours, reference) <= tolerance

    if spacing == "linspace":  # the rounded linspace every other sampler walks (and Euler walked) misses diffusers
        rounded = sample_ddim(
            model, d, x_T(), num_steps=steps, eta=1.0, spacing=spacing,
            generator=torch.Generator().manual_seed(1), progress=False,
        ).sample  # fmt: skip
        assert relative(rounded, reference) > 1e-3


def test_image_to_image_starts_on_the_euler_level():
    """sdedit_start with fractional_linspace noises the image to the level Euler ancestral's start_step is at."""
    d = diffusion(False)
    x0, noise = torch.linspace(-0.8, 0.8, 96).reshape(SHAPE), x_T()
    start, start_step = sdedit_start(d, x0, noise, 0.5, 20, "linspace", fractional_linspace=True)
    chain = sampling_chain(d, 20, "linspace", fractional_linspace=True)
    level = torch.full((SHAPE[0],), chain.num_timesteps - 1 - start_step)
    torch.testing.assert_close(start, chain.q_sample(x0, level, noise))
    assert chain.timesteps[int(level[0])] == pytest.approx(9 * 999 / 19, rel=1e-6)  # t = 473.21..., not 473
    rounded, _ = sdedit_start(d, x0, noise, 0.5, 20, "linspace")
    assert not torch.allclose(start, rounded)
