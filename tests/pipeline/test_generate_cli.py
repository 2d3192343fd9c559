"""`ldm generate` end to end on the tiny saved model folder."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.cli import main
from ldm.commands import SamplerChoices
from ldm.commands.generate import slug
from ldm.diffusion import SAMPLER_NAMES, DynamicThreshold, StaticThreshold
from ldm.generation import GenerationRequest, LatentDiffusionPipeline, PipelineOutput
from tests.pipeline.tiny_models import IMAGE_SIZE, LATENT_CHANNELS, TEXT_WIDTH


def test_generate_writes_images_grid_and_trajectory_strips(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "--model", str(model_folder), "a red circle", "A Blue Square!", "--num-images", "2"]
    args += ["--steps", "5", "--guidance-scale", "3", "--seed", "7", "--out", str(out), "--trajectory"]
    assert main(args) == 0
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    names = [p.name for p in printed]
    assert names == [
        "000-a-red-circle.png",
        "001-a-red-circle.png",
        "002-a-blue-square.png",
        "003-a-blue-square.png",
        "grid.png",
        "trajectory-00-a-red-circle.png",
        "trajectory-01-a-blue-square.png",
    ]
    assert all(p.parent == out and p.is_file() for p in printed)
    assert Image.open(out / "000-a-red-circle.png").size == (16, 16)
    # Grid and strips show the 16 px images as 64 px tiles (x4 pixel repetition).
    assert Image.open(out / "grid.png").size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)  # one row per prompt
    # 6 frames (x_T .. x_0 of 5 steps), and two rows (x_t, predicted x_0) per image of the prompt.
    assert Image.open(out / "trajectory-00-a-red-circle.png").size == (6 * 64 + 7 * 2, 4 * 64 + 5 * 2)
    tile = np.asarray(Image.open(out / "grid.png"))[2 : 2 + 64, 2 : 2 + 64]
    np.testing.assert_array_equal(tile[::4, ::4], np.asarray(Image.open(out / "000-a-red-circle.png")))
    # The same seed writes the same pixels; another seed does not.
    first = (out / "000-a-red-circle.png").read_bytes()
    assert main([*args[:-1], "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "000-a-red-circle.png").read_bytes() == first
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_folder),
                "a red circle",
                "--steps",
                "5",
                "--guidance-scale",
                "3",
                "--seed",
                "8",
                "--out",
                str(tmp_path / "other"),
                "--sampler",
                "ddpm",
            ]
        )
        == 0
    )
    assert (tmp_path / "other" / "000-a-red-circle.png").read_bytes() != first


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "model folder not found"),
        (["--steps", "0"], "--steps: must be a positive int"),
        (["--height", "10"], "--height: must be a positive multiple of 4"),
        (["--num-images", "0"], "--num-images: must be a positive int"),
        (["--device", "gpu0"], "--device: 'gpu0' is not a torch device"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_folder, tmp_path, capsys, extra, message):
    model = tmp_path / "missing" if not extra else model_folder
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(model), "a red circle", "--out", str(tmp_path / "out"), *extra])
    assert info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]  # after any weight-loading progress bar
    assert last_line.startswith("ldm generate: error: ") and message in last_line
    assert not (tmp_path / "out").exists()


def test_incomplete_folder_is_reported_with_its_component(model_folder, tmp_path, capsys):
    broken = shutil.copytree(model_folder, tmp_path / "broken")
    shutil.rmtree(broken / "unet")
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(broken), "x"])
    assert "component 'unet' is missing" in capsys.readouterr().err


def test_slug():
    assert slug("  A Red circle, on GREY!  ") == "a-red-circle-on-grey"
    assert slug("") == "unconditional"
    assert len(slug("word " * 50)) <= 40


def test_prompts_that_look_like_paths_write_only_inside_the_output_folder(model_folder, tmp_path, capsys):
    out = tmp_path / "nested" / "out"
    prompts = ["../../escaped", "/tmp/absolute", "..", "a/b\\c"]
    assert main(["generate", "--model", str(model_folder), *prompts, "--steps", "2", "--out", str(out)]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    assert len(printed) == len(prompts) + 1  # one image per prompt and the grid
    assert all(p.parent == out and p.is_file() for p in printed)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == sorted(
        f"nested/out/{p.name}" for p in printed
    )
    assert [p.name for p in printed[:2]] == ["000-escaped.png", "001-tmp-absolute.png"]


# ---- issue 17: samplers, schedulers, guidance options, given latents / embeddings, img2img and inpainting -------


@pytest.fixture
def recorded_calls(monkeypatch):
    """LatentDiffusionPipeline.generate replaced by one that records the request's fields and returns black
    images of the batch's size, so a test sees exactly what the command asks for."""
    calls = []

    def record(self, request):
        kwargs = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
        calls.append(kwargs)
        prompts = kwargs["prompt"] if kwargs["prompt"] is not None else kwargs["prompt_embeds"]
        batch = len(prompts) * kwargs["num_images_per_prompt"]
        return PipelineOutput([Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))] * batch)

    monkeypatch.setattr(LatentDiffusionPipeline, "generate", record)
    return calls


@pytest.fixture
def input_files(tmp_path) -> dict[str, str]:
    """Files the options read: latents, prompt embeddings, a safetensors file without either, an RGB image of
    the tiny model's size, a mask (white right half) and a file that is no image."""
    latents = torch.randn(1, LATENT_CHANNELS, 4, 8)  # an 8 x 16 image's x_T, not the model's 16 x 16
    save_file({"latents": latents}, tmp_path / "latents.safetensors")
    embeds = {"prompt_embeds": torch.randn(2, 77, TEXT_WIDTH), "negative_prompt_embeds": torch.randn(1, 77, TEXT_WIDTH)}
    save_file(embeds, tmp_path / "embeds.safetensors")
    save_file({"other": torch.zeros(1)}, tmp_path / "other.safetensors")
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (200, 30, 30)).save(tmp_path / "image.png")
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    mask[:, IMAGE_SIZE // 2 :] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    names = ("latents.safetensors", "embeds.safetensors", "other.safetensors", "image.png", "mask.png", "junk.png")
    return {name.split(".")[0]: str(tmp_path / name) for name in names} | {"missing": str(tmp_path / "missing")}


def test_each_sampler_name_is_a_choice():
    assert tuple(SamplerChoices()) == SAMPLER_NAMES
    assert set(SAMPLER_NAMES) == {"ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral", "lcm"}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--sampler", "dpmpp_2m_sde"], {"sampler": "dpmpp_2m_sde"}),
        (["--karras"], {"karras_sigmas": True}),
        ([], {"karras_sigmas": None, "guidance_rescale": 0.0}),  # the folder's default; rescale off
        (["--guidance-rescale", "0.7"], {"guidance_rescale": 0.7}),
        (["--static-threshold", "1.5"], {"threshold": StaticThreshold(1.5)}),
        (["--dynamic-threshold", "0.9"], {"threshold": DynamicThreshold(0.9, float("inf"))}),
        (["--dynamic-threshold", "0.9", "--threshold-max", "3"], {"threshold": DynamicThreshold(0.9, 3.0)}),
        (["--init-image", "{image}", "--strength", "0.5"], {"strength": 0.5, "height": None, "width": None}),
        (["--init-image", "{image}", "--mask", "{mask}", "--resample", "3"], {"resample": 3}),
        (["--latents", "{latents}"], {"height": None, "width": None}),  # the pipeline reads the latents' size
        (["--latents", "{latents}", "--height", "16"], {"height": 16, "width": None}),
    ],
)
def test_each_option_reaches_the_pipeline(
    model_folder, tmp_path, capsys, recorded_calls, input_files, options, expected
):
    options = [option.format(**input_files) for option in options]
    assert main(["generate", "--model", str(model_folder), "a red circle", "--out", str(tmp_path), *options]) == 0
    (call,) = recorded_calls
    assert {name: call[name] for name in expected} == expected
    assert call["prompt"] == ["a red circle"] and call["scheduler"] is None


def test_files_given_to_options_reach_the_pipeline(model_folder, tmp_path, capsys, recorded_calls, input_files):
    options = ["--latents", input_files["latents"], "--init-image", input_files["image"], "--mask", input_files["mask"]]
    assert main(["generate", "--model", str(model_folder), "a red circle", "--out", str(tmp_path), *options]) == 0
    (call,) = recorded_calls
    assert torch.equal(call["latents"], load_file(input_files["latents"])["latents"])
    assert call["image"].mode == "RGB" and call["image"].getpixel((0, 0)) == (200, 30, 30)
    assert call["mask_image"].mode == "L" and call["mask_image"].getpixel((IMAGE_SIZE - 1, 0)) == 255
    assert call["strength"] is None and call["resample"] == 1  # the pipeline's defaults


def test_prompt_embeds_replace_the_prompts_which_then_only_name_the_files(
    model_folder, tmp_path, capsys, recorded_calls, input_files
):
    embeds = load_file(input_files["embeds"])
    args = ["generate", "--model", str(model_folder), "--prompt-embeds", input_files["embeds"]]
    assert main([*args, "--out", str(tmp_path / "unnamed")]) == 0
    assert main([*args, "--out", str(tmp_path / "named"), "red", "blue"]) == 0
    for call in recorded_calls:
        assert call["prompt"] is None
        assert torch.equal(call["prompt_embeds"], embeds["prompt_embeds"])
        assert torch.equal(call["negative_prompt_embeds"], embeds["negative_prompt_embeds"])
    printed = [Path(line).name for line in capsys.readouterr().out.split()]
    unnamed, named = ["000-prompt-embeds-0.png", "001-prompt-embeds-1.png"], ["000-red.png", "001-blue.png"]
    assert printed == [*unnamed, "grid.png", *named, "grid.png"]


def test_scheduler_option_passes_that_diffusers_scheduler_built_from_the_folder(
    model_folder, tmp_path, capsys, recorded_calls, pipe
):
    from diffusers import UniPCMultistepScheduler

    args = ["generate", "--model", str(model_folder), "x", "--out", str(tmp_path), "--scheduler"]
    assert main([*args, "UniPCMultistepScheduler"]) == 0
    (call,) = recorded_calls
    assert call["scheduler"] is UniPCMultistepScheduler  # the class: the request builds it from the folder's config
    built = pipe.resolve(GenerationRequest("x", scheduler=call["scheduler"])).scheduler
    assert built.config.beta_schedule == pipe.scheduler_config["beta_schedule"]
    assert call["sampler"] is None and call["eta"] is None and call["karras_sigmas"] is None  # ours are not used


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([], "PROMPT: give at least one prompt, or --prompt-embeds"),
        (["x", "--scheduler", "UniPCMultistep"], "--scheduler: 'UniPCMultistep' is not a diffusers scheduler class"),
        (["x", "--scheduler", "AutoencoderKL"], "--scheduler: 'AutoencoderKL' is not a diffusers scheduler class"),
        (
            ["x", "--scheduler", "DDIMScheduler", "--sampler", "ddim"],
            "--scheduler: replaces our samplers, so it does not go with --sampler",
        ),
        (["x", "--scheduler", "DDIMScheduler", "--karras"], "does not go with --karras"),
        (["x", "--scheduler", "DDIMScheduler", "--eta", "0"], "does not go with --eta"),
        (["x", "--scheduler", "DDIMScheduler", "--static-threshold", "1"], "does not go with --static-threshold"),
        (["x", "--scheduler", "DDIMScheduler", "--trajectory"], "does not go with --trajectory"),
        (["x", "--prompt-embeds", "{embeds}", "--negative-prompt", "y"], "--negative-prompt: not with --prompt-embeds"),
        (
            ["x", "--static-threshold", "1", "--dynamic-threshold", "0.9"],
            "argument --dynamic-threshold: not allowed with argument --static-threshold",
        ),
        (["x", "--threshold-max", "2"], "--threshold-max: needs --dynamic-threshold"),
        (["x", "--static-threshold", "0"], "--static-threshold: must be > 0"),
        (["x", "--dynamic-threshold", "1.5"], "--dynamic-threshold: must be in (0, 1]"),
        (["x", "--latents", "{missing}"], "--latents: cannot read '{missing}' as safetensors"),
        (["x", "--latents", "{image}"], "--latents: cannot read '{image}' as safetensors"),
        (["x", "--latents", "{other}"], "--latents: '{other}' has no tensor 'latents' (it holds: other)"),
        (["x", "--prompt-embeds", "{missing}"], "--prompt-embeds: cannot read '{missing}'"),
        (["--prompt-embeds", "{latents}"], "--prompt-embeds: '{latents}' has no tensor 'prompt_embeds'"),
        (["x", "--prompt-embeds", "{embeds}"], "--prompt-embeds: '{embeds}' holds 2 prompts but 1 PROMPTs name them"),
        (["x", "--init-image", "{missing}"], "--init-image: cannot read '{missing}' as an image"),
        (["x", "--init-image", "{junk}"], "--init-image: cannot read '{junk}' as an image"),
        (["x", "--init-image", "{image}", "--mask", "{missing}"], "--mask: cannot read '{missing}' as an image"),
        (["x", "--mask", "{mask}"], "--mask: needs --init-image"),
        (["x", "--strength", "0.5"], "--strength: needs --init-image"),
        (["x", "--init-image", "{image}", "--resample", "2"], "--resample: needs --mask"),
    ],
)
def test_bad_options_are_one_line_naming_the_flag(model_folder, tmp_path, capsys, input_files, options, message):
    options = [option.format(**input_files) for option in options]
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(model_folder), "--out", str(tmp_path / "out"), *options])
    assert info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith("ldm generate: error: ") and message.format(**input_files) in last_line
    assert not (tmp_path / "out").exists()


def test_a_scheduler_name_close_to_a_real_one_is_suggested(model_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(model_folder), "x", "--scheduler", "UniPCMultistep"])
    assert "valid names include UniPCMultistepScheduler" in capsys.readouterr().err


def test_an_invalid_pipeline_argument_is_one_line_naming_it(model_folder, tmp_path, capsys, input_files):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(model_folder), "x", "--init-image", input_files["image"], "--strength", "1.5"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("ldm generate: error: --strength: ")


@pytest.mark.parametrize(
    "options",
    [
        ["--sampler", "dpmpp_2m", "--karras"],
        ["--sampler", "dpmpp_2m_sde", "--guidance-rescale", "0.5"],
        ["--sampler", "euler_ancestral", "--dynamic-threshold", "0.99"],
        ["--scheduler", "UniPCMultistepScheduler"],
        ["--init-image", "{image}", "--strength", "0.5", "--trajectory"],
        ["--init-image", "{image}", "--mask", "{mask}", "--resample", "2"],
    ],
)
def test_new_options_write_images_end_to_end(model_folder, tmp_path, capsys, input_files, options):
    options = [option.format(**input_files) for option in options]
    out = tmp_path / "out"
    args = ["generate", "--model", str(model_folder), "a red circle", "--steps", "3", "--out", str(out), *options]
    assert main(args) == 0
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    assert printed[:2] == [out / "000-a-red-circle.png", out / "grid.png"]
    assert Image.open(printed[0]).size == (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("inpaint", [False, True])
def test_img2img_and_inpainting_draw_what_the_pipeline_draws_for_the_seed(
    model_folder, pipe, tmp_path, capsys, input_files, inpaint
):
    options = ["--init-image", input_files["image"], "--strength", "0.6", "--steps", "3", "--seed", "5"]
    options += ["--mask", input_files["mask"], "--resample", "2"] if inpaint else []
    assert main(["generate", "--model", str(model_folder), "x", "--out", str(tmp_path / "out"), *options]) == 0
    image, mask = Image.open(input_files["image"]), Image.open(input_files["mask"])
    kwargs = {"mask_image": mask, "resample": 2} if inpaint else {}
    expected = pipe(
        "x", image=image, strength=0.6, num_inference_steps=3, generator=torch.Generator().manual_seed(5), **kwargs
    ).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "000-x.png")), np.asarray(expected))


def test_given_embeddings_and_latents_draw_the_prompts_image(model_folder, pipe, tmp_path, capsys):
    cond, uncond = pipe.encode_prompt(["a red circle"])
    save_file({"prompt_embeds": cond.cpu(), "negative_prompt_embeds": uncond.cpu()}, tmp_path / "embeds.safetensors")
    shape = (1, LATENT_CHANNELS, IMAGE_SIZE // pipe.vae_scale_factor, IMAGE_SIZE // pipe.vae_scale_factor)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(7))  # what --seed 7 draws
    save_file({"latents": x_T}, tmp_path / "latents.safetensors")
    common = ["generate", "--model", str(model_folder), "--steps", "3", "--guidance-scale", "3"]
    assert main([*common, "a red circle", "--seed", "7", "--out", str(tmp_path / "prompt")]) == 0
    given = [
        "--prompt-embeds",
        str(tmp_path / "embeds.safetensors"),
        "--latents",
        str(tmp_path / "latents.safetensors"),
    ]
    assert main([*common, "a red circle", *given, "--seed", "0", "--out", str(tmp_path / "given")]) == 0
    image = "000-a-red-circle.png"
    assert (tmp_path / "given" / image).read_bytes() == (tmp_path / "prompt" / image).read_bytes()


def test_dtype_loads_the_weights_in_that_precision(model_folder, tmp_path, capsys):
    """--dtype bfloat16 draws what the pipeline loaded in bfloat16 draws for the seed, not the float32 image."""
    common = ["generate", "--model", str(model_folder), "a red circle", "--steps", "3", "--seed", "5"]
    assert main([*common, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    half = LatentDiffusionPipeline.from_pretrained(model_folder, torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    expected = half("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(5)).images[0]
    written = np.asarray(Image.open(tmp_path / "bf16" / "000-a-red-circle.png"))
    np.testing.assert_array_equal(written, np.asarray(expected))
    assert main([*common, "--out", str(tmp_path / "fp32")]) == 0
    assert not np.array_equal(written, np.asarray(Image.open(tmp_path / "fp32" / "000-a-red-circle.png")))
