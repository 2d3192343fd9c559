"""`ldm generate` end to end on the tiny saved model folder."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.cli import main
from ldm.commands.generate import slug


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
        (["--steps", "0"], "num_inference_steps: must be a positive int"),
        (["--height", "10"], "height: must be a positive multiple of 4"),
        (["--num-images", "0"], "--num-images: must be >= 1"),
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
