"""The variational bound, the Gaussian likelihood helpers and the training losses against closed forms."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm.diffusion import (
    GaussianDiffusion,
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    min_snr_weight,
    normal_kl,
    prior_bpd,
    training_losses,
)

DATA_VARIANCE = 0.25  # the toy data of the bound tests: x0 ~ N(0, 0.25) per element


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 100, generator=g, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    assert (normal_kl(m1, lv1, m1, lv1).abs() < 1e-12).all()


def test_gaussian_log_likelihood_matches_torch_distributions():
    x, mean, log_var = torch.randn(3, 50, dtype=torch.float64)
    torch.testing.assert_close(
        gaussian_log_likelihood(x, mean, log_var), Normal(mean, (0.5 * log_var).exp()).log_prob(x)
    )


@pytest.mark.parametrize(("mean", "log_scale"), [(0.0, -2.0), (0.9, -4.0), (-0.99, 0.5), (0.3, -9.0)])
def test_discretized_likelihood_is_a_distribution_over_256_levels(mean, log_scale):
    """Exact for every bin, also far in the tails where the CDFs are all ~0 or ~1."""
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(
        levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale)
    )
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.isfinite(log_p).all()
    inner = levels[1:-1]  # against the plain CDF difference, where that does not cancel
    normal = Normal(mean, math.exp(log_scale))
    plain = (normal.cdf(inner + 1 / 255) - normal.cdf(inner - 1 / 255)).log()
    usable = plain > -20
    torch.testing.assert_close(log_p[1:-1][usable], plain[usable], rtol=1e-6, atol=1e-8)


def exact_denoiser(diffusion: GaussianDiffusion):
    """For x0 ~ N(0, s^2): E[eps | x_t] = sqrt(1-abar) x_t / (abar s^2 + 1 - abar), and (learned_range)
    the exact reverse variance beta~_t + c1^2 Var(x0 | x_t), expressed as the interpolation value."""
    c = diffusion.coef
    s2 = DATA_VARIANCE

    def model(x, t):
        def at(a):
            return a[t].reshape(-1, *[1] * (x.ndim - 1))

        abar = at(c.alphas_cumprod)
        eps = (1 - abar).sqrt() * x / (abar * s2 + 1 - abar)
        if diffusion.variance.value != "learned_range":
            return eps
        var_x0 = s2 * (1 - abar) / (abar * s2 + 1 - abar)
        var = at(c.posterior_variance) + at(c.posterior_mean_coef1) ** 2 * var_x0
        low, high = at(c.posterior_log_variance_clipped), at(c.betas).log()
        frac = (var.log() - low) / (high - low)
        assert (frac > -1e-6).all() and (frac < 1 + 1e-6).all(), "true variance lies in [beta~, beta]"
        return torch.cat([eps, (2 * frac - 1).expand_as(x)], dim=1)

    return model


@pytest.fixture(scope="module")
def gaussian_data():
    x0 = torch.randn(1024, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = x0 * math.sqrt(DATA_VARIANCE)
    nll = -Normal(0.0, math.sqrt(DATA_VARIANCE)).log_prob(x0).flatten(1).mean(1) / math.log(2)  # bits/dim
    return x0, nll


def bound(variance, x0):
    d = GaussianDiffusion.from_schedule("linear", 1000, variance=variance)
    return bits_per_dim(d, exact_denoiser(d), x0, generator=torch.Generator().manual_seed(1))


def test_bound_of_the_exact_reverse_process_equals_the_nll(gaussian_data):
    """With the true reverse conditionals the bound is tight: E[bound] = -log q(x0) (up to L_T ~ 1e-5)."""
    x0, nll = gaussian_data
    result = bound("learned_range", x0)
    gap = result.total - nll
    standard_error = gap.std().item() / math.sqrt(len(gap))
    assert abs(gap.mean().item()) < 4 * standard_error + 2e-3
    assert standard_error < 0.03  # the check above has teeth
    torch.testing.assert_close(result.total, result.prior + result.terms.sum(1))


def test_fixed_variances_give_looser_bounds(gaussian_data):
    x0, _ = gaussian_data
    tight = bound("learned_range", x0).total.mean()
    for variance in ("fixed_small", "fixed_large"):
        assert bound(variance, x0).total.mean() > tight + 0.05


def test_prior_term_is_small_and_exact():
    d = GaussianDiffusion.from_schedule("linear", 1000)
    x0 = torch.full((1, 10), 0.5, dtype=torch.float64)
    abar = d.coef.alphas_cumprod[-1].item()
    var = 1 - abar
    kl_nats = 0.5 * (-math.log(var) + var + abar * 0.25 - 1)
    assert prior_bpd(d, x0).item() == pytest.approx(kl_nats / math.log(2), rel=1e-9)
    assert prior_bpd(d, x0).item() < 1e-4


def test_bits_per_dim_is_nats_over_dims_ln2():
    """One L_t term recomputed by hand from the KL in nats summed over dimensions."""
    d = GaussianDiffusion.from_schedule("linear", 50, variance="fixed_large")
    x0 = torch.randn(2, 3, 4, dtype=torch.float64)

    def model(x, t):
        return 0.1 * x

    result = bits_per_dim(d, model, x0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for _ in range(49, 19, -1):  # replay the noise draws down to t = 20
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.full((2,), 20)
    x_t = d.q_sample(x0, t, noise)
    true_mean, _, true_log_var = d.q_posterior_mean_variance(x0, x_t, t)
    p = d.p_mean_variance(model(x_t, t), x_t, t)
    nats = normal_kl(true_mean, true_log_var, p.mean, p.log_variance).sum(dim=(1, 2))
    torch.testing.assert_close(result.terms[:, 20], nats / (12 * math.log(2)))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_is_zero_for_the_exact_target(prediction):
    d = GaussianDiffusion.from_schedule("cosine", 1000, prediction=prediction)
    x0, noise = torch.randn(8, 2, 4, 4), torch.randn(8, 2, 4, 4)
    t = torch.randint(0, 1000, (8,))

    def oracle(x_t, t_):
        return d.training_target(x0, t_, noise)

    losses = training_losses(d, oracle, x0, t, noise)
    assert losses["loss"].shape == (8,)
    assert losses["loss"].abs().max() < 1e-10


def test_loss_is_the_mse_to_the_target():
    d = GaussianDiffusion.from_schedule("linear", 1000, prediction="v")
    x0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0, 10, 500, 999])

    def zero_model(x_t, t_):
        return torch.zeros_like(x_t)

    target = d.v_from_x0_eps(x0, t, noise)
    torch.testing.assert_close(training_losses(d, zero_model, x0, t, noise)["mse"], (target**2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize(("prediction", "expected"), [("eps", "min/snr"), ("v", "min/(snr+1)"), ("x0", "min")])
def test_min_snr_weights(prediction, expected):
    d = GaussianDiffusion.from_schedule("linear", 1000, prediction=prediction)
    t = torch.arange(0, 1000, 37)
    snr = d.coef.snr[t].float()
    clipped = torch.minimum(snr, torch.tensor(5.0))
    formula = {"min/snr": clipped / snr, "min/(snr+1)": clipped / (snr + 1), "min": clipped}[expected]
    torch.testing.assert_close(min_snr_weight(d, t, gamma=5.0), formula)


def test_hybrid_loss_trains_the_variance_only_through_the_bound():
    """L_hybrid: the VLB term's gradient reaches the variance half but not the mean half (stop-gradient)."""
    d = GaussianDiffusion.from_schedule("linear", 1000, variance="learned_range")
    x0, noise, t = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.tensor([0, 5, 400, 900])
    mean_part = torch.zeros(4, 2, 3, 3, requires_grad=True)
    var_part = torch.zeros(4, 2, 3, 3, requires_grad=True)

    def model(x_t, t_):
        return torch.cat([mean_part + 0.1 * x_t, var_part], dim=1)

    losses = training_losses(d, model, x0, t, noise)
    assert set(losses) == {"mse", "vb", "loss"}
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    losses["vb"].sum().backward()
    assert mean_part.grad is None or mean_part.grad.abs().max() == 0
    assert var_part.grad.abs().max() > 0


def test_output_of_the_wrong_size_is_a_clear_error():
    d = GaussianDiffusion.from_schedule("linear", 1000, variance="learned_range")
    x0 = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="learned_range"):
        training_losses(d, lambda x, t: x, x0, torch.tensor([1, 2]))  # C channels, 2C needed


@pytest.mark.parametrize("of", ["snr", "snr_plus_one"])
def test_min_snr_gives_every_target_the_same_cost_of_an_x0_error(of):
    """Whatever the network predicts, the weighted loss of a prediction equals w0 * ||x0_hat - x0||^2 with
    w0 = min(SNR, gamma) (or min(SNR + 1, gamma)): the identity min-SNR is built on, checked on real losses."""
    gamma, t = 5.0, torch.tensor([1, 40, 200, 500, 900, 999])
    x0, noise = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64)
    x0_hat = x0 + 0.3 * torch.randn(6, 2, 3, 3, dtype=torch.float64)
    for prediction in ("eps", "v", "x0"):
        d = GaussianDiffusion.from_schedule("scaled_linear", 1000, prediction=prediction)
        snr = d.coef.snr[t]
        x_t = d.q_sample(x0, t, noise)
        a, s = (
            d.coef.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1),
            d.coef.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1),
        )
        eps_hat = (x_t - a * x0_hat) / s  # the eps / v that imply x0_hat at this x_t
        output = {"eps": eps_hat, "v": a * eps_hat - s * x0_hat, "x0": x0_hat}[prediction]
        model = lambda x, t_, out=output: out  # noqa: E731
        loss = training_losses(d, model, x0, t, noise, min_snr_gamma=gamma, min_snr_of=of)["mse"]
        w0 = (snr + (1 if of == "snr_plus_one" else 0)).clamp(max=gamma)
        expected = w0 * ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-7)  # the loss is float32
