"""`ldm interpolate` end to end on the tiny saved model folder, and its pure pieces."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import main
from ldm.commands.interpolate import frame_weights, interpolated_embeddings, interpolated_noise, ping_pong
from ldm.generation import LatentDiffusionPipeline

TILE = 64  # the tiny model's 16 px frames, enlarged x4 in the strip and the animations


def test_frame_weights_run_from_a_to_b_evenly():
    assert frame_weights(2) == [0.0, 1.0]
    assert frame_weights(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="frames: must be >= 2"):
        frame_weights(1)


def test_ping_pong_goes_there_and_back_without_repeating_the_ends():
    assert ping_pong([0, 1, 2, 3]) == [0, 1, 2, 3, 2, 1]
    assert ping_pong([0, 1]) == [0, 1]


def test_interpolated_noise_starts_and_ends_at_each_seeds_draw():
    shape = (1, 4, 8, 8)
    noise = interpolated_noise(shape, 3, 5, frame_weights(4))
    assert noise.shape == (4, 4, 8, 8)
    torch.testing.assert_close(noise[:1], torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(noise[-1:], torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    norms = noise.flatten(1).norm(dim=1)
    assert (norms > 0.9 * norms[0]).all()  # on the arc, not through the low-norm middle of the straight line


def test_interpolated_embeddings_mix_the_prompts_linearly():
    a, b = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    mixed = interpolated_embeddings(a, b, [0.0, 0.25, 1.0])
    assert mixed.shape == (3, 3, 2)
    assert mixed[:, 0, 0].tolist() == [0.0, 0.25, 1.0]


def test_interpolate_writes_a_strip_and_looping_animations_of_every_frame(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["interpolate", "a red circle", "a blue square", "--model", str(model_folder), "--frames", "3"]
    assert main([*args, "--steps", "2", "--out", str(out), "--fps", "5"]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    assert printed == [out / "strip.png", out / "interpolation.gif", out / "interpolation.webp"]
    assert Image.open(out / "strip.png").size == (3 * TILE + 4 * 2, TILE + 2 * 2)  # one row of 3 frames
    for animation in printed[1:]:
        with Image.open(animation) as image:
            assert image.n_frames == 2 * 3 - 2  # there and back
            assert image.size == (TILE, TILE) and image.info["loop"] == 0
            image.load()
            assert image.info["duration"] == 200  # 1000 / fps ms


def test_interpolation_ends_are_the_images_generate_draws_for_each_seed(model_folder, tmp_path, capsys):
    common = ["--model", str(model_folder), "--steps", "2", "--guidance-scale", "3", "--sampler", "ddim"]
    interpolate = ["interpolate", "a red circle", "a blue square", "--seed-a", "4", "--seed-b", "9", "--frames", "3"]
    assert main([*interpolate, *common, "--batch-size", "2", "--out", str(tmp_path / "walk")]) == 0
    strip = np.asarray(Image.open(tmp_path / "walk" / "strip.png").convert("RGB")).astype(int)
    for column, (prompt, seed) in enumerate([("a red circle", "4"), ("a blue square", "9")]):
        out = tmp_path / f"generate-{seed}"
        assert main(["generate", prompt, "--seed", seed, "--eta", "0", *common, "--out", str(out)]) == 0
        image = np.asarray(Image.open(next(out.glob("000-*.png")))).astype(int)
        left = 2 + 2 * column * (TILE + 2)  # frames 0 and 2
        tile = strip[2 : 2 + TILE : 4, left : left + TILE : 4]
        assert np.abs(tile - image).max() <= 1  # batches of other sizes may round a pixel differently


def test_interpolate_calls_the_pipeline_per_batch_with_latents_and_embeddings(
    model_folder, tmp_path, capsys, monkeypatch, pipe
):
    calls = []
    real_generate = LatentDiffusionPipeline.generate

    def record(self, request):
        calls.append(vars(request))
        return real_generate(self, request)

    monkeypatch.setattr(LatentDiffusionPipeline, "generate", record)
    args = ["interpolate", "a red circle", "--model", str(model_folder), "--frames", "5", "--batch-size", "2"]
    assert main([*args, "--steps", "2", "--out", str(tmp_path), "--karras", "--sampler", "dpmpp_2m"]) == 0
    assert [call["latents"].shape[0] for call in calls] == [2, 2, 1]
    assert all(call["prompt_embeds"].shape[0] == call["latents"].shape[0] for call in calls)
    cond, uncond = pipe.encode_prompt(["a red circle"])
    for call in calls:  # one prompt: only the noise moves
        torch.testing.assert_close(call["prompt_embeds"], cond.expand_as(call["prompt_embeds"]))
        torch.testing.assert_close(call["negative_prompt_embeds"], uncond)
        assert call["sampler"] == "dpmpp_2m" and call["karras_sigmas"] is True
    latents = torch.cat([call["latents"] for call in calls])
    torch.testing.assert_close(latents, interpolated_noise(latents[:1].shape, 0, 1, frame_weights(5)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--frames", "1"], "--frames: must be >= 2"),
        (["--batch-size", "0"], "--batch-size: must be >= 1"),
        (["--fps", "0"], "--fps: must be > 0"),
        (["--sampler", "plms"], "argument --sampler: invalid choice: 'plms'"),
    ],
)
def test_bad_options_are_one_line_naming_the_flag(model_folder, tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as info:
        main(["interpolate", "x", "--model", str(model_folder), "--out", str(tmp_path / "out"), *options])
    assert info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith("ldm interpolate: error: ") and message in last_line
    assert not (tmp_path / "out").exists()
