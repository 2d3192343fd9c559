"""`ldm invert` end to end on the tiny saved model folder."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm.cli import main
from tests.pipeline.tiny_models import IMAGE_SIZE, LATENT_CHANNELS


@pytest.fixture
def image_file(tmp_path) -> Path:
    """A 16 px RGB image (the tiny model's size): a red square on grey."""
    pixels = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)
    pixels[4:12, 4:12] = (220, 20, 20)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    return tmp_path / "image.png"


def test_invert_writes_the_pipelines_inversion_that_generate_starts_from(
    model_folder, pipe, tmp_path, capsys, image_file
):
    # How well DDIM regenerates the image is pinned on the pipeline (test_pipeline_editing.py); here, that the
    # commands pass the inversion's x_T and settings through.
    out = tmp_path / "sub" / "x_T.safetensors"
    args = ["invert", str(image_file), "--model", str(model_folder), "--prompt", "a red square", "--steps", "3"]
    assert main([*args, "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out)]
    latents = load_file(out)["latents"]
    assert latents.shape == (1, LATENT_CHANNELS, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    image = Image.open(image_file)
    torch.testing.assert_close(latents, pipe.invert(image, "a red square", num_inference_steps=3, progress=False))
    generate = ["generate", "a red square", "--model", str(model_folder), "--latents", str(out), "--sampler", "ddim"]
    generate += ["--eta", "0", "--guidance-scale", "1", "--steps", "3", "--out", str(tmp_path / "again")]
    assert main(generate) == 0
    settings = {"sampler": "ddim", "eta": 0.0, "guidance_scale": 1.0, "num_inference_steps": 3}
    expected = pipe("a red square", latents=latents, **settings).images[0]
    regenerated = Image.open(tmp_path / "again" / "000-a-red-square.png")
    np.testing.assert_array_equal(np.asarray(regenerated), np.asarray(expected))


@pytest.mark.parametrize(
    ("image", "options", "message"),
    [
        ("missing.png", [], "IMAGE: cannot read '{tmp}/missing.png' as an image"),
        ("image.png", ["--steps", "0"], "num_inference_steps: "),
        ("image.png", ["--device", "gpu0"], "--device: 'gpu0' is not a torch device"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_folder, tmp_path, capsys, image_file, image, options, message):
    out = tmp_path / "x_T.safetensors"
    with pytest.raises(SystemExit) as info:
        main(
            [
                "invert",
                str(tmp_path / image),
                "--model",
                str(model_folder),
                "--prompt",
                "x",
                "--out",
                str(out),
                *options,
            ]
        )
    assert info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith("ldm invert: error: ") and message.format(tmp=tmp_path) in last_line
    assert not out.exists()
