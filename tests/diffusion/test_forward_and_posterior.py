"""The forward process and the posterior against closed forms and a numeric Bayes computation."""

import math

import numpy as np
import pytest
import torch

from ldm.diffusion import GaussianDiffusion

N = 200_000


def five_sigma_mean(std: float, n: int = N) -> float:
    return 5 * std / math.sqrt(n)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("step", [0, 10, 300, 999])
def test_q_sample_marginals_match_closed_form(schedule, step):
    d = GaussianDiffusion.from_schedule(schedule, 1000)
    g = torch.Generator().manual_seed(step)
    x0 = torch.full((N, 1), 0.7, dtype=torch.float64)
    t = torch.full((N,), step, dtype=torch.long)
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    mean, variance, log_variance = d.q_mean_variance(x0[:1], t[:1])
    abar = d.coef.alphas_cumprod[step].item()
    assert mean.item() == pytest.approx(math.sqrt(abar) * 0.7) and variance.item() == pytest.approx(1 - abar)
    assert log_variance.item() == pytest.approx(math.log(1 - abar))
    assert abs(x_t.mean().item() - mean.item()) < five_sigma_mean(math.sqrt(1 - abar))
    # Var of the sample variance of a Gaussian: 2 sigma^4 / (n - 1).
    assert abs(x_t.var().item() - (1 - abar)) < 5 * math.sqrt(2 / N) * (1 - abar)


@pytest.mark.parametrize("step", [0, 5, 100, 700])
def test_chained_one_step_kernels_match_q_sample(step):
    """x_t built by t+1 applications of q(x_s | x_{s-1}) = N(sqrt(1-beta_s) x_{s-1}, beta_s) has the law
    of q_sample(x0, t): compare mean, variance and quantiles."""
    d = GaussianDiffusion.from_schedule("linear", 1000)
    g = torch.Generator().manual_seed(123)
    # A non-Gaussian x0 (two points), so agreement is not only of the first two moments.
    x0 = torch.where(torch.rand(N, generator=g) < 0.3, -1.0, 1.0).double()
    x = x0.clone()
    for s in range(step + 1):
        beta = d.coef.betas[s]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(N, generator=g, dtype=torch.float64)
    t = torch.full((N,), step, dtype=torch.long)
    direct = d.q_sample(x0, t, torch.randn(N, generator=g, dtype=torch.float64))
    std = direct.std().item()
    assert abs(x.mean().item() - direct.mean().item()) < 2 * five_sigma_mean(std)
    assert x.var().item() == pytest.approx(direct.var().item(), rel=0.02)
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    torch.testing.assert_close(x.quantile(q), direct.quantile(q), atol=0.02 * std + 0.01, rtol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "scaled_linear"])
@pytest.mark.parametrize("step", [1, 2, 50, 500, 998])
def test_posterior_matches_bayes(schedule, step):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), integrated numerically on a grid."""
    d = GaussianDiffusion.from_schedule(schedule, 1000)
    x0, x_t = 0.4, -0.9
    beta = d.coef.betas[step].item()
    abar_prev = d.coef.alphas_cumprod[step - 1].item()

    def log_normal(x, mean, var):
        return -0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)

    prior_std = math.sqrt(1 - abar_prev)
    grid = np.linspace(-12 * prior_std - 3, 12 * prior_std + 3, 400_001)
    log_p = log_normal(x_t, np.sqrt(1 - beta) * grid, beta) + log_normal(grid, np.sqrt(abar_prev) * x0, 1 - abar_prev)
    w = np.exp(log_p - log_p.max())
    w /= w.sum()
    bayes_mean = (w * grid).sum()
    bayes_var = (w * (grid - bayes_mean) ** 2).sum()

    mean, var, log_var = d.q_posterior_mean_variance(
        torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[x_t]], dtype=torch.float64), torch.tensor([step])
    )
    assert mean.item() == pytest.approx(bayes_mean, rel=1e-6, abs=1e-9)
    assert var.item() == pytest.approx(bayes_var, rel=1e-5)
    assert log_var.item() == pytest.approx(math.log(bayes_var), abs=1e-5)


def test_posterior_at_t0_is_x0():
    d = GaussianDiffusion.from_schedule("linear", 1000)
    x0, x_t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    mean, var, _ = d.q_posterior_mean_variance(x0, x_t, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterizations_round_trip_in_float64(prediction):
    d = GaussianDiffusion.from_schedule("cosine", 1000, prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, 999, (64,), generator=g)  # t = 999 has beta clipped at 0.999; abar is still > 0
    x_t = d.q_sample(x0, t, eps)
    v = d.v_from_x0_eps(x0, t, eps)
    tight = {"rtol": 1e-9, "atol": 1e-9}
    torch.testing.assert_close(d.x0_from_eps(x_t, t, eps), x0, **tight)
    torch.testing.assert_close(d.eps_from_x0(x_t, t, x0), eps, **tight)
    torch.testing.assert_close(d.x0_from_v(x_t, t, v), x0, **tight)
    torch.testing.assert_close(d.eps_from_v(x_t, t, v), eps, **tight)
    # The network's exact target, fed back as its prediction, recovers (x0, eps).
    pred_x0, pred_eps = d.predict_x0_eps(d.training_target(x0, t, eps), x_t, t)
    torch.testing.assert_close(pred_x0, x0, **tight)
    torch.testing.assert_close(pred_eps, eps, **tight)


def test_v_is_the_velocity_of_the_angle():
    """With abar = cos^2(phi): x_t = cos(phi) x0 + sin(phi) eps and v = d x_t / d phi."""
    d = GaussianDiffusion.from_schedule("linear", 1000, prediction="v")
    x0, eps = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([3, 100, 400, 800, 999])
    phi = torch.acos(d.coef.sqrt_alphas_cumprod[t]).unsqueeze(1)
    torch.testing.assert_close(d.v_from_x0_eps(x0, t, eps), -torch.sin(phi) * x0 + torch.cos(phi) * eps)
