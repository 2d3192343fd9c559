"""Beta schedules and timestep spacings against their closed forms and against diffusers."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from ldm.diffusion import GaussianDiffusion, make_beta_schedule, rescale_zero_terminal_snr, spaced_timesteps


def test_linear_schedule_endpoints():
    betas = make_beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), np.diff(betas)[0])


def test_scaled_linear_is_linear_in_sqrt_space():
    betas = make_beta_schedule("scaled_linear", 1000)
    assert betas[0] == pytest.approx(0.00085) and betas[-1] == pytest.approx(0.012)
    assert np.allclose(np.diff(np.sqrt(betas)), np.diff(np.sqrt(betas))[0])


def test_cosine_alphabar_matches_closed_form():
    T, s = 1000, 0.008
    abar = np.cumprod(1 - make_beta_schedule("cosine", T))

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    unclipped = make_beta_schedule("cosine", T) < 0.999
    assert np.allclose(abar[unclipped], expected[unclipped], rtol=1e-10)
    assert make_beta_schedule("cosine", T).max() == pytest.approx(0.999)  # the last betas are clipped


def test_zero_terminal_snr_rescale():
    betas = make_beta_schedule("scaled_linear", 1000)
    rescaled = rescale_zero_terminal_snr(betas)
    abar, abar_rescaled = np.cumprod(1 - betas), np.cumprod(1 - rescaled)
    assert abar_rescaled[-1] == pytest.approx(0.0, abs=1e-12)
    assert abar_rescaled[0] == pytest.approx(abar[0], rel=1e-12)
    np.testing.assert_allclose(rescaled, diffusers_rescale(torch.from_numpy(betas)).numpy(), rtol=1e-10)


def test_zero_terminal_snr_rejects_eps_prediction():
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        GaussianDiffusion.from_schedule("linear", zero_terminal_snr=True, prediction="eps")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [10, 50, 999])
def test_spacing_matches_diffusers(spacing, num_steps):
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    assert spaced_timesteps(1000, num_steps, spacing).tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_the_full_chain_ignores_the_offset(spacing):
    """All T steps visit T-1 .. 0 whatever the spacing; steps_offset 1 would push leading's first step to T."""
    assert spaced_timesteps(1000, 1000, spacing, steps_offset=1).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="outside"):
        spaced_timesteps(1000, 999, "leading", steps_offset=2)  # 998 * 1 + 2 = 1000: still refused


def test_derived_arrays():
    d = GaussianDiffusion.from_schedule("linear", 1000)
    c = d.coef
    assert c.alphas_cumprod_prev[0] == 1.0
    assert c.posterior_variance[0] == 0.0
    assert c.posterior_log_variance_clipped[0] == c.posterior_log_variance_clipped[1]
    assert all(a.dtype == torch.float64 for a in vars(c).values())
    torch.testing.assert_close(c.snr, c.alphas_cumprod / (1 - c.alphas_cumprod))


@pytest.mark.parametrize("bad", [{"name": "quadratic"}, {"name": "linear", "num_timesteps": 0}])
def test_bad_schedule_arguments_are_named(bad):
    with pytest.raises(ValueError, match=r"schedule|num_timesteps"):
        make_beta_schedule(**bad)
