"""Starting part-way down the chain, RePaint inpainting, and spherical interpolation."""

import math

import pytest
import torch

from ldm.diffusion import SAMPLERS, GaussianDiffusion, Inpainting, sample_ddim, sampling_chain, sdedit_start, slerp
from tests.diffusion.test_against_diffusers import SHAPE, standin_model, x_T

DIFFUSION = GaussianDiffusion.from_schedule("scaled_linear", 1000, prediction="v", zero_terminal_snr=True)
STEPS = 10


def trailing(sampler: str) -> dict:
    """Trailing spacing for the samplers that take a spacing (lcm visits its own skip-step schedule)."""
    return {"spacing": "trailing"} if "spacing" in SAMPLERS[sampler].chain_settings else {}


class CountingModel:
    """The stand-in model, counting its calls and recording the timesteps it was told."""

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        self.model, self.timesteps = standin_model(diffusion), []

    def __call__(self, x, t, **kwargs):
        self.timesteps.append(int(t[0]))
        return self.model(x, t, **kwargs)


def test_start_step_continues_the_full_run_from_its_intermediate_sample():
    """Deterministic DDIM started at step k from the full run's x after k steps ends where the full run ends."""
    model = standin_model(DIFFUSION)
    full = sample_ddim(
        model, DIFFUSION, x_T(), num_steps=STEPS, spacing="trailing", return_trajectory=True, progress=False
    )
    counting = CountingModel(DIFFUSION)
    tail = sample_ddim(
        counting, DIFFUSION, full.trajectory[4], num_steps=STEPS, spacing="trailing", start_step=4, progress=False
    )
    torch.testing.assert_close(tail.sample, full.sample)
    chain = sampling_chain(DIFFUSION, STEPS, "trailing")
    assert counting.timesteps == chain.timesteps[::-1][4:].tolist()


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_only_the_steps_after_start_step(sampler):
    counting = CountingModel(DIFFUSION)
    out = SAMPLERS[sampler](
        counting, DIFFUSION, x_T(), num_steps=STEPS, **trailing(sampler), start_step=7,
        generator=torch.Generator().manual_seed(0), progress=False,
    )  # fmt: skip
    assert len(counting.timesteps) == STEPS - 7
    assert torch.isfinite(out.sample).all()


@pytest.mark.parametrize("start_step", [-1, STEPS, 1.5])
def test_a_start_step_outside_the_chain_is_refused(start_step):
    with pytest.raises(ValueError, match="start_step must be an int in"):
        sample_ddim(standin_model(DIFFUSION), DIFFUSION, x_T(), num_steps=STEPS, start_step=start_step, progress=False)


def square_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, *SHAPE[2:])
    mask[..., 1:3, 1:3] = 1
    return mask


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("resample", [1, 3])
def test_inpainting_keeps_the_known_region_exactly_and_repaints_the_rest(sampler, resample):
    known = torch.linspace(-1, 1, math.prod(SHAPE)).reshape(SHAPE)
    mask = square_mask()
    counting = CountingModel(DIFFUSION)
    out = SAMPLERS[sampler](
        counting, DIFFUSION, x_T(), num_steps=STEPS, **trailing(sampler),
        inpaint=Inpainting(known, mask, resample), generator=torch.Generator().manual_seed(0), progress=False,
    ).sample  # fmt: skip
    keep = mask.expand(SHAPE) == 0
    assert torch.equal(out[keep], known[keep])  # the last level is clean: the known region is the original
    assert (out[~keep] - known[~keep]).abs().min() > 1e-4  # the model drew the masked region
    assert len(counting.timesteps) == STEPS * resample  # each step redone `resample` times


def test_the_known_region_follows_the_forward_process_at_every_level():
    """After the step to level alphabar', the known region is sqrt(abar') x0 + sqrt(1 - abar') z: over many
    draws its mean and variance are those of q(x | x0)."""
    chain = sampling_chain(DIFFUSION, STEPS, "trailing")
    known = torch.full((20_000, 1), 0.6, dtype=torch.float64)
    inpaint = Inpainting(known, torch.zeros(1, 1, dtype=torch.float64))
    t = torch.full((20_000,), 5)
    x = inpaint.keep_known(chain, torch.zeros_like(known), t, torch.Generator().manual_seed(0))
    abar = chain.coef.alphas_cumprod_prev[5].item()
    assert x.mean().item() == pytest.approx(math.sqrt(abar) * 0.6, abs=0.02)
    assert x.var().item() == pytest.approx(1 - abar, rel=0.03)


def test_renoising_is_one_forward_step():
    chain = sampling_chain(DIFFUSION, STEPS, "trailing")
    x_prev = torch.full((200_000, 1), 0.5, dtype=torch.float64)
    t = torch.full((200_000,), 5)
    x = Inpainting.renoise(chain, x_prev, t, torch.Generator().manual_seed(0))
    beta = chain.coef.betas[5].item()
    assert x.mean().item() == pytest.approx(math.sqrt(1 - beta) * 0.5, abs=0.006)  # 4 standard errors
    assert x.var().item() == pytest.approx(beta, rel=0.02)


def test_inpainting_refuses_a_mask_of_the_wrong_size_and_a_bad_resample():
    known = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="mask of shape"):
        Inpainting(known, torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="resample must be an int >= 1"):
        Inpainting(known, square_mask(), resample=0)


def test_slerp_keeps_the_norm_of_gaussian_noise_and_hits_both_ends():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    middle = slerp(a, b, 0.5)
    norms = middle.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
    assert ((norms - 1).abs() < 0.05).all()  # a straight line's midpoint would be ~0.71 of the norm
    assert (torch.lerp(a, b, 0.5).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1) < 0.8).all()


def test_slerp_of_parallel_vectors_is_linear_and_finite():
    a = torch.ones(1, 8)
    torch.testing.assert_close(slerp(a, 2 * a, 0.25), 1.25 * a)
    with pytest.raises(ValueError, match="weight must be in"):
        slerp(a, a, 1.5)


def test_sdedit_noises_the_image_to_the_first_step_it_runs():
    x0, noise = torch.full(SHAPE, 0.5), x_T()
    start, start_step = sdedit_start(DIFFUSION, x0, noise, 0.6, STEPS, "trailing")
    assert start_step == 4  # of 10 steps, the last 6 run
    chain = sampling_chain(DIFFUSION, STEPS, "trailing")
    abar = chain.coef.alphas_cumprod[5].item()  # the level of the first step run: chain index 10 - 1 - 4
    torch.testing.assert_close(start, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise)
    full, start_step = sdedit_start(DIFFUSION, x0, noise, 1.0, STEPS, "trailing")
    assert start_step == 0 and torch.equal(full, noise)  # alphabar_T = 0: the image is gone
    with pytest.raises(ValueError, match="runs 0 steps"):
        sdedit_start(DIFFUSION, x0, noise, 0.05, STEPS, "trailing")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slerp_keeps_half_precision_and_matches_float32(dtype):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    half = slerp(a.to(dtype), b.to(dtype), 0.3)
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), slerp(a, b, 0.3), rtol=0.02, atol=0.02)
