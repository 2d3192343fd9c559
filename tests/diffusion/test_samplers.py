"""Samplers and guidance: determinism, the noise scale, DDIM over subsets, CFG, thresholding."""

import pytest
import torch

from ldm.diffusion import (
    SAMPLERS,
    DynamicThreshold,
    GaussianDiffusion,
    StaticThreshold,
    classifier_free_guidance,
    ddim_step,
    ddpm_step,
    sample_ddim,
    sample_ddpm,
    sampling_chain,
)


def toy_model(x, t, scale=None):
    out = 0.5 * torch.tanh(x) + 0.001 * t.reshape(-1, *[1] * (x.ndim - 1))
    return out if scale is None else out * scale.reshape(-1, *[1] * (x.ndim - 1))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_same_seed_same_sample(sampler):
    d = GaussianDiffusion.from_schedule("linear", 100)

    def run(seed):
        x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(seed)
        if sampler == "ddpm":
            return sample_ddpm(toy_model, d, x_T, generator=g, progress=False).sample
        return sample_ddim(toy_model, d, x_T, num_steps=10, eta=1.0, generator=g, progress=False).sample

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_ddim_eta0_is_deterministic_without_a_generator():
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sample_ddim(toy_model, d, x_T, num_steps=20, progress=False).sample
    b = sample_ddim(toy_model, d, x_T, num_steps=20, progress=False).sample
    assert torch.equal(a, b)


def test_trajectory_runs_from_x_T_to_the_sample():
    d = GaussianDiffusion.from_schedule("linear", 1000)
    x_T = torch.randn(2, 1, 3, 3)
    out = sample_ddpm(toy_model, d, x_T, num_steps=25, return_trajectory=True, progress=False)
    assert out.trajectory.shape == (26, 2, 1, 3, 3)
    assert torch.equal(out.trajectory[0], x_T) and torch.equal(out.trajectory[-1], out.sample)


def test_ancestral_noise_has_the_posterior_standard_deviation():
    """x_{t-1} = mu + sigma z with sigma = sqrt(beta~_t): its spread is beta~_t, not beta~_t^2."""
    d = GaussianDiffusion.from_schedule("linear", 1000, prediction="x0")
    n, step = 200_000, 300
    x_t = torch.full((n, 1), 0.3, dtype=torch.float64)
    t = torch.full((n,), step)
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_prev, _ = ddpm_step(d, torch.zeros_like(x_t), x_t, t, noise)
    expected = d.coef.posterior_variance[step].item()
    assert x_prev.var().item() == pytest.approx(expected, rel=0.02)
    assert expected > 1e-3  # so the variance and its square are far apart


def test_ddim_uses_alphabar_of_the_previous_timestep_in_the_subset():
    d = GaussianDiffusion.from_schedule("linear", 1000, prediction="eps")
    chain = sampling_chain(d, 7, "linspace")  # uneven gaps: 999, 832, 666, ...
    gaps = -torch.diff(torch.as_tensor(chain.timesteps[::-1].copy()))
    assert len(set(gaps.tolist())) > 1
    x, eps = torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    noise = torch.randn(1, 5, dtype=torch.float64)
    eta = 0.7
    for index in range(1, 7):
        t_now, t_prev = chain.timesteps[index], chain.timesteps[index - 1]
        abar_t, abar_prev = d.coef.alphas_cumprod[t_now], d.coef.alphas_cumprod[t_prev]
        x0 = (x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
        sigma = eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()
        expected = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).sqrt() * eps + sigma * noise
        ours, _ = ddim_step(chain, eps, x, torch.tensor([index]), eta, noise)
        torch.testing.assert_close(ours, expected)


def test_ddim_eta1_noise_is_the_ddpm_posterior_std():
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    chain = sampling_chain(d, 50, "trailing")
    x, eps = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    for index in range(1, 50):
        t = torch.tensor([index])
        deterministic, _ = ddim_step(chain, eps, x, t, 1.0, torch.zeros(1, 1, dtype=torch.float64))
        noisy, _ = ddim_step(chain, eps, x, t, 1.0, torch.ones(1, 1, dtype=torch.float64))
        torch.testing.assert_close((noisy - deterministic).squeeze(), chain.coef.posterior_variance[index].sqrt())


def test_cfg_scale_one_is_the_conditional_model_itself():
    assert classifier_free_guidance(toy_model, 1.0, {"scale": torch.zeros(1)}) is toy_model


def test_cfg_is_one_batched_forward_with_the_guidance_formula():
    calls = []

    def model(x, t, scale):
        calls.append(x.shape[0])
        return toy_model(x, t, scale)

    x, t = torch.randn(3, 2, 4, 4), torch.full((3,), 500)
    cond, uncond = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(1)
    guided = classifier_free_guidance(model, 7.5, {"scale": uncond})(x, t, scale=cond)
    assert calls == [6]  # one forward over [uncond; cond]
    eps_u, eps_c = toy_model(x, t, torch.zeros(3)), toy_model(x, t, cond)
    torch.testing.assert_close(guided, eps_u + 7.5 * (eps_c - eps_u))


def test_cfg_guides_only_the_mean_of_a_learned_variance_output():
    def model(x, t, scale):
        s = scale.reshape(-1, 1, 1, 1)
        return torch.cat([x * s, x + s], dim=1)  # (B, 2C): mean half, variance half

    x, t = torch.randn(2, 3, 2, 2), torch.zeros(2, dtype=torch.long)
    cond = torch.tensor([2.0, 3.0])
    out = classifier_free_guidance(model, 4.0, {"scale": torch.zeros(2)})(x, t, scale=cond)
    c = cond.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out[:, :3], 4.0 * x * c)
    torch.testing.assert_close(out[:, 3:], x + c)


def test_cfg_rejects_bad_arguments():
    with pytest.raises(ValueError, match="guidance_scale"):
        classifier_free_guidance(toy_model, -1.0, {})
    guided = classifier_free_guidance(toy_model, 3.0, {})
    with pytest.raises(ValueError, match="scale"):
        guided(torch.randn(2, 1), torch.zeros(2), scale=torch.ones(2))


def test_sampler_with_guidance_runs_end_to_end():
    d = GaussianDiffusion.from_schedule("linear", 1000)
    guided = classifier_free_guidance(toy_model, 3.0, {"scale": torch.zeros(1)})
    out = sample_ddim(guided, d, torch.randn(2, 1, 2, 2), num_steps=5, model_kwargs={"scale": torch.ones(2)},
                      progress=False)  # fmt: skip
    assert out.sample.shape == (2, 1, 2, 2) and torch.isfinite(out.sample).all()


def test_static_threshold_clamps():
    x = torch.tensor([[-3.0, -0.5, 0.2, 2.0]])
    torch.testing.assert_close(StaticThreshold(1.0)(x), torch.tensor([[-1.0, -0.5, 0.2, 1.0]]))


def test_dynamic_threshold_rescales_per_sample():
    x = torch.stack([torch.linspace(-0.9, 0.9, 100), torch.linspace(-4.0, 4.0, 100)])
    out = DynamicThreshold(percentile=0.9)(x)
    torch.testing.assert_close(out[0], x[0])  # within [-1, 1]: s = 1, unchanged
    s = torch.quantile(x[1].abs(), 0.9)
    torch.testing.assert_close(out[1], x[1].clamp(-s, s) / s)
    assert out[1].abs().max() == pytest.approx(1.0)


def test_bad_sampler_arguments_are_named():
    d = GaussianDiffusion.from_schedule("linear", 100)
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(toy_model, d, torch.randn(1, 1), eta=1.5, progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        sample_ddim(toy_model, d, torch.randn(1, 1), num_steps=0, progress=False)
    with pytest.raises(ValueError, match="spacing"):
        sample_ddim(toy_model, d, torch.randn(1, 1), num_steps=5, spacing="uniform", progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_in_half_precision_matches_float32(dtype, eta):
    # Stable Diffusion's schedule and spacing: the last of 50 steps goes t = 21 -> 1, where 1 - abar_t / abar_prev
    # and 1 - abar_prev - sigma^2 cancel. Formed in half precision they go negative, and sqrt makes every pixel NaN.
    d = GaussianDiffusion.from_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    x_T = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(precision: torch.dtype) -> torch.Tensor:
        model = lambda x, t: (0.5 * torch.tanh(x.float()) + 0.001 * t.reshape(-1, 1, 1, 1)).to(precision)  # noqa: E731
        g = torch.Generator().manual_seed(1)
        kwargs = {"num_steps": 50, "eta": eta, "steps_offset": 1, "generator": g, "progress": False}
        return sample_ddim(model, d, x_T.to(precision), **kwargs).sample

    reference, half = run(torch.float32), run(dtype)
    assert half.dtype == dtype and torch.isfinite(half).all()
    # bf16 keeps 8 significant bits (0.4% per operation), accumulated over 50 steps; with eta = 1 the noise is also
    # drawn in each precision, so the two runs see slightly different z.
    assert (half.float() - reference).abs().max() < (0.05 if eta == 0 else 0.1) * reference.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_ddpm_in_half_precision_matches_float32(dtype):
    d = GaussianDiffusion.from_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    x_T = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(precision: torch.dtype) -> torch.Tensor:
        model = lambda x, t: (0.5 * torch.tanh(x.float()) + 0.001 * t.reshape(-1, 1, 1, 1)).to(precision)  # noqa: E731
        g = torch.Generator().manual_seed(1)
        return sample_ddpm(
            model, d, x_T.to(precision), num_steps=50, steps_offset=1, generator=g, progress=False
        ).sample

    reference, half = run(torch.float32), run(dtype)
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert (half.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    ("sampler", "kwargs"),
    [("dpmpp_2m", {}), ("dpmpp_2m", {"karras_sigmas": True}), ("dpmpp_2m_sde", {}), ("dpmpp_2m", {"zero_snr": True})],
    ids=["2m", "2m_karras", "2m_sde", "2m_zero_snr"],
)
def test_dpm_solver_in_half_precision_matches_float32(dtype, sampler, kwargs):
    """Its coefficients involve exp(-h) and sigma ratios that round badly in half precision; formed in float64
    and cast once, the half-precision sample stays within bf16's accumulated rounding of the float32 one."""
    kwargs = dict(kwargs)
    zero_snr = kwargs.pop("zero_snr", False)
    d = GaussianDiffusion.from_schedule("scaled_linear", 1000, "v" if zero_snr else "eps", zero_terminal_snr=zero_snr)
    x_T = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(precision: torch.dtype) -> torch.Tensor:
        model = lambda x, t: (0.5 * torch.tanh(x.float()) + 0.001 * t.reshape(-1, 1, 1, 1)).to(precision)  # noqa: E731
        g = torch.Generator().manual_seed(1)
        return SAMPLERS[sampler](
            model, d, x_T.to(precision), num_steps=15, spacing="trailing", generator=g, progress=False, **kwargs
        ).sample

    reference, half = run(torch.float32), run(dtype)
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert (half.float() - reference).abs().max() < 0.1 * reference.abs().max()
