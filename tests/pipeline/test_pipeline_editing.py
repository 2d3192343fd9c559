"""The pipeline's generation options: every sampler, given x_T and embeddings, thresholds, callbacks,
image-to-image, inpainting, DDIM inversion, and the errors that name a bad argument."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler
from PIL import Image

from ldm.diffusion import SAMPLERS, StaticThreshold
from ldm.generation.noise_schedule import NoiseScheduleConfig
from tests.pipeline.tiny_models import IMAGE_SIZE, tiny_pipeline

PROMPTS = ["a red circle", "a blue square"]
LATENT_SHAPE = (2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)


def seed(value: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(value)


def latents(pipe, *args, **kwargs) -> torch.Tensor:
    return pipe(*args, output_type="latent", progress=False, **kwargs).images


def square_image(size: int = IMAGE_SIZE) -> Image.Image:
    pixels = np.full((size, size, 3), (40, 160, 90), np.uint8)
    pixels[4:12, 4:12] = (220, 30, 30)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def v_pipe():
    """The quickstart's kind of schedule: v prediction, zero terminal SNR, trailing spacing."""
    return tiny_pipeline(NoiseScheduleConfig(prediction="v", zero_terminal_snr=True, timestep_spacing="trailing"))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_draws_finite_images_on_both_schedules(pipe, v_pipe, sampler):
    for model in (pipe, v_pipe):
        out = latents(model, PROMPTS, sampler=sampler, num_inference_steps=4, generator=seed())
        assert out.shape == LATENT_SHAPE and torch.isfinite(out).all()


def test_karras_sigmas_change_the_levels_and_are_refused_on_zero_terminal_snr(pipe, v_pipe):
    plain = latents(pipe, PROMPTS, sampler="dpmpp_2m", num_inference_steps=5, generator=seed())
    karras = latents(pipe, PROMPTS, sampler="dpmpp_2m", karras_sigmas=True, num_inference_steps=5, generator=seed())
    assert torch.isfinite(karras).all() and not torch.allclose(plain, karras)
    with pytest.raises(ValueError, match=r"^karras_sigmas: this model's schedule has zero terminal SNR"):
        v_pipe(PROMPTS, sampler="dpmpp_2m", karras_sigmas=True)


def test_given_latents_are_the_x_T_a_generator_would_draw(pipe):
    x_T = torch.randn(LATENT_SHAPE, generator=seed(3))
    from_generator = latents(pipe, PROMPTS, num_inference_steps=4, generator=seed(3))
    from_latents = latents(pipe, PROMPTS, num_inference_steps=4, latents=x_T)
    torch.testing.assert_close(from_latents, from_generator)


def test_prompt_embeds_give_the_images_of_their_prompts(pipe):
    cond, uncond = pipe.encode_prompt(PROMPTS, "blurry")
    by_text = latents(pipe, PROMPTS, negative_prompt="blurry", num_inference_steps=4, generator=seed())
    by_embeds = latents(
        pipe, prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=4, generator=seed()
    )
    torch.testing.assert_close(by_embeds, by_text)
    # Without negatives, the unconditional embedding is the one a prompt call uses.
    by_text = latents(pipe, PROMPTS, num_inference_steps=4, generator=seed(), num_images_per_prompt=2)
    by_embeds = latents(pipe, prompt_embeds=cond, num_inference_steps=4, generator=seed(), num_images_per_prompt=2)
    torch.testing.assert_close(by_embeds, by_text)


def test_a_diffusers_scheduler_class_is_built_from_the_folder_config(pipe):
    """DDIMScheduler from the folder's config steps the default (leading) spacing as our DDIM does."""
    ours = latents(pipe, PROMPTS, sampler="ddim", num_inference_steps=5, generator=seed())
    theirs = latents(pipe, PROMPTS, scheduler=DDIMScheduler, num_inference_steps=5, generator=seed())
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4 * ours.abs().max().item())


def test_the_threshold_clips_the_predicted_x0_of_every_sampler(pipe):
    for sampler in SAMPLERS:  # the last step of each lands on (or at) the clipped x0
        out = latents(pipe, PROMPTS, sampler=sampler, num_inference_steps=4, threshold=StaticThreshold(0.05),
                      generator=seed())  # fmt: skip
        assert out.abs().max() <= 0.05 + 1e-6, sampler


def test_the_callback_sees_every_step(pipe):
    seen = []
    out = latents(
        pipe, PROMPTS, num_inference_steps=4, generator=seed(),
        callback=lambda i, t, x, x0: seen.append((i, t, x.shape, x0.shape)),
    )  # fmt: skip
    assert [i for i, *_ in seen] == [0, 1, 2, 3]  # steps run, counted up as diffusers counts them
    assert [t for _, t, *_ in seen] == [751, 501, 251, 1]  # leading spacing, steps_offset 1
    assert all(shape == out.shape for *_, shape, _ in seen)


# ---- image to image ----------------------------------------------------------------------------------


def test_img2img_runs_the_last_strength_share_of_the_steps(pipe):
    steps = []
    pipe(PROMPTS, image=square_image(), strength=0.5, num_inference_steps=10, generator=seed(), progress=False,
         callback=lambda i, t, x, x0: steps.append((i, t)), output_type="latent")  # fmt: skip
    # the last 5 of leading spacing's 10 timesteps (offset 1), counted from 0
    assert steps == [(0, 401), (1, 301), (2, 201), (3, 101), (4, 1)]


def test_img2img_at_full_strength_on_zero_terminal_snr_ignores_the_image(v_pipe):
    """At SNR 0 the image's latents are multiplied by alphabar = 0: strength 1 is text-to-image from the noise."""
    x_T = torch.randn(LATENT_SHAPE, generator=seed(2))
    from_image = latents(v_pipe, PROMPTS, image=square_image(), strength=1.0, latents=x_T, num_inference_steps=5)
    from_text = latents(v_pipe, PROMPTS, latents=x_T, num_inference_steps=5)
    torch.testing.assert_close(from_image, from_text)


def test_img2img_at_low_strength_stays_near_the_image(v_pipe):
    z0 = v_pipe.encode_image(square_image())
    near = latents(v_pipe, PROMPTS, image=square_image(), strength=0.1, num_inference_steps=20, generator=seed())
    far = latents(v_pipe, PROMPTS, image=square_image(), strength=1.0, num_inference_steps=20, generator=seed())
    assert (near - z0).abs().mean() < 0.5 * (far - z0).abs().mean()


def test_image_inputs_of_every_form_encode_alike(pipe):
    image = square_image()
    as_array = np.array(image)  # a writable copy
    as_tensor = torch.from_numpy(as_array).permute(2, 0, 1).unsqueeze(0).float() / 255
    reference = pipe.encode_image(image)
    for form in ([image], as_array, as_array.astype(np.float32) / 255, as_tensor, as_tensor[0]):
        torch.testing.assert_close(pipe.encode_image(form), reference)


# ---- inpainting --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sampler", "resample"), [("ddim", 1), ("dpmpp_2m", 2), ("euler_ancestral", 1)])
def test_inpainting_keeps_the_unmasked_latents_exactly(v_pipe, sampler, resample):
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    mask[3:9, 3:9] = 255  # touches latent cells 1..4 of 8 (f = 2): any touched cell is repainted
    out = latents(
        v_pipe, PROMPTS, image=square_image(), mask_image=Image.fromarray(mask), resample=resample,
        sampler=sampler, num_inference_steps=6, generator=seed(),
    )  # fmt: skip
    z0 = v_pipe.encode_image(square_image()).expand_as(out)
    keep = torch.ones(IMAGE_SIZE // 2, IMAGE_SIZE // 2, dtype=torch.bool)
    keep[1:5, 1:5] = False
    torch.testing.assert_close(out[..., keep], z0[..., keep])
    assert (out[..., ~keep] - z0[..., ~keep]).abs().mean() > 0.05


def test_the_mask_reaches_the_latent_grid_by_any_pixel_of_a_cell(pipe):
    from ldm.generation.inputs import latent_mask

    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3, 4] = 1  # one pixel
    grid = latent_mask(mask, 2)
    assert grid.shape == (1, 1, 4, 4) and grid.sum() == 1 and grid[0, 0, 1, 2] == 1


# ---- inversion ---------------------------------------------------------------------------------------


def test_inversion_regenerates_the_image_under_deterministic_ddim(v_pipe):
    """The tiny U-Net is random, yet its v-prediction ODE is smooth enough to invert: the regenerated latents
    approach the image's own as the steps grow (inversion's error is the model evaluated one level off), and
    are far closer than a sample from other noise."""
    image = square_image()
    z0 = v_pipe.encode_image(image)

    def relative_error(x: torch.Tensor) -> float:
        return ((x - z0).abs().mean() / z0.abs().mean()).item()

    errors = {}
    for steps in (50, 200):
        x_T = v_pipe.invert(image, "a red square", num_inference_steps=steps, progress=False)
        assert x_T.shape == z0.shape
        settings = {"sampler": "ddim", "eta": 0.0, "guidance_scale": 1.0, "num_inference_steps": steps}
        errors[steps] = relative_error(latents(v_pipe, "a red square", latents=x_T, **settings))
    other = relative_error(latents(v_pipe, "a red square", generator=seed(), **settings))
    assert errors[200] < 0.1
    assert errors[200] < 0.5 * errors[50]
    assert errors[200] < 0.1 * other


# ---- bad arguments -----------------------------------------------------------------------------------

BAD_CALLS = [
    ({"strength": 0.5}, "strength", "needs image"),
    ({"mask_image": Image.new("L", (IMAGE_SIZE, IMAGE_SIZE))}, "mask_image", "needs image"),
    ({"image": square_image(), "strength": 1.5}, "strength", "must be in"),
    ({"image": square_image(), "strength": 0.0}, "strength", "must be in"),
    ({"image": square_image(), "strength": 0.05, "num_inference_steps": 10}, "strength", "runs no step"),
    ({"image": "photo.png"}, "image", "must be a PIL image"),
    ({"image": torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE) * 2}, "image", "values must lie in"),
    ({"image": square_image(10)}, "image", "a positive multiple"),
    ({"image": square_image(), "height": 32}, "height", "leave it unset"),
    ({"image": square_image(), "mask_image": Image.new("L", (8, 8))}, "mask_image", "the image is 16x16"),
    ({"image": square_image(), "resample": 2}, "resample", "needs mask_image"),
    ({"latents": torch.zeros(1, 4, 8, 8)}, "latents", "has shape"),
    ({"prompt_embeds": torch.zeros(2, 7, 3)}, "prompt_embeds", "has width"),
    ({"sampler": "dpmpp_2m", "eta": 0.5}, "eta", "takes none"),
    ({"sampler": "heun"}, "sampler", "must be one of"),
    ({"guidance_rescale": 2.0}, "guidance_rescale", "must be in"),
    ({"threshold": 1.0}, "threshold", "must be a StaticThreshold"),
    ({"scheduler": "unipc"}, "scheduler", "must be a diffusers scheduler"),
    ({"scheduler": UniPCMultistepScheduler, "sampler": "ddim"}, "sampler", "with scheduler="),
    (
        {"scheduler": UniPCMultistepScheduler(prediction_type="v_prediction")},
        "scheduler",
        "its prediction_type is 'v_prediction'",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "argument", "message"), BAD_CALLS, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_CALLS)]
)
def test_bad_generation_arguments_name_the_argument(pipe, kwargs, argument, message):
    prompt = None if "prompt_embeds" in kwargs else PROMPTS
    with pytest.raises(ValueError, match=f"^{argument}: .*{message}"):
        pipe(prompt, progress=False, **kwargs)


def test_prompt_and_prompt_embeds_together_are_refused(pipe):
    cond, _ = pipe.encode_prompt(PROMPTS)
    with pytest.raises(ValueError, match=r"^prompt_embeds: give either prompt"):
        pipe(PROMPTS, prompt_embeds=cond)
    with pytest.raises(ValueError, match=r"^prompt: give a prompt"):
        pipe()


def test_inpainting_pastes_the_input_pixels_outside_the_mask_unless_asked_not_to(v_pipe):
    """The decoder's GroupNorm and attention move every pixel when any latent changes; the pasted output keeps
    the input's pixels outside the mask exactly, the unpasted one is the decoder's."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    mask[4:12, 4:12] = 255
    source = np.asarray(square_image()).astype(np.float32) / 255
    outside = mask == 0

    def inpaint(paste: bool) -> np.ndarray:
        return v_pipe(
            PROMPTS[0], image=square_image(), mask_image=Image.fromarray(mask), num_inference_steps=5,
            generator=seed(), output_type="np", progress=False, paste_unmasked=paste,
        ).images[0]  # fmt: skip

    pasted, decoded = inpaint(True), inpaint(False)
    np.testing.assert_allclose(pasted[outside], source[outside], atol=1e-6)
    np.testing.assert_allclose(pasted[~outside], decoded[~outside], atol=1e-6)
    assert np.abs(decoded[outside] - source[outside]).max() > 1e-3


def test_given_latents_set_the_image_size(pipe):
    x_T = torch.randn(1, 4, 12, 10, generator=seed())  # the model's default is 8 x 8
    image = pipe("a red circle", latents=x_T, num_inference_steps=2, output_type="np", progress=False).images[0]
    assert image.shape == (24, 20, 3)
