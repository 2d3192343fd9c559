"""benchmarks/generation_support.py: the edited captions and the masks generation.py's img2img and inpainting
rows rest on."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from benchmarks.generation_support import edit_caption, heldout_scenes, next_color, shape_box
from ldm.data.shapes import BACKGROUNDS, CAPTION_TEMPLATES, COLORS, PALETTE, POSITIONS, SHAPES, SIZES, render_scene

ATTRIBUTES = {"shape": "triangle", "color": "red", "background": "white", "size": "small", "position": "top left"}


@pytest.mark.parametrize("template", CAPTION_TEMPLATES)
@pytest.mark.parametrize("attribute", ["background", "color"])
def test_edit_caption_keeps_the_phrasing_and_changes_one_word(template, attribute):
    caption = template.format(**ATTRIBUTES)
    edited = edit_caption(caption, ATTRIBUTES, **{attribute: "blue"})
    assert edited == template.format(**(ATTRIBUTES | {attribute: "blue"}))
    changed = [(a, b) for a, b in zip(caption.split(), edited.split(), strict=True) if a != b]
    assert [(a.strip(",()"), b.strip(",()")) for a, b in changed] == [(ATTRIBUTES[attribute], "blue")]


def test_edit_caption_finds_the_template_of_dataset_captions():
    for scene in heldout_scenes(12, 16):
        new = next_color(BACKGROUNDS, scene.params["background"], avoid=scene.params["color"])
        edited = edit_caption(scene.caption, scene.params, background=new)
        assert edited in {t.format(**(scene.params | {"background": new})) for t in CAPTION_TEMPLATES}


def test_edit_caption_rejects_a_caption_of_other_attributes():
    with pytest.raises(ValueError, match="caption"):
        edit_caption(CAPTION_TEMPLATES[0].format(**ATTRIBUTES), ATTRIBUTES | {"size": "large"}, color="blue")


def test_next_color_is_new_and_avoids_the_other_colour():
    for current, avoid in itertools.permutations(COLORS, 2):
        assert next_color(COLORS, current, avoid) not in (current, avoid)


@pytest.mark.parametrize("resolution", [16, 32])
def test_shape_box_covers_every_pixel_the_shape_changes(resolution):
    jitters = [(-2, -2, 1.1), (2, 2, 1.1), (-2, 2, 0.9), (0, 0, 1.0)]
    for shape, size, position, jitter in itertools.product(SHAPES, SIZES, POSITIONS, jitters):
        scene = {"shape": shape, "color": "red", "background": "white", "size": size, "position": position}
        scene["jitter"] = jitter
        drawn = np.asarray(render_scene(scene, resolution), dtype=np.int16)
        plain = np.asarray(Image.new("RGB", (resolution, resolution), PALETTE["white"]), dtype=np.int16)
        ys, xs = np.nonzero(np.abs(drawn - plain).sum(-1))
        x0, y0, x1, y1 = shape_box(scene, resolution, pad=0)
        assert len(xs) > 0 and x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1, scene
        assert x1 - x0 <= xs.max() - xs.min() + 3 and y1 - y0 <= ys.max() - ys.min() + 3, "the box is not tight"
