"""A denoising step of the pipeline (guided U-Net + sampler update) makes no host round trip.

Counted with tests/host_round_trips.py on the real LatentDiffusionPipeline over the tiny parts: on the
CPU for syncs and tensors made from host data, and on the meta device (a stand-in for a GPU, where a
copy from the CPU is not the no-op it is on a CPU-only run) for cross-device copies.
"""

import copy
import dataclasses
from collections import Counter

import pytest
import torch

from ldm.diffusion import SAMPLERS
from ldm.generation import LatentDiffusionPipeline
from ldm.generation.noise_schedule import NoiseScheduleConfig
from tests.host_round_trips import HostRoundTrips, StepWindows
from tests.pipeline.tiny_models import tiny_text_encoder, tiny_unet, tiny_vae


def count_pipeline_steps(pipe: LatentDiffusionPipeline, sampler: str, monkeypatch, **kwargs) -> list[HostRoundTrips]:
    """Run 3 guided steps and return the round trips of steps 2 and 3, each counted from the end of the step
    before it (the sampler's callback, which the pipeline's sampler call is wrapped to pass) to its own end."""
    windows = StepWindows()
    sample = SAMPLERS[sampler].sample

    def sample_with_windows(*args, callback=None, **sample_kwargs):
        windows.then = callback  # the pipeline's own callback still runs
        return sample(*args, callback=windows, **sample_kwargs)

    monkeypatch.setitem(SAMPLERS, sampler, dataclasses.replace(SAMPLERS[sampler], sample=sample_with_windows))
    with windows:
        pipe("a red circle", guidance_scale=5.0, num_inference_steps=3, sampler=sampler, **kwargs)
    assert len(windows.steps) == 2
    return windows.steps


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_guided_denoising_step_makes_no_host_round_trip(pipe, sampler, monkeypatch):
    """No sync and no tensor from host data in a step: the U-Net gets a device tensor of timesteps (given a
    Python int, diffusers' U-Net would build `torch.tensor([t])`), DDPM's t = 0 test reads the loop index."""
    generator = torch.Generator().manual_seed(0)
    steps = count_pipeline_steps(
        pipe, sampler, monkeypatch, generator=generator, output_type="latent", return_trajectory=True, progress=False
    )
    for trips in steps:
        assert trips.syncs == Counter(), str(trips)
        assert trips.host_data == Counter(), str(trips)


def test_an_inpainting_step_with_guidance_rescale_makes_no_host_round_trip(pipe, monkeypatch):
    """RePaint's blend and jumps and the rescale's per-sample std stay on the device."""
    image = torch.rand(1, 3, pipe.default_size, pipe.default_size, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, pipe.default_size, pipe.default_size)
    mask[..., :8, :8] = 1
    steps = count_pipeline_steps(
        pipe, "dpmpp_2m", monkeypatch, image=image, mask_image=mask, resample=2, guidance_rescale=0.7,
        generator=torch.Generator().manual_seed(0), output_type="latent", progress=False,
    )  # fmt: skip
    for trips in steps:
        assert trips.syncs == Counter(), str(trips)
        assert trips.host_data == Counter(), str(trips)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_pipeline_to_a_device_leaves_no_step_copying_from_the_host(sampler, monkeypatch):
    """After `pipeline.to("meta")` every part, the schedule included, is on meta, and a step copies nothing
    across devices (the old schedule gather copied its arrays CPU -> meta in every step)."""
    text_encoder = copy.deepcopy(tiny_text_encoder())  # the cached one is shared with other tests
    pipe = LatentDiffusionPipeline(tiny_vae(), text_encoder, tiny_unet(), NoiseScheduleConfig()).to("meta")
    for trips in count_pipeline_steps(pipe, sampler, monkeypatch, output_type="latent", progress=False):
        assert trips.total == 0, str(trips)
    with HostRoundTrips() as moved:  # the 3 steps sampled a respacing: only `to` put these arrays on meta
        pipe.diffusion.coefficients(torch.device("meta"))
    assert moved.total == 0, f"pipeline.to left the schedule on the host:\n{moved}"
