"""Timestep sampling for training: uniform, and logit-normal against its closed form."""

import pytest
import torch

from ldm.diffusion import logit_normal_probabilities, sample_timesteps


def test_uniform_is_the_plain_randint_stream():
    a = sample_timesteps(64, 1000, generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (1.0, 0.8), (-0.5, 1.5)])
def test_logit_normal_matches_its_closed_form(mean, std):
    T, n = 50, 400_000
    t = sample_timesteps(
        n, T, "logit_normal", logit_mean=mean, logit_std=std, generator=torch.Generator().manual_seed(0)
    )
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
    expected = logit_normal_probabilities(T, mean, std)
    assert abs(float(expected.sum()) - 1) < 1e-12
    observed = torch.bincount(t, minlength=T).double() / n
    # Each bin within 5 standard errors of a binomial count.
    assert torch.all((observed - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt() + 1e-6)
    # The mean of sigmoid(u) moves with `mean`: a positive mean draws more high-noise steps than the median.
    share_high = float((t >= T // 2).double().mean())
    assert (share_high > 0.5) == (mean > 0) or mean == 0


def test_an_unknown_sampling_is_named():
    with pytest.raises(ValueError, match="unknown 'cosine'"):
        sample_timesteps(4, 10, "cosine")
