"""ldm.images: tensor -> pixels exactly as diffusers converts them, grids and frame picking."""

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from ldm.images import evenly_spaced, image_grid, save_image_grid, to_numpy, to_pil, write_animation


def test_to_pil_and_to_numpy_match_diffusers_postprocessing():
    images = torch.randn(3, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 1.2  # some values outside [-1, 1]
    processor = VaeImageProcessor()
    np.testing.assert_array_equal(to_numpy(images), processor.postprocess(images, output_type="np"))
    ours, theirs = to_pil(images), processor.postprocess(images, output_type="pil")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs, strict=True))
    assert ours[0].size == (7, 5)


def test_to_pil_endpoints_and_grey():
    (white,) = to_pil(torch.ones(1, 1, 2, 2))
    (black,) = to_pil(-torch.ones(1, 3, 2, 2))
    assert white.mode == "L" and np.asarray(white).min() == 255
    assert np.asarray(black).max() == 0
    with pytest.raises(ValueError, match="images: expected shape"):
        to_pil(torch.zeros(2, 4, 2, 2))


def test_image_grid_layout(tmp_path):
    tiles = torch.linspace(-1, 1, 5).reshape(5, 1, 1, 1).expand(5, 3, 4, 6)  # 5 flat tiles, 6 wide, 4 high
    grid = image_grid(tiles, rows=2, padding=1)
    assert grid.size == (3 * 6 + 4 * 1, 2 * 4 + 3 * 1)  # 3 columns for 5 tiles in 2 rows
    pixels = np.asarray(grid)
    assert pixels[1, 1].tolist() == [0, 0, 0]  # first tile (value -1) at the top left
    assert pixels[1 + 4 + 1, 1 + 6 + 1].tolist() == [255, 255, 255]  # tile 4 (value 1): second row, second column
    path = save_image_grid(tiles, tmp_path / "sub" / "grid.png", rows=1, padding=0, scale=3)
    assert Image.open(path).size == (5 * 6 * 3, 4 * 3)
    with pytest.raises(ValueError, match="images: is empty"):
        image_grid([])


def test_evenly_spaced_keeps_both_ends():
    assert evenly_spaced(51, 10) == [0, 6, 11, 17, 22, 28, 33, 39, 44, 50]
    assert evenly_spaced(4, 10) == [0, 1, 2, 3]
    assert evenly_spaced(1, 10) == [0]


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_write_animation_loops_every_frame_at_the_given_rate(tmp_path, suffix):
    frames = [Image.new("RGB", (4, 3), (40 * i, 255 - 40 * i, 0)) for i in range(5)]
    path = write_animation(frames, tmp_path / "sub" / f"anim{suffix}", fps=4, scale=2)
    with Image.open(path) as animation:
        assert animation.n_frames == 5 and animation.size == (8, 6)
        assert animation.info["loop"] == 0  # forever
        animation.seek(3)
        animation.load()  # WebP reads a frame's duration with its pixels
        assert animation.info["duration"] == 250  # 1000 / fps ms
        assert animation.convert("RGB").getpixel((7, 5)) == (120, 135, 0)  # the WebP is lossless; GIF keeps 5 colours


def test_write_animation_rejects_what_it_cannot_write(tmp_path):
    frame = Image.new("RGB", (2, 2))
    with pytest.raises(ValueError, match=r"path: .* must end in \.gif or \.webp"):
        write_animation([frame], tmp_path / "anim.png")
    with pytest.raises(ValueError, match="frames: is empty"):
        write_animation([], tmp_path / "anim.gif")
    with pytest.raises(ValueError, match="fps: must be a positive number"):
        write_animation([frame], tmp_path / "anim.gif", fps=0)
