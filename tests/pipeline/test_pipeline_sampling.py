"""Sampling behaviour of LatentDiffusionPipeline: seeds, guidance, samplers, trajectories, outputs, errors."""

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from ldm.diffusion import sample_ddim, sample_ddpm
from ldm.generation import GenerationRequest
from ldm.generation.noise_schedule import NoiseScheduleConfig
from tests.pipeline.tiny_models import IMAGE_SIZE, tiny_pipeline

PROMPTS = ["a red circle", "a blue square"]


def run(pipe, prompt=PROMPTS, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "output_type": "latent", "progress": False, **kwargs}
    return pipe(prompt, **{"generator": torch.Generator().manual_seed(seed), **kwargs})


class UNetCalls:
    """Records the batch size and the (first) timestep of every U-Net forward."""

    def __init__(self, unet):
        self.batches: list[int] = []
        self.timesteps: list[int] = []
        self.handle = unet.register_forward_pre_hook(self._record)

    def _record(self, _module, args):
        self.batches.append(args[0].shape[0])
        self.timesteps.append(int(torch.as_tensor(args[1]).flatten()[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_same_seed_same_images_and_different_seed_different_images(pipe):
    first, again, other = run(pipe, seed=3).images, run(pipe, seed=3).images, run(pipe, seed=4).images
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - other).abs().mean() > 0.1


def test_initial_noise_is_drawn_like_diffusers(pipe):
    """x_T = torch.randn((B, C, h, w), generator) on the CPU generator, and it is the trajectory's first entry."""
    out = run(pipe, return_trajectory=True, num_images_per_prompt=2)
    expected = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.trajectory[0], expected, rtol=0, atol=0)


def test_guidance_one_is_a_single_conditional_pass(pipe):
    """w = 1: one U-Net call per step over the B conditional inputs only, and the result is our DDIM sampler on
    the bare conditional U-Net; the negative prompt then has no effect."""
    with UNetCalls(pipe.unet) as calls:
        out = run(pipe, guidance_scale=1.0, num_images_per_prompt=3)
    assert calls.batches == [6] * 4
    cond = pipe.text_encoder.encode(PROMPTS).repeat_interleave(3, dim=0)
    x_T = torch.randn((6, 4, 8, 8), generator=torch.Generator().manual_seed(0))

    def conditional_unet(x, t):
        return pipe.unet(x, t, encoder_hidden_states=cond).sample

    schedule = NoiseScheduleConfig()
    manual = sample_ddim(conditional_unet, schedule.build(), x_T, num_steps=4, steps_offset=1, progress=False)
    torch.testing.assert_close(out.images, manual.sample, rtol=0, atol=0)
    with_negative = run(pipe, guidance_scale=1.0, num_images_per_prompt=3, negative_prompt="something else")
    torch.testing.assert_close(with_negative.images, out.images, rtol=0, atol=0)


def test_sampling_all_t_steps_runs_the_full_chain_without_the_offset():
    """T steps visit T-1 .. 0 (DDPM as trained); steps_offset 1 would push the first one to t = T."""
    schedule = NoiseScheduleConfig(num_train_timesteps=20)
    pipe = tiny_pipeline(schedule)
    with UNetCalls(pipe.unet) as calls:
        out = run(pipe, guidance_scale=1.0, num_inference_steps=20, sampler="ddpm")
    assert calls.timesteps == list(range(19, -1, -1))
    cond = pipe.text_encoder.encode(PROMPTS)
    x_T = torch.randn((2, 4, 8, 8), generator=(generator := torch.Generator().manual_seed(0)))

    def conditional_unet(x, t):
        return pipe.unet(x, t, encoder_hidden_states=cond).sample

    manual = sample_ddpm(conditional_unet, schedule.build(), x_T, num_steps=20, generator=generator, progress=False)
    torch.testing.assert_close(out.images, manual.sample, rtol=0, atol=0)


def test_guidance_batches_unconditional_and_conditional_in_one_pass(pipe):
    with UNetCalls(pipe.unet) as calls:
        guided = run(pipe, guidance_scale=5.0).images
    assert calls.batches == [4] * 4  # [uncond; cond] for 2 prompts, once per step
    assert (guided - run(pipe, guidance_scale=1.0).images).abs().max() > 1e-3


def test_guidance_zero_is_the_unconditional_model(pipe):
    """eps~ = eps_u + 0 (eps_c - eps_u) = eps_u: the same as sampling the prompt "" without guidance."""
    unconditional = run(pipe, guidance_scale=0.0).images
    empty_prompt = run(pipe, prompt=["", ""], guidance_scale=1.0).images
    torch.testing.assert_close(unconditional, empty_prompt, rtol=1e-5, atol=1e-5 * empty_prompt.abs().max().item())


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_trajectory_shapes_and_ends(pipe, sampler):
    out = run(pipe, sampler=sampler, num_inference_steps=5, num_images_per_prompt=2, return_trajectory=True)
    assert out.trajectory.shape == (6, 4, 4, 8, 8)  # steps + 1, B = 2 prompts x 2, C, h, w
    assert out.trajectory_x0.shape == (5, 4, 4, 8, 8)
    torch.testing.assert_close(out.trajectory[-1], out.images, rtol=0, atol=0)
    assert run(pipe, sampler=sampler).trajectory is None


def test_ddpm_is_stochastic_given_x_T_and_ddim_eta_zero_is_not(pipe):
    """Two seeds giving the same x_T is impossible, so compare DDPM with DDIM eta 0 / eta 1 on one seed."""
    ddim = run(pipe, num_inference_steps=6).images
    assert (run(pipe, sampler="ddpm", num_inference_steps=6).images - ddim).abs().max() > 1e-2
    assert (run(pipe, eta=1.0, num_inference_steps=6).images - ddim).abs().max() > 1e-2


def test_learned_range_unet_samples_with_both_samplers():
    pipe = tiny_pipeline(NoiseScheduleConfig(variance="learned_range"))
    assert pipe.unet.config.out_channels == 8
    for sampler in ("ddim", "ddpm"):
        out = run(pipe, sampler=sampler)
        assert out.images.shape == (2, 4, 8, 8) and torch.isfinite(out.images).all()


def test_output_types_agree(pipe):
    latents = run(pipe).images
    as_np = run(pipe, output_type="np").images
    as_pil = run(pipe, output_type="pil").images
    assert latents.shape == (2, 4, 8, 8)
    assert as_np.dtype == np.float32 and as_np.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert as_np.min() >= 0 and as_np.max() <= 1
    assert [image.size for image in as_pil] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2
    assert all(isinstance(image, Image.Image) and image.mode == "RGB" for image in as_pil)
    # decode() is what the pipeline decodes with: D(z / scaling_factor), then diffusers' postprocessing.
    decoded = pipe.decode(latents)
    np.testing.assert_array_equal(as_np, VaeImageProcessor().postprocess(decoded, output_type="np"))
    reference_pil = VaeImageProcessor().postprocess(decoded, output_type="pil")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(as_pil, reference_pil, strict=True))
    direct = pipe.vae.decode(latents / 0.5).sample
    torch.testing.assert_close(decoded, direct, rtol=0, atol=0)


def test_other_sizes_and_single_prompt_string(pipe):
    out = run(pipe, prompt="a green triangle", height=32, width=16, output_type="np")
    assert out.images.shape == (1, 32, 16, 3)


def test_defaults_fill_unset_arguments(pipe):
    assert pipe.defaults.guidance_scale == 7.5 and pipe.defaults.num_inference_steps == 50
    settings = pipe.resolve(GenerationRequest("a red circle"))
    assert (settings.guidance_scale, settings.num_inference_steps, settings.sampler, settings.eta) == (
        7.5,
        50,
        "ddim",
        0,
    )
    assert (settings.height, settings.width) == (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 1001}, "num_inference_steps"),  # more steps than the 1000-step chain
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({"height": 10}, "height"),  # a multiple of the VAE factor 2 but not of 2 x U-Net downsampling 2
        ({"height": 7}, "height"),
        ({"width": 0}, "width"),
        ({"width": -4}, "width"),
        ({"guidance_scale": -0.5}, "guidance_scale"),
        ({"prompt": []}, "prompt"),
        ({"negative_prompt": []}, "negative_prompt"),
        ({"negative_prompt": ["only one"]}, "negative_prompt"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"sampler": "euler"}, "sampler"),
        ({"output_type": "pt"}, "output_type"),
        ({"eta": 1.5}, "eta"),
        ({"eta": -0.1}, "eta"),
        ({"eta": float("nan")}, "eta"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),  # NaN passes every comparison; it would give NaN images
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"guidance_scale": True}, "guidance_scale"),
        ({"num_images_per_prompt": True}, "num_images_per_prompt"),
        ({"num_images_per_prompt": 2.0}, "num_images_per_prompt"),
        ({"height": 16.0}, "height"),
        ({"generator": 0}, "generator"),  # a seed where a torch.Generator belongs
    ],
)
def test_invalid_arguments_name_the_argument(pipe, kwargs, argument):
    with UNetCalls(pipe.unet) as calls, pytest.raises(ValueError, match=f"^{argument}: "):
        run(pipe, **kwargs)
    assert calls.batches == []  # rejected before any sampling


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"prompt": [1, 2]}, r"prompt\[0\]: expected str, got int"),
        ({"prompt": ["a red circle", None]}, r"prompt\[1\]: is None"),
        ({"prompt": b"a red circle"}, "prompt: expected a str or a list of str, got bytes"),
        ({"prompt": 7}, "prompt: expected a str or a list of str, got int"),
        ({"negative_prompt": 3}, "negative_prompt: expected a str or a list of str"),
    ],
)
def test_prompts_of_the_wrong_type_name_the_argument(pipe, kwargs, argument):
    with UNetCalls(pipe.unet) as calls, pytest.raises(TypeError, match=f"^{argument}"):
        run(pipe, **kwargs)
    assert calls.batches == []


def test_mismatched_parts_are_rejected():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="learned_range variance needs 8"):
        type(pipe)(pipe.vae, pipe.text_encoder, pipe.unet, NoiseScheduleConfig(variance="learned_range"))


def test_stochastic_sampling_needs_a_generator_on_the_sampling_device(pipe, monkeypatch):
    """On an accelerator, step noise is drawn there, so a CPU generator is refused for DDPM / eta > 0 (x_T alone
    is drawn on the generator's device and moved, as diffusers' randn_tensor does)."""
    monkeypatch.setattr(type(pipe), "device", property(lambda self: torch.device("cuda")))
    with UNetCalls(pipe.unet) as calls:
        for kwargs in ({"sampler": "ddpm"}, {"eta": 0.5}):
            with pytest.raises(ValueError, match=r"^generator: is on cpu but stochastic sampling"):
                run(pipe, **kwargs)
    assert calls.batches == []


def test_inference_leaves_no_graph(pipe):
    assert not run(pipe).images.requires_grad
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_a_pipeline_cast_to_bfloat16_draws_the_float32_images():
    # As a user on a current GPU would sample; before the sampler formed its coefficients in float64, the last
    # DDIM step of Stable Diffusion's schedule made every pixel NaN in bf16.
    reference, half = tiny_pipeline(), tiny_pipeline().to(dtype=torch.bfloat16)
    prompts, settings = ["a red circle", "a blue square"], {"num_inference_steps": 50, "output_type": "np"}
    expected = reference(prompts, generator=torch.Generator().manual_seed(0), **settings).images
    images = half(prompts, generator=torch.Generator().manual_seed(0), **settings).images
    assert np.isfinite(images).all()
    assert np.abs(images - expected).max() < 0.05  # pixels in [0, 1]; the U-Net and VAE also run in bf16
